// Multi-task placement: ranks in proportion to measured load, each task's
// batch split over its ranks without losing or repeating a sample.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "semoe/placement/task_proportional.hpp"

using namespace semoe;

namespace {
std::vector<int> allot(std::vector<double> load, int world) {
  return placement::task_proportional(std::span<const double>(load), world).ranks;
}
}  // namespace

TEST_CASE("task_proportional: SE-MoE's case, 4 tasks of batch 512/256/128/128 on 8 ranks get 4/2/1/1") {
  const std::vector<double> batch{512, 256, 128, 128}, per_sample{1e-3, 1e-3, 1e-3, 1e-3};
  std::vector<double> load(4);
  for (std::size_t t = 0; t < 4; ++t) load[t] = batch[t] * per_sample[t];
  const auto a = placement::task_proportional(std::span<const double>(load), 8);
  CHECK(a.ranks == std::vector<int>{4, 2, 1, 1});
  CHECK(a.first == std::vector<int>{0, 4, 6, 7});
  // The step time it projects against two ranks per task: 128 vs 256 samples per rank.
  const auto equal = placement::equal_allotment(4, 8);
  CHECK(equal.ranks == std::vector<int>{2, 2, 2, 2});
  CHECK(a.step_seconds(batch, per_sample) == doctest::Approx(0.128));
  CHECK(equal.step_seconds(batch, per_sample) == doctest::Approx(0.256));
}

TEST_CASE("task_proportional: every task keeps a rank; the remainder goes by largest share, ties to the lower task") {
  CHECK(allot({1, 1, 1}, 8) == std::vector<int>{3, 3, 2});
  CHECK(allot({100, 1}, 4) == std::vector<int>{3, 1});
  CHECK(allot({10, 10, 1, 1, 1, 1}, 8) == std::vector<int>{2, 2, 1, 1, 1, 1});
  CHECK(allot({1, 1, 1, 1, 100}, 5) == std::vector<int>{1, 1, 1, 1, 1});
  CHECK(allot({3, 1}, 1 + 1) == std::vector<int>{1, 1});
  CHECK(allot({1, 2}, 7) == std::vector<int>{2, 5});  // exact 2.33 / 4.67
  for (int world = 4; world <= 64; ++world) {  // the sum is always the world
    const auto r = allot({7, 0.5, 3, 0.01}, world);
    int sum = 0;
    for (int v : r) sum += v;
    CHECK(sum == world);
  }
}

TEST_CASE("task_allotment: each task's batch is split over its ranks, every sample once") {
  const auto a = placement::task_proportional(std::vector<double>{5, 2, 1}, 8);  // 5 / 2 / 1
  REQUIRE(a.ranks == std::vector<int>{5, 2, 1});
  CHECK(a.task_of(0) == 0);
  CHECK(a.task_of(4) == 0);
  CHECK(a.task_of(5) == 1);
  CHECK(a.task_of(7) == 2);
  for (const index_t batch : {0, 1, 4, 13, 512}) {
    std::vector<int> seen(static_cast<std::size_t>(batch), 0);
    index_t expect_begin = 0;
    for (int r = a.first[0]; r < a.first[0] + a.ranks[0]; ++r) {
      const auto [b, e] = a.slice(r, batch);
      CHECK(b == expect_begin);
      CHECK(e - b <= batch / 5 + 1);
      for (index_t i = b; i < e; ++i) ++seen[static_cast<std::size_t>(i)];
      expect_begin = e;
    }
    CHECK(expect_begin == batch);
    for (int s : seen) CHECK(s == 1);
  }
  CHECK(a.slice(7, 10) == std::pair<index_t, index_t>{0, 10});  // task 2's only rank takes it all
}

TEST_CASE("task_proportional: bad input is an error naming it") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH_AS(allot({1, 2, 3}, 2), doctest::Contains("3 tasks on 2 ranks"), error);
  CHECK_THROWS_WITH_AS(allot({}, 2), doctest::Contains("0 tasks"), error);
  CHECK_THROWS_WITH_AS(allot({1, 0}, 4), doctest::Contains("load[1] = 0"), error);
  CHECK_THROWS_WITH_AS(allot({nan, 1}, 4), doctest::Contains("load[0]"), error);
  CHECK_THROWS_WITH_AS(placement::equal_allotment(4, 3), doctest::Contains("4 tasks on 3 ranks"), error);
  const auto a = placement::equal_allotment(2, 4);
  CHECK_THROWS_WITH_AS(a.task_of(4), doctest::Contains("rank 4 outside a world of 4"), error);
}
