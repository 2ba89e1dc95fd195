// semoe/placement/task_proportional.hpp: SE-MoE's multi-task placement
// (§3.4). When tasks of different sizes train together, giving each the same
// number of ranks leaves the ranks of small tasks idle while the largest
// task's ranks set the step time. task_proportional() allots ranks in
// proportion to each task's measured load (samples per step x seconds per
// sample, e.g. from layer::load_monitor), at least one rank each, the
// remainder by largest fractional share (ties to the lower task); each task's
// batch is then split over its ranks by task_allotment::slice().
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <span>
#include <utility>
#include <vector>

#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"

namespace semoe::placement {

/// Task t runs on the consecutive ranks [first[t], first[t] + ranks[t]).
struct task_allotment {
  std::vector<int> ranks;
  std::vector<int> first;

  int world() const { return std::accumulate(ranks.begin(), ranks.end(), 0); }
  /// The task `rank` works on.
  int task_of(int rank) const {
    SEMOE_CHECK(rank >= 0 && rank < world(), "semoe::placement::task_allotment: rank ", rank, " outside a world of ",
                world());
    int t = 0;
    while (rank >= first[t] + ranks[t]) ++t;
    return t;
  }
  /// This rank's samples [begin, end) of its task's batch of `batch`: the
  /// task's ranks split it as evenly as whole samples allow, earlier ranks
  /// taking the extra ones.
  std::pair<index_t, index_t> slice(int rank, index_t batch) const {
    const int t = task_of(rank), n = ranks[t], i = rank - first[t];
    const index_t base = batch / n, extra = batch % n;
    const index_t begin = i * base + std::min<index_t>(i, extra);
    return {begin, begin + base + (i < extra ? 1 : 0)};
  }
  /// The step time this allotment gives when task t's `samples[t]` take
  /// `seconds_per_sample[t]` each: its slowest task's share per rank.
  double step_seconds(std::span<const double> samples, std::span<const double> seconds_per_sample) const {
    SEMOE_CHECK(samples.size() == ranks.size() && seconds_per_sample.size() == ranks.size(),
                "semoe::placement::task_allotment::step_seconds: ", samples.size(), " and ",
                seconds_per_sample.size(), " values for ", ranks.size(), " tasks");
    double worst = 0;
    for (std::size_t t = 0; t < ranks.size(); ++t)
      worst = std::max(worst, samples[t] * seconds_per_sample[t] / ranks[t]);
    return worst;
  }
};

namespace detail {
inline task_allotment from_counts(std::vector<int> ranks) {
  task_allotment a{std::move(ranks), {}};
  a.first.resize(a.ranks.size());
  std::exclusive_scan(a.ranks.begin(), a.ranks.end(), a.first.begin(), 0);
  return a;
}
inline void check_world(std::size_t tasks, int world, const char* who) {
  SEMOE_CHECK(tasks >= 1 && world >= static_cast<int>(tasks), "semoe::placement::", who, ": ", tasks,
              " tasks on ", world, " ranks: every task needs at least one rank");
}
}  // namespace detail

/// The same number of ranks per task (the first world % tasks get one more):
/// the baseline task_proportional is measured against.
inline task_allotment equal_allotment(int tasks, int world) {
  detail::check_world(static_cast<std::size_t>(std::max(tasks, 0)), world, "equal_allotment");
  std::vector<int> r(static_cast<std::size_t>(tasks), world / tasks);
  for (int t = 0; t < world % tasks; ++t) ++r[static_cast<std::size_t>(t)];
  return detail::from_counts(std::move(r));
}

/// Ranks in proportion to `load` (one value per task, > 0), at least one each.
inline task_allotment task_proportional(std::span<const double> load, int world) {
  detail::check_world(load.size(), world, "task_proportional");
  for (std::size_t t = 0; t < load.size(); ++t)
    SEMOE_CHECK(std::isfinite(load[t]) && load[t] > 0, "semoe::placement::task_proportional: load[", t, "] = ",
                load[t], ": expected a finite value > 0");
  const double total = std::accumulate(load.begin(), load.end(), 0.0);
  const std::size_t T = load.size();
  // Each task's exact share of the ranks left after the guaranteed one each.
  const int spare = world - static_cast<int>(T);
  std::vector<int> r(T, 1);
  std::vector<double> frac(T);
  int given = 0;
  for (std::size_t t = 0; t < T; ++t) {
    const double exact = static_cast<double>(world) * load[t] / total - 1.0;  // beyond its first rank
    const int whole = std::clamp(static_cast<int>(std::floor(exact)), 0, spare);
    r[t] += whole;
    given += whole;
    frac[t] = exact - whole;
  }
  // Exact shares below one rank were rounded up to one: take those ranks
  // back from the tasks with the smallest fractions, then hand out the rest
  // by largest fraction.
  std::vector<std::size_t> order(T);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return frac[a] > frac[b]; });
  while (given > spare)
    for (auto it = order.rbegin(); given > spare && it != order.rend(); ++it)
      if (r[*it] > 1) {
        --r[*it];
        --given;
      }
  for (std::size_t i = 0; given < spare; i = (i + 1) % T, ++given) ++r[order[i]];
  return detail::from_counts(std::move(r));
}

}  // namespace semoe::placement
