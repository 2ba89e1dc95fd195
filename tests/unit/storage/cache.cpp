// The DRAM cache policies on their own: LFU evicts the least-hit block with
// recency breaking ties, and its counts decay by beta every K steps, so an
// expert that stops being chosen loses its place; LRU evicts the least
// recently used.
#include <doctest/doctest.h>

#include <vector>

#include "semoe/storage/cache.hpp"

using namespace semoe;

namespace {
std::size_t pick(const auto& c, std::vector<std::size_t> candidates) {
  return c.pick(std::span<const std::size_t>(candidates));
}
}  // namespace

TEST_CASE("lfu: the least-hit block goes first; among equal counts, the least recently used") {
  storage::lfu c;
  c.resize(3);
  for (int i = 0; i < 3; ++i) c.touch(0);
  c.touch(1);
  c.touch(2);
  CHECK(pick(c, {0, 1, 2}) == 1);  // 1 and 2 were hit once; 1 longer ago
  c.touch(1);
  CHECK(pick(c, {0, 1, 2}) == 2);
  CHECK(pick(c, {0}) == 0);
}

TEST_CASE("lfu: counts decay by beta every K steps, so an expert no longer chosen is evicted") {
  storage::lfu c({.decay = 0.5, .decay_every = 2, .threshold = 4.0});
  c.resize(2);
  for (int i = 0; i < 8; ++i) c.touch(0);  // popular once: 8 hits
  for (int s = 0; s < 3; ++s) c.end_step();
  CHECK(c.hits(0) == 4.0);  // one decay after step 2; the next comes after step 4
  c.end_step();
  CHECK(c.hits(0) == 2.0);
  for (int i = 0; i < 3; ++i) c.touch(1);  // popular now: 3 hits
  CHECK(pick(c, {0, 1}) == 0);              // without the decay block 0 (8 hits) would stay
  storage::lfu keep({.decay = 1.0, .decay_every = 1, .threshold = 4.0});  // beta = 1: no decay
  keep.resize(2);
  for (int i = 0; i < 8; ++i) keep.touch(0);
  for (int s = 0; s < 4; ++s) keep.end_step();
  for (int i = 0; i < 3; ++i) keep.touch(1);
  CHECK(pick(keep, {0, 1}) == 1);
}

TEST_CASE("lfu: bad options are errors naming the field") {
  CHECK_THROWS_WITH_AS(storage::lfu({.decay = 1.5}), doctest::Contains("options.decay = 1.5"), error);
  CHECK_THROWS_WITH_AS(storage::lfu({.decay_every = 0}), doctest::Contains("options.decay_every = 0"), error);
  CHECK_THROWS_WITH_AS(storage::lfu({.threshold = -1}), doctest::Contains("options.threshold = -1"), error);
}

TEST_CASE("lru: the least recently used block goes first, however often the others were used") {
  storage::lru c;
  c.resize(3);
  for (int i = 0; i < 5; ++i) c.touch(0);
  c.touch(1);
  c.touch(2);
  c.touch(0);
  CHECK(pick(c, {0, 1, 2}) == 1);
  CHECK(pick(c, {0, 2}) == 2);
}

TEST_CASE("lfu: a block is admitted once its decayed count reaches the threshold; lru admits all") {
  storage::lfu c({.decay = 0.5, .decay_every = 1, .threshold = 2.0});
  c.resize(2);
  CHECK_FALSE(c.admits(0));  // never hit
  c.touch(0);
  CHECK_FALSE(c.admits(0));
  c.touch(0);
  CHECK(c.admits(0));
  c.end_step();  // 2 -> 1: below the threshold again
  CHECK_FALSE(c.admits(0));
  storage::lru l;
  l.resize(1);
  CHECK(l.admits(0));
}
