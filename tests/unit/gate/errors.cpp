// Bad input to any gate is a semoe::error whose message names the problem.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>

#include "gate_testing.hpp"
#include "semoe/gate/expert_choice.hpp"
#include "semoe/gate/gshard.hpp"
#include "semoe/gate/hash.hpp"
#include "semoe/gate/noisy_top_k.hpp"
#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

#define SEMOE_ALL_GATES sg::top_k<2>, sg::switch_gate, sg::gshard, sg::noisy_top_k<2>, sg::expert_choice, sg::hash_gate

TEST_CASE_TEMPLATE("every gate rejects NaN and Inf logits, naming token and expert", G, SEMOE_ALL_GATES) {
  const index_t n = 4, E = 3;
  G gate;
  routing_plan<float> plan;
  auto x = random_logits<float>(n, E, 101);
  x[1 * E + 2] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(gate.route(one_rank(n), view(x, E), plan),
                       doctest::Contains("gate logits contain NaN or Inf at token 1, expert 2"), semoe::error);
  x[1 * E + 2] = 0;
  x[3 * E + 0] = -std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(gate.route(one_rank(n), view(x, E), plan),
                       doctest::Contains("gate logits contain NaN or Inf at token 3, expert 0"), semoe::error);
}

TEST_CASE_TEMPLATE("every gate rejects an empty batch", G, SEMOE_ALL_GATES) {
  G gate;
  routing_plan<double> plan;
  const std::vector<double> none;
  CHECK_THROWS_WITH_AS(gate.route(route_context{}, semoe::as_matrix<const double>(none.data(), 0, 4), plan),
                       doctest::Contains("empty batch"), semoe::error);
}

TEST_CASE_TEMPLATE("every gate rejects capacity_factor <= 0 unless dropless", G, SEMOE_ALL_GATES) {
  using O = typename G::options;
  CHECK_THROWS_WITH_AS(G::validate(O{.capacity_factor = 0}), doctest::Contains("options.capacity_factor = 0"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(G(O{.capacity_factor = -1.5}), doctest::Contains("options.capacity_factor = -1.5: expected"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(G(O{.capacity_factor = INFINITY}), doctest::Contains("capacity_factor = inf"), semoe::error);
  CHECK_NOTHROW(G::validate(O{}));
}

TEST_CASE("dropless gates ignore the capacity factor") {
  CHECK_NOTHROW(sg::top_k<2>({.capacity_factor = 0, .dropless = true}));
  CHECK_NOTHROW(sg::hash_gate({.capacity_factor = -1, .dropless = true}));
}

TEST_CASE("k > experts is an error naming both") {
  CHECK_THROWS_WITH_AS(sg::top_k<3>().choices(2), doctest::Contains("k = 3 exceeds experts = 2"), semoe::error);
  CHECK_THROWS_WITH_AS(sg::gshard().choices(1), doctest::Contains("k = 2 exceeds experts = 1"), semoe::error);
  CHECK_THROWS_WITH_AS(sg::noisy_top_k<4>().choices(3), doctest::Contains("k = 4 exceeds experts = 3"), semoe::error);
  CHECK_THROWS_WITH_AS(sg::switch_gate().choices(0), doctest::Contains("experts = 0: expected at least 1"),
                       semoe::error);
  CHECK(sg::expert_choice().choices(5) == 5);
  const std::vector<double> x(4 * 2, 0.0);
  routing_plan<double> plan;
  sg::top_k<3> gate;
  CHECK_THROWS_WITH_AS(gate.route(one_rank(4), view(x, 2), plan), doctest::Contains("top_k: k = 3 exceeds experts = 2"),
                       semoe::error);
}

TEST_CASE("route_context and backward shapes are checked") {
  const index_t n = 4, E = 3;
  const auto x = random_logits(n, E, 102);
  routing_plan<double> plan;
  sg::top_k<2> gate;
  auto ctx = one_rank(n);
  ctx.global_tokens = 3;
  CHECK_THROWS_WITH_AS(gate.route(ctx, view(x, E), plan), doctest::Contains("route_context.global_tokens = 3"),
                       semoe::error);
  ctx = one_rank(0);  // one rank may leave global_tokens at 0
  CHECK_NOTHROW(gate.route(ctx, view(x, E), plan));
  CHECK(plan.capacity == sg::expert_capacity(1.25, n, 2, E));

  std::vector<double> g(n * 2 - 1), dl(n * E);
  CHECK_THROWS_WITH_AS(gate.backward(ctx, view(x, E), plan, std::span<const double>(g), semoe::as_matrix(dl.data(), n, E)),
                       doctest::Contains("dweight has 7 values; expected tokens * k = 8"), semoe::error);
  g.resize(n * 2);
  CHECK_THROWS_WITH_AS(gate.backward(ctx, view(x, E), plan, std::span<const double>(g),
                                     semoe::as_matrix(dl.data(), n, E - 1)),
                       doctest::Contains("dlogits: expected shape [4, 3], got [4, 2]"), semoe::error);
  const auto y = random_logits(n + 1, E, 103);
  CHECK_THROWS_WITH_AS(gate.backward(ctx, view(y, E), plan, std::span<const double>(g), semoe::as_matrix(dl.data(), n, E)),
                       doctest::Contains("the plan routes [4, 3] but logits are [5, 3]"), semoe::error);
}
