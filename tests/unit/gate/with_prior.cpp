// gate::with_prior: routing skewed by a prior is the inner gate's routing of
// logits + log(prior), with an exact gradient (central differences), and a
// Zipf prior sends expert 0 the most tokens.
#include "semoe/gate/with_prior.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <numeric>

#include "gate_testing.hpp"
#include "semoe/gate/top_k.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

TEST_CASE("zipf_prior is 1/(e+1)^s normalized") {
  const auto p = sg::zipf_prior(8, 1.2);
  CHECK(std::accumulate(p.begin(), p.end(), 0.0) == doctest::Approx(1.0));
  CHECK(p[0] / p[1] == doctest::Approx(std::pow(2.0, 1.2)));
  CHECK(p[0] / p[7] == doctest::Approx(std::pow(8.0, 1.2)));
  CHECK_THROWS_WITH_AS(sg::zipf_prior(0, 1.2), doctest::Contains("experts = 0"), semoe::error);
}

TEST_CASE("with_prior routes like its gate on the shifted logits, with an exact gradient") {
  const index_t n = 64, E = 6;
  const auto x = random_logits(n, E, 11);
  const auto prior = sg::zipf_prior(E, 1.2);
  sg::with_prior<sg::top_k<2>> g({.gate = {.dropless = true, .aux_loss_coef = 0.05, .z_loss_coef = 0.01}, .prior = prior});
  routing_plan<double> skewed, reference;
  g.route(one_rank(n), view(x, E), skewed);
  std::vector<double> shifted(x);
  for (index_t t = 0; t < n; ++t)
    for (index_t e = 0; e < E; ++e) shifted[t * E + e] += std::log(prior[e]);
  sg::top_k<2> bare({.dropless = true, .aux_loss_coef = 0.05, .z_loss_coef = 0.01});
  bare.route(one_rank(n), view(shifted, E), reference);
  for (index_t a = 0; a < skewed.assignments(); ++a) {
    CHECK(skewed.expert[a] == reference.expert[a]);
    CHECK(skewed.weight[a] == reference.weight[a]);
  }
  // The prior moves tokens to expert 0.
  CHECK(skewed.counts[0] == *std::max_element(skewed.counts.begin(), skewed.counts.end()));
  check_gradient(g, x, E, one_rank(n));
}

TEST_CASE("with_prior refuses a prior that does not fit") {
  using G = sg::with_prior<sg::top_k<2>>;
  CHECK_THROWS_WITH_AS(G({.prior = {1.0, 0.0}}), doctest::Contains("options.prior[1] = 0"), semoe::error);
  CHECK_THROWS_WITH_AS(G({.prior = {}}), doctest::Contains("options.prior is empty"), semoe::error);
  CHECK_THROWS_WITH_AS(G({.prior = {1.0, 2.0}}).choices(4), doctest::Contains("2 prior values for 4 experts"),
                       semoe::error);
}
