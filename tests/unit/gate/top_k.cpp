#include "semoe/gate/top_k.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>

#include "gate_testing.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

namespace {

// Dense reference: sort experts by probability (stable: ties keep the lower
// id first), take K, weights = probs or probs / their sum.
struct ref_top_k {
  std::vector<int> expert;
  std::vector<double> weight;
  double balance = 0, z = 0;
  ref_top_k(const std::vector<double>& x, index_t E, index_t K, bool normalize, double aux, double zc) {
    const index_t n = static_cast<index_t>(x.size()) / E;
    dense_softmax s(x, n, E);
    std::vector<double> counted(static_cast<std::size_t>(E), 0);
    for (index_t t = 0; t < n; ++t) {
      std::vector<int> idx(static_cast<std::size_t>(E));
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return s(t, a, E) > s(t, b, E); });
      double sum = 0;
      for (index_t c = 0; c < K; ++c) sum += s(t, idx[c], E);
      for (index_t c = 0; c < K; ++c) {
        expert.push_back(idx[c]);
        weight.push_back(normalize ? s(t, idx[c], E) / sum : s(t, idx[c], E));
        counted[idx[c]] += 1;
      }
    }
    balance = ref_balance_loss(s, counted, n, E, K, aux);
    z = ref_z_loss(s, zc);
  }
};

template <int K, class T>
void compare_with_reference(bool normalize, double tol) {
  const index_t n = 29, E = 7;
  const auto x = random_logits<T>(n, E, 11 + K);
  const std::vector<double> xd(x.begin(), x.end());
  sg::top_k<K> gate({.dropless = true, .aux_loss_coef = 0.03, .z_loss_coef = 0.002, .normalize = normalize});
  routing_plan<T> plan;
  gate.route(one_rank(n), view(x, E), plan);
  const ref_top_k ref(xd, E, K, normalize, 0.03, 0.002);
  REQUIRE(plan.assignments() == n * K);
  for (index_t a = 0; a < n * K; ++a) {
    CHECK(plan.expert[a] == ref.expert[a]);
    CHECK(static_cast<double>(plan.weight[a]) == doctest::Approx(ref.weight[a]).epsilon(tol));
    CHECK(plan.slot[a] >= 0);
  }
  CHECK(plan.capacity == 0);
  CHECK(plan.dropped == 0);
  CHECK(static_cast<double>(plan.balance_loss) == doctest::Approx(ref.balance).epsilon(tol));
  CHECK(static_cast<double>(plan.z_loss) == doctest::Approx(ref.z).epsilon(tol));
  check_consistent(plan);
}

}  // namespace

TEST_CASE_TEMPLATE("top_k matches a dense reference", T, float, double) {
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  compare_with_reference<1, T>(false, tol);
  compare_with_reference<2, T>(true, tol);
  compare_with_reference<2, T>(false, tol);
  compare_with_reference<3, T>(true, tol);
}

TEST_CASE("top_k: K = 1 weights are probabilities, K > 1 normalizes by default") {
  CHECK_FALSE(sg::top_k<1>::options{}.normalize);
  CHECK(sg::top_k<2>::options{}.normalize);
  const auto x = random_logits(5, 4, 3);
  sg::top_k<2> gate;
  routing_plan<double> plan;
  gate.route(one_rank(5), view(x, 4), plan);
  for (index_t t = 0; t < 5; ++t) CHECK(plan.weight[2 * t] + plan.weight[2 * t + 1] == doctest::Approx(1.0));
}

TEST_CASE("top_k: equal scores go to the lower expert id") {
  const std::vector<double> x = {0, 0, 0, 0,   //
                                 1, 3, 0, 3,   //
                                 2, 2, 5, 2};
  sg::top_k<2> gate({.dropless = true});
  routing_plan<double> plan;
  gate.route(one_rank(3), view(x, 4), plan);
  CHECK(plan.expert[0] == 0);
  CHECK(plan.expert[1] == 1);
  CHECK(plan.expert[2] == 1);
  CHECK(plan.expert[3] == 3);
  CHECK(plan.expert[4] == 2);
  CHECK(plan.expert[5] == 0);
}

TEST_CASE("top_k: backward matches finite differences") {
  const index_t n = 12, E = 6;
  const auto x = random_logits(n, E, 5);
  SUBCASE("K = 2, normalized, aux + z") {
    check_gradient(sg::top_k<2>({.dropless = true, .aux_loss_coef = 0.05, .z_loss_coef = 0.01}), x, E, one_rank(n));
  }
  SUBCASE("K = 2, not normalized") {
    check_gradient(sg::top_k<2>({.dropless = true, .aux_loss_coef = 0.05, .z_loss_coef = 0.01, .normalize = false}),
                   x, E, one_rank(n));
  }
  SUBCASE("K = 1") {
    check_gradient(sg::top_k<1>({.dropless = true, .aux_loss_coef = 0.05, .z_loss_coef = 0.01}), x, E, one_rank(n));
  }
  SUBCASE("K = 3, capacity drops by probability") {
    sg::top_k<3> gate({.capacity_factor = 0.6, .drop = sg::drop_policy::probability, .aux_loss_coef = 0.05,
                       .z_loss_coef = 0.01});
    routing_plan<double> plan;
    gate.route(one_rank(n), view(x, E), plan);
    CHECK(plan.dropped > 0);  // the dropped ones get dweight 0
    check_gradient(gate, x, E, one_rank(n));
  }
  SUBCASE("aux-free bias with a z-loss") {
    sg::top_k<2> gate({.dropless = true, .balance = sg::balance_mode::aux_free, .z_loss_coef = 0.01, .bias_rate = 0.05});
    routing_plan<double> plan;
    gate.route(one_rank(n), view(x, E), plan);
    gate.end_step(one_rank(n));
    check_gradient(gate, x, E, one_rank(n));
  }
}

TEST_CASE("top_k: without a capacity limit (dropless) every choice is kept") {
  const index_t n = 40, E = 4;
  auto x = random_logits(n, E, 9);
  for (index_t t = 0; t < n; ++t) x[t * E] += 5;  // everyone wants expert 0
  sg::top_k<2> gate({.dropless = true});
  routing_plan<double> plan;
  gate.route(one_rank(n), view(x, E), plan);
  CHECK(plan.capacity == 0);
  CHECK(plan.dropped == 0);
  CHECK(plan.kept() == n * 2);
  CHECK(plan.counts[0] == n);
  check_consistent(plan);
}

TEST_CASE("top_k: evaluation routes the same as training (no noise)") {
  const auto x = random_logits(10, 5, 2);
  sg::top_k<2> gate;
  routing_plan<double> a, b;
  gate.route(one_rank(10, true), view(x, 5), a);
  gate.route(one_rank(10, false), view(x, 5), b);
  for (index_t i = 0; i < a.assignments(); ++i) {
    CHECK(a.expert[i] == b.expert[i]);
    CHECK(a.weight[i] == b.weight[i]);
  }
}
