// gate::sigmoid_top_k (DeepSeek-V3's router) against a plain reference of
// its definition: sigmoid scores, group-limited choice by score + bias,
// weights from the unbiased scores (normalized, scaled); an exact gradient
// (central differences), the bias moving toward even load, and refusals.
#include "semoe/gate/sigmoid_top_k.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "gate_testing.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

namespace {

/// The router written out: per token, the groups ranked by the sum of their
/// two best biased scores, the best `top_groups` kept, then the k best
/// biased scores among their experts (largest first).
struct reference_choice {
  std::vector<int> expert;
  std::vector<double> weight;
};

reference_choice reference(const std::vector<double>& x, index_t E, index_t k, index_t groups, index_t top_groups,
                           const std::vector<double>& bias, bool normalize, double scaling) {
  const index_t n = static_cast<index_t>(x.size()) / E, per = E / groups;
  reference_choice r;
  for (index_t t = 0; t < n; ++t) {
    std::vector<double> s(E), b(E);
    for (index_t e = 0; e < E; ++e) {
      s[e] = 1 / (1 + std::exp(-x[t * E + e]));
      b[e] = s[e] + bias[e];
    }
    std::vector<std::pair<double, index_t>> gs;
    for (index_t g = 0; g < groups; ++g) {
      std::vector<double> v(b.begin() + g * per, b.begin() + (g + 1) * per);
      std::sort(v.rbegin(), v.rend());
      gs.push_back({per > 1 ? v[0] + v[1] : v[0], g});
    }
    std::stable_sort(gs.begin(), gs.end(), [](auto a, auto c) { return a.first > c.first; });
    std::vector<std::pair<double, index_t>> cand;
    for (index_t i = 0; i < top_groups; ++i)
      for (index_t e = gs[i].second * per; e < (gs[i].second + 1) * per; ++e) cand.push_back({b[e], e});
    std::stable_sort(cand.begin(), cand.end(), [](auto a, auto c) { return a.first > c.first; });
    double sum = 0;
    for (index_t c = 0; c < k; ++c) sum += s[cand[c].second];
    for (index_t c = 0; c < k; ++c) {
      r.expert.push_back(static_cast<int>(cand[c].second));
      r.weight.push_back((normalize ? s[cand[c].second] / sum : s[cand[c].second]) * scaling);
    }
  }
  return r;
}

}  // namespace

TEST_CASE("sigmoid_top_k chooses and weighs as DeepSeek-V3 defines it") {
  const index_t n = 48, E = 8;
  const auto x = random_logits(n, E, 5);
  std::vector<double> bias{0.3, -0.2, 0.05, 0.0, -0.4, 0.25, 0.1, -0.1};
  for (const auto& [groups, top_groups, normalize, scaling] : std::vector<std::tuple<index_t, index_t, bool, double>>{
           {1, 1, true, 1.0}, {4, 2, true, 2.5}, {2, 1, false, 1.0}}) {
    CAPTURE(groups);
    CAPTURE(top_groups);
    sg::sigmoid_top_k<3> g(
        {.dropless = true, .normalize = normalize, .scaling = scaling, .groups = groups, .top_groups = top_groups});
    g.bias().assign(bias);
    routing_plan<double> plan;
    g.route(one_rank(n), view(x, E), plan);
    check_consistent(plan);
    const auto ref = reference(x, E, 3, groups, top_groups, bias, normalize, scaling);
    for (index_t a = 0; a < plan.assignments(); ++a) {
      CHECK(plan.expert[a] == ref.expert[a]);
      CHECK(plan.weight[a] == doctest::Approx(ref.weight[a]).epsilon(1e-12));
    }
    // The bias chooses but never weighs: without it, some choice differs.
    sg::sigmoid_top_k<3> plain(
        {.dropless = true, .normalize = normalize, .scaling = scaling, .groups = groups, .top_groups = top_groups});
    routing_plan<double> unbiased;
    plain.route(one_rank(n), view(x, E), unbiased);
    index_t differ = 0;
    for (index_t a = 0; a < plan.assignments(); ++a) differ += plan.expert[a] != unbiased.expert[a];
    CHECK(differ > 0);
  }
}

TEST_CASE("sigmoid_top_k's gradient matches central differences, with and without drops") {
  const index_t n = 32, E = 8;
  const auto x = random_logits(n, E, 9);
  std::vector<double> bias{0.1, -0.2, 0.05, 0.0, -0.1, 0.2, 0.1, -0.1};
  for (bool dropless : {true, false}) {
    for (bool normalize : {true, false}) {
      CAPTURE(dropless);
      CAPTURE(normalize);
      sg::sigmoid_top_k<2> g({.capacity_factor = 0.75,
                              .dropless = dropless,
                              .normalize = normalize,
                              .scaling = 2.5,
                              .groups = 4,
                              .top_groups = 2});
      g.bias().assign(bias);
      if (!dropless) {
        routing_plan<double> p;
        auto probe = g;
        probe.route(one_rank(n), view(x, E), p);
        CHECK(p.dropped > 0);
      }
      check_gradient(g, x, E, one_rank(n));
    }
  }
}

TEST_CASE("sigmoid_top_k's bias moves toward even load after a step") {
  const index_t n = 256, E = 4;
  auto x = random_logits(n, E, 3);
  for (index_t t = 0; t < n; ++t) x[t * E + 0] += 3;  // everyone prefers expert 0
  sg::sigmoid_top_k<1> g({.dropless = true, .bias_rate = 0.5});
  routing_plan<double> before, after;
  g.route(one_rank(n), view(x, E), before);
  g.end_step(one_rank(n));
  CHECK(g.bias()[0] < 0);
  for (index_t e = 1; e < E; ++e) CHECK(g.bias()[e] > 0);
  g.route(one_rank(n), view(x, E), after);
  CHECK(after.counts[0] < before.counts[0]);
  // Evaluation routes record no load: the bias stays.
  g.end_step(one_rank(n));
  const double b0 = g.bias()[0];
  g.route(one_rank(n, false), view(x, E), after);
  g.end_step(one_rank(n));
  CHECK(g.bias()[0] == b0);
}

TEST_CASE("sigmoid_top_k refuses what it cannot do") {
  using G = sg::sigmoid_top_k<2>;
  CHECK_THROWS_WITH_AS(G({.balance = sg::balance_mode::aux_loss}), doctest::Contains("softmax probabilities"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(G({.z_loss_coef = 1e-3}), doctest::Contains("options.z_loss_coef"), semoe::error);
  CHECK_THROWS_WITH_AS(G({.scaling = 0}), doctest::Contains("options.scaling = 0"), semoe::error);
  CHECK_THROWS_WITH_AS(G({.groups = 2, .top_groups = 3}), doctest::Contains("options.top_groups = 3"), semoe::error);
  CHECK_THROWS_WITH_AS(G({.groups = 3}).choices(8), doctest::Contains("equal groups"), semoe::error);
  CHECK_THROWS_WITH_AS(G({.groups = 8, .top_groups = 1}).choices(8), doctest::Contains("k = 2 exceeds the 1 experts"),
                       semoe::error);
  static_assert(sg::Gate<G>);
}
