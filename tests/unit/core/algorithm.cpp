// The routing primitives of algo::engine on the host executors, against
// plain definitions: histogram, exclusive sum (in place too) and the stable
// sort by key that numbers the rows of each expert in token order.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "semoe/core/algorithm.hpp"

using semoe::index_t;

namespace {

template <class Exec>
void check_engine(Exec& ex) {
  std::mt19937 rng(5);
  const index_t n = 5000;
  const int bins = 9;
  std::vector<std::uint32_t> v(n);
  for (auto& x : v) x = rng() % (bins + 3);  // some values past the last bin

  std::vector<std::int32_t> counts(bins, -1), want(bins, 0);
  for (auto x : v)
    if (x < static_cast<std::uint32_t>(bins)) ++want[x];
  semoe::algo::histogram(ex, v.data(), n, counts.data(), bins);
  CHECK(counts == want);

  std::vector<std::int32_t> sum(bins);
  semoe::algo::exclusive_sum(ex, counts.data(), sum.data(), bins);
  std::int32_t acc = 0;
  for (int b = 0; b < bins; ++b) {
    CHECK(sum[b] == acc);
    acc += counts[b];
  }
  semoe::algo::exclusive_sum(ex, counts.data(), counts.data(), bins);  // in place
  CHECK(counts == sum);

  // Keys use bits [0, end_bit) only: 2^end_bit + k sorts as k. Equal keys
  // keep input order. Narrow keys take the counting sort, wide ones
  // std::stable_sort.
  for (int end_bit : {4, 20}) {
    CAPTURE(end_bit);
    const std::uint32_t mask = (1u << end_bit) - 1u;
    std::vector<std::uint32_t> keys(n), keys_out(n);
    std::vector<std::int32_t> vals(n), vals_out(n);
    for (index_t i = 0; i < n; ++i) {
      keys[i] = static_cast<std::uint32_t>(rng() % (end_bit == 4 ? 10 : 700000)) + (i % 3 == 0 ? mask + 1 : 0u);
      vals[i] = static_cast<std::int32_t>(i);
    }
    semoe::algo::sort_pairs(ex, keys.data(), keys_out.data(), vals.data(), vals_out.data(), n, end_bit);
    for (index_t i = 0; i < n; ++i) CHECK(keys_out[i] == keys[vals_out[i]]);
    for (index_t i = 1; i < n; ++i) {
      const auto a = keys_out[i - 1] & mask, b = keys_out[i] & mask;
      REQUIRE(a <= b);
      if (a == b) REQUIRE(vals_out[i - 1] < vals_out[i]);
    }
  }
}

}  // namespace

TEST_CASE("algo: histogram, exclusive sum and stable sort on the sequential executor") {
  semoe::sequential_executor ex;
  check_engine(ex);
}

TEST_CASE("algo: the same on the cpu pool") {
  semoe::cpu_executor ex({.threads = 2});
  check_engine(ex);
}

TEST_CASE("algo: bad sizes are named") {
  semoe::sequential_executor ex;
  std::uint32_t v = 0;
  std::int32_t c = 0;
  CHECK_THROWS_WITH_AS(semoe::algo::histogram(ex, &v, 1, &c, 0), doctest::Contains("bins = 0"), semoe::error);
  CHECK_THROWS_WITH_AS(semoe::algo::sort_pairs(ex, &v, &v, &c, &c, 1, 33), doctest::Contains("end_bit = 33"),
                       semoe::error);
}
