// A batch routed on one rank and split over P = 2, 4 simulated ranks gives the
// same choices, kept sets, weights, aux losses, per-token gradients and
// aux-free bias: every gate's group statistics are global.
#include <doctest/doctest.h>

#include <cmath>

#include "gate_testing.hpp"
#include "semoe/gate/concepts.hpp"
#include "semoe/gate/expert_choice.hpp"
#include "semoe/gate/gshard.hpp"
#include "semoe/gate/hash.hpp"
#include "semoe/gate/noisy_top_k.hpp"
#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

namespace {

template <class T>
struct split_run {
  std::vector<int> expert, kept;  // per global assignment
  std::vector<T> weight, dlogits;
  std::vector<T> balance, z;      // per rank
  std::vector<std::vector<double>> bias;
  index_t capacity = 0, dropped = 0;
  std::vector<index_t> counts;
};

// The gradient a layer would pass: a fixed function of the global assignment.
double dweight_of(index_t global_a) { return 0.3 + std::sin(0.7 * double(global_a)); }

template <class T, class G>
split_run<T> run_split(const G& gate0, const std::vector<T>& x, index_t E, int P, const route_context& base,
                       const std::vector<std::int64_t>& keys = {}) {
  const index_t n = static_cast<index_t>(x.size()) / E;
  const index_t k = gate0.choices(E);
  split_run<T> out;
  out.expert.resize(n * k), out.kept.resize(n * k), out.weight.resize(n * k), out.dlogits.resize(n * E);
  out.balance.resize(P), out.z.resize(P), out.bias.resize(P), out.counts.assign(E, 0);
  std::vector<routing_plan<T>> plans(P);
  sim_group group(P);
  group.run([&](int r) {
    const auto [first, count] = shard(n, P, r);
    auto ctx = group.context(r, base);
    ctx.global_tokens = n;
    ctx.token_offset = first;
    if (!keys.empty()) ctx.token_keys = std::span(keys).subspan(first, count);
    G gate = gate0;
    auto& plan = plans[r];
    const auto xs = semoe::as_matrix<const T>(x.data() + first * E, count, E);
    gate.route(ctx, xs, plan);
    std::vector<T> g(count * k);
    for (index_t a = 0; a < count * k; ++a)
      g[a] = plan.expert[a] >= 0 && plan.slot[a] >= 0 ? static_cast<T>(dweight_of(first * k + a)) : T(0);
    gate.backward(ctx, xs, plan, std::span<const T>(g), semoe::as_matrix(out.dlogits.data() + first * E, count, E));
    if constexpr (sg::stepped_gate<G>) {
      gate.end_step(ctx);
      if constexpr (requires { gate.bias(); })
        out.bias[r].assign(gate.bias().values().begin(), gate.bias().values().end());
    }
  });
  for (int r = 0; r < P; ++r) {
    const auto [first, count] = shard(n, P, r);
    const auto& plan = plans[r];
    check_consistent(plan);
    for (index_t a = 0; a < count * k; ++a) {
      out.expert[first * k + a] = plan.expert[a];
      out.kept[first * k + a] = plan.slot[a] >= 0;
      out.weight[first * k + a] = plan.weight[a];
    }
    out.balance[r] = plan.balance_loss;
    out.z[r] = plan.z_loss;
    out.capacity = plan.capacity;
    out.dropped += plan.dropped;
    for (index_t e = 0; e < E; ++e) out.counts[e] += plan.counts[e];
  }
  return out;
}

template <class T, class G>
void check_split(const G& gate, index_t n, index_t E, route_context base, const std::vector<std::int64_t>& keys = {}) {
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  const auto x = random_logits<T>(n, E, 111);
  const auto one = run_split(gate, x, E, 1, base, keys);
  index_t routed = 0;
  for (int v : one.expert) routed += v >= 0;
  CHECK(routed > 0);
  for (int P : {2, 4}) {
    CAPTURE(P);
    const auto many = run_split(gate, x, E, P, base, keys);
    CHECK(many.expert == one.expert);
    CHECK(many.kept == one.kept);
    CHECK(many.weight == one.weight);  // per-token arithmetic: bit-identical
    CHECK(many.capacity == one.capacity);
    CHECK(many.dropped == one.dropped);
    CHECK(many.counts == one.counts);
    for (int r = 0; r < P; ++r) {
      CHECK(static_cast<double>(many.balance[r]) == doctest::Approx(static_cast<double>(one.balance[0])).epsilon(tol));
      CHECK(static_cast<double>(many.z[r]) == doctest::Approx(static_cast<double>(one.z[0])).epsilon(tol));
      CHECK(many.bias[r] == one.bias[0]);  // aux-free bias identical on every rank
    }
    double worst = 0;
    for (std::size_t i = 0; i < one.dlogits.size(); ++i)
      worst = std::max(worst, std::abs(static_cast<double>(many.dlogits[i] - one.dlogits[i])) /
                                  (std::abs(static_cast<double>(one.dlogits[i])) + 1e-3));
    CHECK(worst < tol);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("split invariance: top_k", T, float, double) {
  const index_t n = 45, E = 6;
  SUBCASE("drop by position") {
    check_split<T>(sg::top_k<2>({.capacity_factor = 0.9, .aux_loss_coef = 0.05, .z_loss_coef = 0.01}), n, E,
                   one_rank(n));
  }
  SUBCASE("drop by probability") {
    check_split<T>(sg::top_k<2>({.capacity_factor = 0.9, .drop = sg::drop_policy::probability}), n, E, one_rank(n));
  }
  SUBCASE("aux-free bias") {
    check_split<T>(sg::top_k<1>({.capacity_factor = 1.0, .balance = sg::balance_mode::aux_free, .bias_rate = 0.01}),
                   n, E, one_rank(n));
  }
}

TEST_CASE("split invariance: switch_gate, gshard, noisy_top_k, expert_choice, hash_gate") {
  const index_t n = 43, E = 5;
  SUBCASE("switch") { check_split<double>(sg::switch_gate({.capacity_factor = 1.0}), n, E, one_rank(n)); }
  SUBCASE("gshard, random routing") {
    check_split<double>(sg::gshard({.capacity_factor = 1.0}), n, E, one_rank(n, true, 3, 17));
  }
  SUBCASE("gshard, aux-free") {
    check_split<double>(sg::gshard({.capacity_factor = 1.0, .balance = sg::balance_mode::aux_free}), n, E,
                        one_rank(n, true, 3, 17));
  }
  SUBCASE("noisy_top_k") {
    check_split<double>(sg::noisy_top_k<2>({.capacity_factor = 1.0}), n, E, one_rank(n, true, 5, 2));
  }
  SUBCASE("expert_choice") { check_split<double>(sg::expert_choice({.capacity_factor = 1.0}), n, E, one_rank(n)); }
  SUBCASE("expert_choice, float") { check_split<float>(sg::expert_choice({.capacity_factor = 2.0}), n, E, one_rank(n)); }
  SUBCASE("hash by position") { check_split<double>(sg::hash_gate({.capacity_factor = 1.0}), n, E, one_rank(n)); }
  SUBCASE("hash by token id") {
    std::vector<std::int64_t> keys(n);
    for (index_t t = 0; t < n; ++t) keys[t] = (t * 31) % 11;
    check_split<double>(sg::hash_gate({.capacity_factor = 1.0}), n, E, one_rank(n), keys);
  }
}
