// Capacity options shared by the softmax gates: min_capacity (DeepSpeed's
// floor on an expert's capacity) and renormalize_after_drops (DeepSpeed's
// top-2 weights divided by the sum over the choices capacity kept), with
// the exact gradient of the re-normalized weights.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "gate_testing.hpp"
#include "semoe/gate/gshard.hpp"
#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

TEST_CASE("min_capacity raises a small capacity and keeps more") {
  const index_t n = 40, E = 8;
  const auto x = random_logits(n, E, 2);
  sg::top_k<2> small({.capacity_factor = 0.1});
  sg::top_k<2> floored({.capacity_factor = 0.1, .min_capacity = 6});
  routing_plan<double> a, b;
  small.route(one_rank(n), view(x, E), a);
  floored.route(one_rank(n), view(x, E), b);
  CHECK(a.capacity == 1);
  CHECK(b.capacity == 6);
  check_consistent(b);
  CHECK(b.kept() > a.kept());
  // A capacity already above the floor stays; dropless stays dropless.
  sg::top_k<2> big({.capacity_factor = 2.0, .min_capacity = 6});
  sg::top_k<2> none({.dropless = true, .min_capacity = 6});
  big.route(one_rank(n), view(x, E), a);
  none.route(one_rank(n), view(x, E), b);
  CHECK(a.capacity == 20);
  CHECK(b.capacity == 0);
  // Every gate with a capacity factor has it.
  sg::switch_gate sw({.capacity_factor = 0.1, .min_capacity = 4});
  sg::gshard gs({.capacity_factor = 0.1, .min_capacity = 4});
  sw.route(one_rank(n), view(x, E), a);
  gs.route(one_rank(n), view(x, E), b);
  CHECK(a.capacity == 4);
  CHECK(b.capacity == 4);
  CHECK_THROWS_WITH_AS(sg::top_k<2>({.min_capacity = -1}), doctest::Contains("options.min_capacity = -1"),
                       semoe::error);
}

TEST_CASE("renormalize_after_drops divides kept weights by their sum, with an exact gradient") {
  const index_t n = 48, E = 6;
  const auto x = random_logits(n, E, 4);
  const dense_softmax s(x, n, E);
  for (bool normalize : {true, false}) {
    CAPTURE(normalize);
    sg::top_k<2> plain({.capacity_factor = 0.6, .normalize = normalize});
    sg::top_k<2> renorm({.capacity_factor = 0.6, .normalize = normalize, .renormalize_after_drops = true});
    routing_plan<double> p, r;
    plain.route(one_rank(n), view(x, E), p);
    renorm.route(one_rank(n), view(x, E), r);
    REQUIRE(r.dropped > 0);
    index_t partly = 0;
    for (index_t t = 0; t < n; ++t) {
      double kept = 0;
      index_t kept_n = 0;
      for (index_t c = 0; c < 2; ++c) {
        const index_t a = t * 2 + c;
        CHECK(r.expert[a] == p.expert[a]);  // the same choices and drops
        CHECK(r.slot[a] == p.slot[a]);
        if (r.slot[a] >= 0) {
          kept += s(t, r.expert[a], E);
          ++kept_n;
        }
      }
      if (kept_n == 0) continue;
      double sum = 0;
      for (index_t c = 0; c < 2; ++c) {
        const index_t a = t * 2 + c;
        if (r.slot[a] < 0) continue;
        CHECK(r.weight[a] == doctest::Approx(s(t, r.expert[a], E) / kept).epsilon(1e-12));
        sum += r.weight[a];
      }
      CHECK(sum == doctest::Approx(1.0));
      partly += kept_n == 1;
    }
    CHECK(partly > 0);  // some token lost one of its two choices
    check_gradient(renorm, x, E, one_rank(n));
  }
}
