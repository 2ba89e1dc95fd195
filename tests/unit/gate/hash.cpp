#include "semoe/gate/hash.hpp"

#include <doctest/doctest.h>

#include "gate_testing.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

TEST_CASE_TEMPLATE("hash_gate routes by a fixed hash of the token key with weight 1", T, float, double) {
  const index_t n = 4000, E = 8;
  const std::vector<T> x(n * E, T(0.5));
  sg::hash_gate gate({.dropless = true});
  routing_plan<T> plan;
  gate.route(one_rank(n), view(x, E), plan);
  std::vector<index_t> load(E, 0);
  for (index_t t = 0; t < n; ++t) {
    CHECK(plan.expert[t] == gate.expert_of(t, E));  // no keys: the global token index
    CHECK(plan.weight[t] == T(1));
    ++load[plan.expert[t]];
  }
  for (index_t e = 0; e < E; ++e) CHECK(std::abs(double(load[e]) - n / E) < 0.15 * n / E);
  CHECK(plan.balance_loss == T(0));
  CHECK(plan.z_loss == T(0));
  check_consistent(plan);

  // The same key meets the same expert wherever it stands; another seed is another map.
  std::vector<std::int64_t> keys(n);
  for (index_t t = 0; t < n; ++t) keys[t] = (t * 7919) % 97;
  auto ctx = one_rank(n);
  ctx.token_keys = keys;
  gate.route(ctx, view(x, E), plan);
  index_t differ = 0;
  for (index_t t = 0; t < n; ++t) {
    CHECK(plan.expert[t] == gate.expert_of(keys[t], E));
    differ += plan.expert[t] != sg::hash_gate({.seed = 1}).expert_of(keys[t], E);
  }
  CHECK(differ > n / 2);
}

TEST_CASE("hash_gate: the expert of a key does not depend on the logits") {
  const index_t n = 20, E = 4;
  const auto a = random_logits(n, E, 71), b = random_logits(n, E, 72);
  sg::hash_gate gate;
  routing_plan<double> pa, pb;
  gate.route(one_rank(n), view(a, E), pa);
  gate.route(one_rank(n), view(b, E), pb);
  for (index_t t = 0; t < n; ++t) CHECK(pa.expert[t] == pb.expert[t]);
}

TEST_CASE("hash_gate: no gradient reaches the router") {
  const index_t n = 10, E = 4;
  const auto x = random_logits(n, E, 73);
  check_gradient(sg::hash_gate({.capacity_factor = 1.0}), x, E, one_rank(n), 1, /*expect_nonzero=*/false);
  std::vector<double> dl(n * E, 7.0), g(n, 1.0);
  sg::hash_gate gate;
  routing_plan<double> plan;
  gate.route(one_rank(n), view(x, E), plan);
  gate.backward(one_rank(n), view(x, E), plan, std::span<const double>(g), semoe::as_matrix(dl.data(), n, E));
  for (double d : dl) CHECK(d == 0.0);
}

TEST_CASE("hash_gate: errors") {
  CHECK_THROWS_WITH_AS(sg::hash_gate({.z_loss_coef = 1e-3}), doctest::Contains("no router gradient"), semoe::error);
  CHECK_THROWS_WITH_AS(sg::hash_gate({.balance = sg::balance_mode::aux_loss}), doctest::Contains("options.balance"),
                       semoe::error);
  const std::vector<double> x(8, 0.0);
  std::vector<std::int64_t> keys(3);
  auto ctx = one_rank(4);
  ctx.token_keys = keys;
  routing_plan<double> plan;
  CHECK_THROWS_WITH_AS(sg::hash_gate().route(ctx, view(x, 2), plan), doctest::Contains("token_keys has 3 keys"),
                       semoe::error);
}
