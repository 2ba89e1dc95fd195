#include "semoe/gate/gshard.hpp"

#include <doctest/doctest.h>

#include <algorithm>

#include "gate_testing.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

namespace {

// Dense reference of the deterministic part: top-2 by probability, weights
// normalized over the two, balance loss over first choices.
struct ref_top2 {
  std::vector<int> e1, e2;
  std::vector<double> w1, w2;
  double balance = 0, z = 0;
  ref_top2(const std::vector<double>& x, index_t E, double aux, double zc) {
    const index_t n = static_cast<index_t>(x.size()) / E;
    dense_softmax s(x, n, E);
    std::vector<double> first(E, 0);
    for (index_t t = 0; t < n; ++t) {
      int a = 0;
      for (int e = 1; e < E; ++e)
        if (s(t, e, E) > s(t, a, E)) a = e;
      int b = a == 0 ? 1 : 0;
      for (int e = 0; e < E; ++e)
        if (e != a && s(t, e, E) > s(t, b, E)) b = e;
      const double sum = s(t, a, E) + s(t, b, E);
      e1.push_back(a), e2.push_back(b);
      w1.push_back(s(t, a, E) / sum), w2.push_back(s(t, b, E) / sum);
      first[a] += 1;
    }
    balance = ref_balance_loss(s, first, n, E, 1, aux);
    z = ref_z_loss(s, zc);
  }
};

}  // namespace

TEST_CASE_TEMPLATE("gshard matches a dense reference in evaluation (both experts routed)", T, float, double) {
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  const index_t n = 31, E = 6;
  const auto x = random_logits<T>(n, E, 41);
  const std::vector<double> xd(x.begin(), x.end());
  sg::gshard gate({.dropless = true, .aux_loss_coef = 0.04, .z_loss_coef = 0.002});
  routing_plan<T> plan;
  gate.route(one_rank(n, /*training=*/false), view(x, E), plan);
  const ref_top2 ref(xd, E, 0.04, 0.002);
  for (index_t t = 0; t < n; ++t) {
    CHECK(plan.expert[2 * t] == ref.e1[t]);
    CHECK(plan.expert[2 * t + 1] == ref.e2[t]);
    CHECK(static_cast<double>(plan.weight[2 * t]) == doctest::Approx(ref.w1[t]).epsilon(tol));
    CHECK(static_cast<double>(plan.weight[2 * t + 1]) == doctest::Approx(ref.w2[t]).epsilon(tol));
  }
  CHECK(static_cast<double>(plan.balance_loss) == doctest::Approx(ref.balance).epsilon(tol));
  CHECK(static_cast<double>(plan.z_loss) == doctest::Approx(ref.z).epsilon(tol));
  check_consistent(plan);
}

TEST_CASE("gshard: random routing sends the 2nd expert with probability 2 * w2") {
  const index_t n = 6000, E = 8;
  const auto x = random_logits(n, E, 42, 0.8);
  sg::gshard gate({.dropless = true});
  routing_plan<double> plan;
  gate.route(one_rank(n, true, 5, 1), view(x, E), plan);
  const ref_top2 ref(x, E, 0, 0);
  double expected = 0;
  index_t routed = 0;
  for (index_t t = 0; t < n; ++t) {
    expected += std::min(1.0, 2 * ref.w2[t]);
    CHECK(plan.expert[2 * t] == ref.e1[t]);  // the first is always routed
    CHECK(plan.weight[2 * t] == doctest::Approx(ref.w1[t]));  // still normalized with p2
    if (plan.expert[2 * t + 1] >= 0) {
      ++routed;
      CHECK(plan.expert[2 * t + 1] == ref.e2[t]);
      CHECK(plan.weight[2 * t + 1] == doctest::Approx(ref.w2[t]));
    } else {
      CHECK(plan.weight[2 * t + 1] == 0.0);
      CHECK(plan.slot[2 * t + 1] == -1);
    }
  }
  expected /= double(n);
  const double frac = double(routed) / double(n);
  INFO("routed fraction " << frac << ", expected " << expected);
  CHECK(frac < 0.98);
  CHECK(std::abs(frac - expected) < 0.03);  // ~5 standard deviations
  CHECK(plan.dropped == 0);
  check_consistent(plan);

  SUBCASE("the draw depends on seed and step, not on the call") {
    routing_plan<double> again, next;
    sg::gshard(gate.opts()).route(one_rank(n, true, 5, 1), view(x, E), again);
    sg::gshard(gate.opts()).route(one_rank(n, true, 5, 2), view(x, E), next);
    index_t differ = 0;
    for (index_t a = 0; a < plan.assignments(); ++a) {
      CHECK(again.expert[a] == plan.expert[a]);
      differ += next.expert[a] != plan.expert[a];
    }
    CHECK(differ > 100);
  }
  SUBCASE("off: every 2nd expert is routed") {
    routing_plan<double> all;
    sg::gshard({.dropless = true, .random_routing = false}).route(one_rank(n), view(x, E), all);
    for (index_t t = 0; t < n; ++t) CHECK(all.expert[2 * t + 1] == ref.e2[t]);
  }
}

TEST_CASE("gshard: backward matches finite differences, with unrouted 2nd experts and drops") {
  const index_t n = 16, E = 5;
  const auto x = random_logits(n, E, 43, 0.7);
  sg::gshard gate({.capacity_factor = 0.7, .aux_loss_coef = 0.05, .z_loss_coef = 0.01});
  routing_plan<double> plan;
  gate.route(one_rank(n), view(x, E), plan);
  index_t unrouted = 0;
  for (index_t t = 0; t < n; ++t) unrouted += plan.expert[2 * t + 1] < 0;
  CHECK(unrouted > 0);
  CHECK(plan.dropped > 0);
  check_gradient(gate, x, E, one_rank(n));
  SUBCASE("evaluation") { check_gradient(gate, x, E, one_rank(n, false)); }
}

TEST_CASE("gshard: position drops keep all first choices before any second choice") {
  const index_t n = 40, E = 4;
  auto x = random_logits(n, E, 44);
  for (index_t t = 0; t < n; ++t) x[t * E + 1] += 3;  // expert 1 is everyone's favourite
  sg::gshard gate({.capacity_factor = 1.0, .random_routing = false});
  routing_plan<double> plan;
  gate.route(one_rank(n), view(x, E), plan);
  CHECK(plan.capacity == 20);
  index_t first_kept = 0;
  for (index_t t = 0; t < n; ++t)
    if (plan.expert[2 * t] == 1) first_kept += plan.slot[2 * t] >= 0;
  CHECK(first_kept == 20);  // 20 first choices fill it: no second choice gets expert 1
  for (index_t t = 0; t < n; ++t)
    if (plan.expert[2 * t + 1] == 1) CHECK(plan.slot[2 * t + 1] == -1);
  check_consistent(plan);
}
