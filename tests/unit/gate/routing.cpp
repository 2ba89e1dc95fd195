// Capacity: which routed choices each expert keeps, and how they are numbered.
#include "semoe/gate/routing.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <tuple>

#include "gate_testing.hpp"
#include "semoe/gate/top_k.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

namespace {

// Skewed logits so that a few experts overflow.
std::vector<double> skewed(index_t n, index_t E, unsigned seed) {
  auto x = random_logits(n, E, seed);
  for (index_t t = 0; t < n; ++t) {
    x[t * E + 0] += 2.0;
    x[t * E + 1] += 1.0;
  }
  return x;
}

}  // namespace

TEST_CASE("capacity: drop by position keeps GShard's order (first choices, then earlier tokens)") {
  const index_t n = 37, E = 5, k = 2;
  const auto x = skewed(n, E, 21);
  sg::top_k<2> gate({.capacity_factor = 1.0, .drop = sg::drop_policy::position});
  routing_plan<double> plan;
  gate.route(one_rank(n), view(x, E), plan);
  CHECK(plan.capacity == sg::expert_capacity(1.0, n, k, E));
  CHECK(plan.capacity == 15);  // ceil(37 * 2 / 5)

  // Reference: walk choice-major, then token order; keep while there is room.
  std::vector<index_t> used(E, 0);
  std::vector<bool> keep(n * k);
  for (index_t c = 0; c < k; ++c)
    for (index_t t = 0; t < n; ++t) {
      const auto e = plan.expert[t * k + c];
      keep[t * k + c] = used[e] < plan.capacity;
      used[e] += keep[t * k + c];
    }
  index_t dropped = 0;
  for (index_t a = 0; a < n * k; ++a) {
    CHECK((plan.slot[a] >= 0) == keep[a]);
    dropped += !keep[a];
  }
  CHECK(dropped > 0);
  CHECK(plan.dropped == dropped);
  check_consistent(plan);
}

TEST_CASE("capacity: drop by probability keeps each expert's highest scores") {
  const index_t n = 41, E = 4, k = 2;
  const auto x = skewed(n, E, 22);
  sg::top_k<2> gate({.capacity_factor = 0.8, .drop = sg::drop_policy::probability});
  routing_plan<double> plan;
  gate.route(one_rank(n), view(x, E), plan);
  REQUIRE(plan.capacity == 17);  // ceil(0.8 * 41 * 2 / 4)

  // Reference: per expert, sort by score (ties: GShard position) and keep the first `capacity`.
  std::vector<bool> keep(n * k, false);
  for (index_t e = 0; e < E; ++e) {
    std::vector<std::tuple<float, index_t, index_t>> cand;  // (-score, position, a)
    for (index_t a = 0; a < n * k; ++a)
      if (plan.expert[a] == e) cand.emplace_back(-plan.score[a], (a % k) * n + a / k, a);
    std::sort(cand.begin(), cand.end());
    for (std::size_t i = 0; i < cand.size() && static_cast<index_t>(i) < plan.capacity; ++i)
      keep[std::get<2>(cand[i])] = true;
  }
  index_t dropped = 0;
  for (index_t a = 0; a < n * k; ++a) {
    CHECK((plan.slot[a] >= 0) == keep[a]);
    dropped += !keep[a];
  }
  CHECK(dropped > 0);
  // The scores are the router probabilities.
  for (index_t a = 0; a < n * k; ++a)
    CHECK(plan.score[a] == static_cast<float>(plan.probs[(a / k) * E + plan.expert[a]]));
  check_consistent(plan);
}

TEST_CASE("capacity: dropless keeps every choice; slots follow token order") {
  const index_t n = 30, E = 3;
  const auto x = skewed(n, E, 23);
  for (auto drop : {sg::drop_policy::position, sg::drop_policy::probability}) {
    sg::top_k<2> gate({.dropless = true, .drop = drop});
    routing_plan<double> plan;
    gate.route(one_rank(n), view(x, E), plan);
    CHECK(plan.capacity == 0);
    CHECK(plan.dropped == 0);
    CHECK(plan.kept() == 2 * n);
    std::vector<int> next(E, 0);
    for (index_t a = 0; a < plan.assignments(); ++a) CHECK(plan.slot[a] == next[plan.expert[a]]++);
    check_consistent(plan);
  }
}

TEST_CASE("capacity: a large factor drops nothing, a tiny one keeps one per expert") {
  const index_t n = 16, E = 4;
  const auto x = skewed(n, E, 24);
  routing_plan<double> plan;
  sg::top_k<2>({.capacity_factor = double(E)}).route(one_rank(n), view(x, E), plan);
  CHECK(plan.dropped == 0);
  sg::top_k<2>({.capacity_factor = 1e-6}).route(one_rank(n), view(x, E), plan);
  CHECK(plan.capacity == 1);
  for (index_t e = 0; e < E; ++e) CHECK(plan.counts[e] <= 1);
  check_consistent(plan);
}

TEST_CASE("capacity: expert_capacity rejects a factor <= 0") {
  CHECK(sg::expert_capacity(1.25, 10, 2, 4) == 7);
  CHECK_THROWS_WITH_AS(sg::expert_capacity(0.0, 10, 2, 4), doctest::Contains("capacity_factor = 0"), semoe::error);
  CHECK_THROWS_WITH_AS(sg::expert_capacity(-1.0, 10, 2, 4), doctest::Contains("capacity_factor = -1"), semoe::error);
}
