#include "semoe/core/random.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <set>

using semoe::philox;
using words = philox::result_type;

namespace {

/// Random123 names its inputs ctr = {c0, c1, c2, c3}, key = {k0, k1}; philox
/// takes seed = k1:k0, counter = c1:c0 and stream = c3:c2.
words random123(words ctr, std::array<std::uint32_t, 2> key) {
  auto join = [](std::uint32_t lo, std::uint32_t hi) { return std::uint64_t{hi} << 32 | lo; };
  return philox(join(key[0], key[1]), join(ctr[2], ctr[3]))(join(ctr[0], ctr[1]));
}

}  // namespace

TEST_CASE("philox: Random123 known-answer vectors for philox4x32-10") {
  CHECK(random123({0, 0, 0, 0}, {0, 0}) == words{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8});
  CHECK(random123({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}) ==
        words{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd});
  CHECK(random123({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}) ==
        words{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1});
  // Usable at compile time, so the same function serves kernels and constants.
  static_assert(philox(0)(0)[0] == 0x6627e8d5u);
}

TEST_CASE("philox: a draw is a pure function of (seed, stream, counter)") {
  const philox a(42, 7), b(42, 7);
  CHECK(a(123) == a(123));
  CHECK(a(123) == b(123));
  CHECK(a(123) != a(124));
  CHECK(a(123) != philox(42, 8)(123));
  CHECK(a(123) != philox(43, 7)(123));
  // High halves matter too.
  CHECK(a(123) != a(123 + (std::uint64_t{1} << 32)));
  CHECK(a(123) != philox(42 + (std::uint64_t{1} << 32), 7)(123));
  CHECK(a(123) != philox(42, 7 + (std::uint64_t{1} << 32))(123));
  CHECK(philox(5)(9) == philox(5, 0)(9));

  // No collisions among a few thousand words from nearby inputs.
  std::set<std::uint32_t> seen;
  for (std::uint64_t s = 0; s < 4; ++s)
    for (std::uint64_t c = 0; c < 256; ++c)
      for (auto w : philox(1, s)(c)) seen.insert(w);
  CHECK(seen.size() == 4 * 256 * 4);
}

TEST_CASE("philox::uniform: inside (0, 1) with mean 1/2, lanes are the four words") {
  const philox rng(2024, 3);
  const int n = 100000;
  double sum = 0, sum_sq = 0;
  for (int i = 0; i < n; ++i) {
    const float u = rng.uniform(static_cast<std::uint64_t>(i), i % 4);
    REQUIRE(u > 0.0f);
    REQUIRE(u < 1.0f);
    sum += u;
    sum_sq += double(u) * u;
  }
  const double mean = sum / n;
  CHECK(std::abs(mean - 0.5) < 0.01);              // sd of the mean is 0.0009
  CHECK(std::abs(sum_sq / n - mean * mean - 1.0 / 12) < 0.005);
  for (int lane = 0; lane < 4; ++lane) CHECK(rng.uniform(77, lane) == philox::to_unit(rng(77)[lane]));
}

TEST_CASE("philox::to_unit: the extreme words map strictly inside (0, 1)") {
  // A generator's (0, 1) must hold for every word, not just likely ones:
  // -log(u) and log(1 - u) (Gumbel, exponential noise) need both ends open.
  for (std::uint32_t x : {0u, 1u, 0xffu, 0x100u, 0x7fffffffu, 0x80000000u, 0xfffffe00u, 0xffffff00u, 0xffffffffu}) {
    CAPTURE(x);
    const float u = philox::to_unit(x);
    CHECK(u > 0.0f);
    CHECK(u < 1.0f);
    CHECK(std::isfinite(std::log(1.0f - u)));
    CHECK(std::isfinite(std::log(u)));
  }
  CHECK(philox::to_unit(0) < philox::to_unit(0xffffffffu));
  CHECK(philox::to_unit(0xffffffffu) == 1.0f - philox::to_unit(0));  // symmetric about 1/2
  CHECK(philox::to_unit(0x80000000u) == doctest::Approx(0.5).epsilon(1e-6));
}

TEST_CASE("philox::normal: finite, mean 0 and variance 1") {
  const philox rng(99, 1);
  const int n = 100000;
  double sum = 0, sum_sq = 0;
  for (int i = 0; i < n; ++i) {
    const float z = rng.normal(static_cast<std::uint64_t>(i));
    REQUIRE(std::isfinite(z));
    sum += z;
    sum_sq += double(z) * z;
  }
  const double mean = sum / n, var = sum_sq / n - mean * mean;
  CHECK(std::abs(mean) < 0.02);  // sd of the mean is 0.003
  CHECK(std::abs(var - 1) < 0.03);
  CHECK(rng.normal(5) == rng.normal(5));
}
