#include "semoe/gate/switch.hpp"

#include <doctest/doctest.h>

#include "gate_testing.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

TEST_CASE_TEMPLATE("switch_gate matches a dense reference: argmax, weight = probability", T, float, double) {
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  const index_t n = 33, E = 6;
  const auto x = random_logits<T>(n, E, 31);
  const std::vector<double> xd(x.begin(), x.end());
  sg::switch_gate gate({.dropless = true, .aux_loss_coef = 0.02, .z_loss_coef = 0.003});
  routing_plan<T> plan;
  gate.route(one_rank(n), view(x, E), plan);

  dense_softmax s(xd, n, E);
  std::vector<double> counted(E, 0);
  for (index_t t = 0; t < n; ++t) {
    index_t best = 0;
    for (index_t e = 1; e < E; ++e)
      if (s(t, e, E) > s(t, best, E)) best = e;
    counted[best] += 1;
    CHECK(plan.expert[t] == best);
    CHECK(static_cast<double>(plan.weight[t]) == doctest::Approx(s(t, best, E)).epsilon(tol));
  }
  CHECK(static_cast<double>(plan.balance_loss) ==
        doctest::Approx(ref_balance_loss(s, counted, n, E, 1, 0.02)).epsilon(tol));
  CHECK(static_cast<double>(plan.z_loss) == doctest::Approx(ref_z_loss(s, 0.003)).epsilon(tol));
  check_consistent(plan);
}

TEST_CASE("switch_gate: backward matches finite differences") {
  const index_t n = 14, E = 5;
  const auto x = random_logits(n, E, 32);
  SUBCASE("dropless") {
    check_gradient(sg::switch_gate({.dropless = true, .aux_loss_coef = 0.05, .z_loss_coef = 0.01}), x, E, one_rank(n));
  }
  SUBCASE("with capacity drops") {
    sg::switch_gate gate({.capacity_factor = 0.5, .aux_loss_coef = 0.05, .z_loss_coef = 0.01});
    routing_plan<double> plan;
    gate.route(one_rank(n), view(x, E), plan);
    CHECK(plan.dropped > 0);
    check_gradient(gate, x, E, one_rank(n));
  }
}

TEST_CASE("switch_gate: input jitter is the layer's, sized by options.jitter_eps") {
  static_assert(sg::jittered_gate<sg::switch_gate>);
  CHECK(sg::switch_gate().input_jitter() == doctest::Approx(1e-2));
  CHECK(sg::switch_gate({.jitter_eps = 0.1}).input_jitter() == doctest::Approx(0.1));
  CHECK(sg::switch_gate({.jitter_eps = 0}).input_jitter() == 0.0f);
  CHECK_THROWS_WITH_AS(sg::switch_gate({.jitter_eps = 1.0}), doctest::Contains("options.jitter_eps = 1"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(sg::switch_gate::validate({.jitter_eps = -0.5}), doctest::Contains("jitter_eps = -0.5"),
                       semoe::error);
}

TEST_CASE("switch_gate: capacity is ceil(factor * tokens / experts)") {
  const index_t n = 50, E = 8;
  const auto x = random_logits(n, E, 33);
  routing_plan<double> plan;
  sg::switch_gate({.capacity_factor = 1.25}).route(one_rank(n), view(x, E), plan);
  CHECK(plan.capacity == 8);  // ceil(1.25 * 50 / 8)
  for (index_t e = 0; e < E; ++e) CHECK(plan.counts[e] <= 8);
  check_consistent(plan);
}
