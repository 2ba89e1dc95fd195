// Outside training a gate uses its evaluation capacity (GShard: 2.0).
#include <doctest/doctest.h>

#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"

using namespace semoe;

TEST_CASE("gates use eval_capacity_factor when not training") {
  const index_t T = 40, E = 4;
  matrix<float> logits(T, E);
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) logits(t, e) = e == 0 ? 2.0f : 0.1f * static_cast<float>(t % 3);  // skewed to 0
  gate::top_k<2> g({.capacity_factor = 1.0, .eval_capacity_factor = 3.0});
  gate::routing_plan<float> plan;
  gate::route_context ctx;
  ctx.global_tokens = T;
  g.route(ctx, matrix_view<const float>(logits.view()), plan);
  CHECK(plan.capacity == 20);  // ceil(1.0 * 40 * 2 / 4)
  CHECK(plan.counts[0] == 20);
  CHECK(plan.dropped == 40);  // 20 first choices to expert 0, 20 second choices to expert 1 (a tie: lowest id)
  ctx.training = false;
  g.route(ctx, matrix_view<const float>(logits.view()), plan);
  CHECK(plan.capacity == 60);
  CHECK(plan.counts[0] == 40);  // every token's first choice fits now
  CHECK(plan.dropped == 0);
  CHECK_THROWS_WITH_AS(gate::switch_gate({.eval_capacity_factor = 0}), doctest::Contains("eval_capacity_factor"),
                       semoe::error);
}
