#include "semoe/gate/expert_choice.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <tuple>

#include "gate_testing.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

TEST_CASE_TEMPLATE("expert_choice matches a dense reference: each expert takes its top-C tokens", T, float, double) {
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  const index_t n = 30, E = 5;
  const auto x = random_logits<T>(n, E, 61);
  const std::vector<double> xd(x.begin(), x.end());
  sg::expert_choice gate({.capacity_factor = 1.5, .z_loss_coef = 0.003});
  CHECK(gate.choices(E) == E);
  routing_plan<T> plan;
  gate.route(one_rank(n), view(x, E), plan);
  const index_t C = 9;  // ceil(1.5 * 30 / 5)
  CHECK(plan.capacity == C);
  CHECK(plan.k == E);

  dense_softmax s(xd, n, E);
  for (index_t e = 0; e < E; ++e) {
    // Rank tokens by the score the gate ranks by (float), ties by token.
    std::vector<std::tuple<float, index_t>> cand;
    for (index_t t = 0; t < n; ++t) cand.emplace_back(-static_cast<float>(plan.probs[t * E + e]), t);
    std::sort(cand.begin(), cand.end());
    std::vector<bool> chosen(n, false);
    for (index_t i = 0; i < C; ++i) chosen[std::get<1>(cand[i])] = true;
    for (index_t t = 0; t < n; ++t) {
      const index_t a = t * E + e;
      CHECK(plan.expert[a] == (chosen[t] ? e : -1));
      CHECK((plan.slot[a] >= 0) == chosen[t]);
      CHECK(static_cast<double>(plan.weight[a]) == doctest::Approx(s(t, e, E)).epsilon(tol));
    }
    CHECK(plan.counts[e] == C);
  }
  CHECK(plan.dropped == 0);
  CHECK(plan.balance_loss == T(0));
  CHECK(static_cast<double>(plan.z_loss) == doctest::Approx(ref_z_loss(s, 0.003)).epsilon(tol));
  check_consistent(plan);
}

TEST_CASE("expert_choice: backward matches finite differences") {
  const index_t n = 12, E = 4;
  const auto x = random_logits(n, E, 62);
  check_gradient(sg::expert_choice({.capacity_factor = 1.0, .z_loss_coef = 0.01}), x, E, one_rank(n));
  SUBCASE("without z-loss") { check_gradient(sg::expert_choice({.z_loss_coef = 0}), x, E, one_rank(n)); }
}

TEST_CASE("expert_choice: a capacity of all tokens routes every token to every expert") {
  const index_t n = 6, E = 3;
  const auto x = random_logits(n, E, 63);
  routing_plan<double> plan;
  sg::expert_choice({.capacity_factor = 3.0}).route(one_rank(n), view(x, E), plan);
  CHECK(plan.kept() == n * E);
  for (index_t a = 0; a < n * E; ++a) CHECK(plan.expert[a] == a % E);
}

TEST_CASE("expert_choice: options that contradict expert choice are rejected") {
  CHECK_THROWS_WITH_AS(sg::expert_choice({.dropless = true}), doctest::Contains("options.dropless = true"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(sg::expert_choice({.drop = sg::drop_policy::position}),
                       doctest::Contains("options.drop = position"), semoe::error);
  CHECK_THROWS_WITH_AS(sg::expert_choice({.balance = sg::balance_mode::aux_loss}),
                       doctest::Contains("balanced by construction"), semoe::error);
  CHECK_THROWS_WITH_AS(sg::expert_choice({.aux_loss_coef = 0.01}), doctest::Contains("aux_loss_coef = 0.01"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(sg::expert_choice({.capacity_factor = 0}), doctest::Contains("capacity_factor = 0"),
                       semoe::error);
}
