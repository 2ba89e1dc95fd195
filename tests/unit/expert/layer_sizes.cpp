// The layer writes its sizes into an expert's options field by field: an
// expert with its own second width keeps it, a conflicting value is refused.
#include <doctest/doctest.h>

#include "semoe/expert/concepts.hpp"
#include "semoe/expert/ffn.hpp"

using namespace semoe;

namespace {
struct low_rank_options {
  index_t hidden = 0;
  index_t rank = 4;  // not `ffn`: the expert's own width
};
}  // namespace

TEST_CASE("expert options get the layer's hidden and ffn where they have those fields") {
  const auto lr = expert::with_layer_sizes(low_rank_options{}, 32, 128);
  CHECK(lr.hidden == 32);
  CHECK(lr.rank == 4);
  const auto f = expert::with_layer_sizes(expert::ffn<>::options{}, 32, 128);
  CHECK(f.hidden == 32);
  CHECK(f.ffn == 128);
  // The same values set by hand are fine; others are an error naming both.
  CHECK(expert::with_layer_sizes(expert::ffn<>::options{.hidden = 32, .ffn = 128}, 32, 128).ffn == 128);
  CHECK_THROWS_WITH_AS(expert::with_layer_sizes(low_rank_options{.hidden = 16}, 32, 128),
                       doctest::Contains("options.expert.hidden = 16 but the layer's hidden = 32"), semoe::error);
  CHECK_THROWS_WITH_AS(expert::with_layer_sizes(expert::ffn<>::options{.ffn = 64}, 32, 128),
                       doctest::Contains("options.expert.ffn = 64 but the layer's ffn = 128"), semoe::error);
}
