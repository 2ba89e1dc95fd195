#include "semoe/gate/balance.hpp"

#include <doctest/doctest.h>

#include <algorithm>

#include "gate_testing.hpp"
#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

TEST_CASE("aux_free_bias: bias_e += rate * sign(mean load - load_e) over the loads since the last update") {
  sg::aux_free_bias b;
  CHECK(b[3] == 0.0);
  b.update(0.1);  // nothing recorded: no change
  CHECK(b.values().empty());
  const std::vector<double> l1 = {3, 1, 2}, l2 = {1, 0, 2};
  b.record(l1);
  b.record(l2);  // two micro-batches of one step: {4, 1, 4}, mean 3
  b.update(0.1);
  REQUIRE(b.values().size() == 3);
  CHECK(b[0] == doctest::Approx(-0.1));
  CHECK(b[1] == doctest::Approx(0.1));
  CHECK(b[2] == doctest::Approx(-0.1));
  b.update(0.1);  // loads were consumed
  CHECK(b[1] == doctest::Approx(0.1));
  const std::vector<double> eq = {2, 2, 2};
  b.record(eq);
  b.update(0.1);  // sign(0) = 0
  CHECK(b[0] == doctest::Approx(-0.1));
}

TEST_CASE("aux-free balancing: repeated end_step moves a skewed load toward uniform") {
  const index_t n = 400, E = 4;
  auto x = random_logits(n, E, 81, 0.5);
  for (index_t t = 0; t < n; ++t) x[t * E] += 1.5;  // expert 0 is favoured
  sg::top_k<1> gate({.dropless = true, .balance = sg::balance_mode::aux_free, .z_loss_coef = 0, .bias_rate = 0.005});
  auto imbalance = [&](const routing_plan<double>& p) {
    std::vector<double> load(E, 0);
    for (index_t a = 0; a < p.assignments(); ++a) load[p.expert[a]] += 1;
    return *std::max_element(load.begin(), load.end()) / (double(n) / E);
  };
  routing_plan<double> plan;
  gate.route(one_rank(n), view(x, E), plan);
  const double before = imbalance(plan);
  double late = 0;
  for (int step = 0; step < 200; ++step) {
    gate.end_step(one_rank(n));
    gate.route(one_rank(n), view(x, E), plan);
    if (step >= 180) late = std::max(late, imbalance(plan));
  }
  INFO("max load / mean load: before " << before << ", over the last 20 steps at most " << late);
  CHECK(before > 2.0);
  CHECK(late < 1.25);
  CHECK(gate.bias()[0] < 0);
  CHECK(plan.balance_loss == 0.0);
  // Selection is biased, weights are not: still the router probabilities.
  for (index_t t = 0; t < n; ++t) CHECK(plan.weight[t] == plan.probs[t * E + plan.expert[t]]);

  SUBCASE("evaluation routes do not move the bias") {
    const std::vector<double> saved(gate.bias().values().begin(), gate.bias().values().end());
    gate.end_step(one_rank(n));  // consume the last training route
    const std::vector<double> after_train(gate.bias().values().begin(), gate.bias().values().end());
    gate.route(one_rank(n, /*training=*/false), view(x, E), plan);
    gate.end_step(one_rank(n));
    for (index_t e = 0; e < E; ++e) CHECK(gate.bias()[e] == after_train[e]);
    CHECK(saved.size() == after_train.size());
  }
}

TEST_CASE("aux loss: exactly balanced routing costs aux_loss_coef") {
  const index_t n = 24, E = 4;
  std::vector<double> x(n * E, 0.0);
  for (index_t t = 0; t < n; ++t) x[t * E + t % E] = 2.0;  // f_e = P_e = 1 / E
  routing_plan<double> plan;
  sg::switch_gate({.dropless = true, .aux_loss_coef = 0.07, .z_loss_coef = 0}).route(one_rank(n), view(x, E), plan);
  CHECK(plan.balance_loss == doctest::Approx(0.07));
  CHECK(plan.z_loss == 0.0);
  // All tokens on one expert: f_0 = 1, loss = coef * E * P_0 > coef.
  std::vector<double> y(n * E, 0.0);
  for (index_t t = 0; t < n; ++t) y[t * E] = 2.0;
  sg::switch_gate({.dropless = true, .aux_loss_coef = 0.07, .z_loss_coef = 0}).route(one_rank(n), view(y, E), plan);
  const double p0 = std::exp(2.0) / (std::exp(2.0) + 3);
  CHECK(plan.balance_loss == doctest::Approx(0.07 * E * p0));
}

TEST_CASE("z-loss and aux loss each have an exact gradient") {
  const index_t n = 10, E = 5;
  const auto x = random_logits(n, E, 82, 3.0);
  SUBCASE("z-loss only") {
    check_gradient(sg::top_k<2>({.dropless = true, .balance = sg::balance_mode::none, .z_loss_coef = 0.1}), x, E,
                   one_rank(n));
  }
  SUBCASE("aux loss only") {
    check_gradient(sg::top_k<2>({.dropless = true, .aux_loss_coef = 0.3, .z_loss_coef = 0}), x, E, one_rank(n));
  }
}

TEST_CASE("balance_mode::none without a z-loss needs no collective and costs nothing") {
  const index_t n = 8, E = 4;
  const auto x = random_logits(n, E, 83);
  int calls = 0;
  auto ctx = one_rank(n);
  ctx.all_reduce_sum = [&](std::span<double>) { ++calls; };
  routing_plan<double> plan;
  sg::top_k<2>({.dropless = true, .balance = sg::balance_mode::none, .z_loss_coef = 0}).route(ctx, view(x, E), plan);
  CHECK(calls == 0);
  CHECK(plan.aux_loss() == 0.0);
  sg::top_k<2>({.dropless = true}).route(ctx, view(x, E), plan);
  CHECK(calls == 1);  // aux and z share one all-reduce
  CHECK(plan.balance_loss > 0.0);
  CHECK(plan.z_loss > 0.0);
}

TEST_CASE("balance options are validated") {
  CHECK_THROWS_WITH_AS(sg::top_k<2>({.aux_loss_coef = -1}), doctest::Contains("options.aux_loss_coef = -1"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(sg::top_k<2>({.z_loss_coef = NAN}), doctest::Contains("options.z_loss_coef = nan"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(sg::top_k<2>({.bias_rate = -0.1}), doctest::Contains("options.bias_rate = -0.1"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(sg::top_k<2>({.balance = static_cast<sg::balance_mode>(7)}),
                       doctest::Contains("options.balance = 7"), semoe::error);
}
