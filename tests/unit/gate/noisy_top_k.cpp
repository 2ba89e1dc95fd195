#include "semoe/gate/noisy_top_k.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>

#include "gate_testing.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

TEST_CASE_TEMPLATE("noisy_top_k without noise matches a dense reference: softmax over the kept logits", T, float,
                   double) {
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  const index_t n = 27, E = 7, K = 3;
  const auto x = random_logits<T>(n, E, 51);
  const std::vector<double> xd(x.begin(), x.end());
  sg::noisy_top_k<K> gate({.dropless = true, .aux_loss_coef = 0.02, .z_loss_coef = 0.004});
  routing_plan<T> plan;
  gate.route(one_rank(n, /*training=*/false), view(x, E), plan);

  dense_softmax s(xd, n, E);
  std::vector<double> counted(E, 0);
  for (index_t t = 0; t < n; ++t) {
    std::vector<int> idx(E);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return xd[t * E + a] > xd[t * E + b]; });
    double z = 0;
    for (index_t c = 0; c < K; ++c) z += std::exp(xd[t * E + idx[c]]);
    for (index_t c = 0; c < K; ++c) {
      CHECK(plan.expert[t * K + c] == idx[c]);
      CHECK(static_cast<double>(plan.weight[t * K + c]) == doctest::Approx(std::exp(xd[t * E + idx[c]]) / z).epsilon(tol));
      counted[idx[c]] += 1;
    }
  }
  CHECK(static_cast<double>(plan.balance_loss) ==
        doctest::Approx(ref_balance_loss(s, counted, n, E, K, 0.02)).epsilon(tol));
  CHECK(static_cast<double>(plan.z_loss) == doctest::Approx(ref_z_loss(s, 0.004)).epsilon(tol));
  check_consistent(plan);

  SUBCASE("noise_std = 0 while training is the same") {
    routing_plan<T> quiet;
    sg::noisy_top_k<K>({.dropless = true, .noise_std = 0}).route(one_rank(n, true), view(x, E), quiet);
    for (index_t a = 0; a < plan.assignments(); ++a) CHECK(quiet.expert[a] == plan.expert[a]);
  }
}

TEST_CASE("noisy_top_k: training adds N(0, noise_std^2) to the logits, fixed by (seed, step)") {
  const index_t n = 5000, E = 6;
  const double sigma = 0.7;
  const auto x = random_logits(n, E, 52);
  sg::noisy_top_k<2> gate({.dropless = true, .noise_std = sigma});
  routing_plan<double> plan, again, other;
  gate.route(one_rank(n, true, 9, 4), view(x, E), plan);
  // log(w0 / w1) = H[e0] - H[e1], so the noise difference n[e0] - n[e1] is observable:
  // its variance is 2 sigma^2 (selection biases it a little, hence the loose bound).
  double sum = 0, sum2 = 0;
  for (index_t t = 0; t < n; ++t) {
    const int e0 = plan.expert[2 * t], e1 = plan.expert[2 * t + 1];
    const double d = std::log(plan.weight[2 * t] / plan.weight[2 * t + 1]) - (x[t * E + e0] - x[t * E + e1]);
    sum += d, sum2 += d * d;
  }
  const double var = sum2 / n - (sum / n) * (sum / n);
  INFO("variance of the noise difference " << var << ", 2 sigma^2 = " << 2 * sigma * sigma);
  CHECK(var > 0.6 * 2 * sigma * sigma);
  CHECK(var < 1.4 * 2 * sigma * sigma);

  gate.route(one_rank(n, true, 9, 4), view(x, E), again);
  gate.route(one_rank(n, true, 9, 5), view(x, E), other);
  index_t differ = 0;
  for (index_t a = 0; a < plan.assignments(); ++a) {
    CHECK(again.expert[a] == plan.expert[a]);
    CHECK(again.weight[a] == plan.weight[a]);
    differ += other.expert[a] != plan.expert[a];
  }
  CHECK(differ > 100);
}

TEST_CASE("noisy_top_k: backward matches finite differences with the noise held fixed") {
  const index_t n = 13, E = 6;
  const auto x = random_logits(n, E, 53);
  SUBCASE("K = 2, training") {
    check_gradient(sg::noisy_top_k<2>({.dropless = true, .aux_loss_coef = 0.05, .z_loss_coef = 0.01}), x, E,
                   one_rank(n, true));
  }
  SUBCASE("K = 3, capacity drops") {
    sg::noisy_top_k<3> gate({.capacity_factor = 0.7, .aux_loss_coef = 0.05, .z_loss_coef = 0.01});
    routing_plan<double> plan;
    gate.route(one_rank(n), view(x, E), plan);
    CHECK(plan.dropped > 0);
    check_gradient(gate, x, E, one_rank(n, true));
  }
  SUBCASE("aux-free, evaluation") {
    check_gradient(sg::noisy_top_k<2>({.dropless = true, .balance = sg::balance_mode::aux_free, .z_loss_coef = 0.01}),
                   x, E, one_rank(n, false));
  }
}

TEST_CASE("noisy_top_k: options.noise_std must be finite and >= 0") {
  CHECK_THROWS_WITH_AS(sg::noisy_top_k<2>({.noise_std = -1}), doctest::Contains("options.noise_std = -1"),
                       semoe::error);
}
