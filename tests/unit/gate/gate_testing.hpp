// Shared helpers of the gate tests: random logits, a plain dense reference of
// softmax and the aux losses, a finite-difference gradient check, plan
// consistency checks, and P simulated ranks (threads + a barrier) for the
// split-invariance tests.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <exception>
#include <mutex>
#include <random>
#include <span>
#include <thread>
#include <vector>

#include "semoe/core/error.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/gate/routing.hpp"

namespace gate_testing {

using semoe::index_t;
using semoe::gate::route_context;
using semoe::gate::routing_plan;

template <class T = double>
std::vector<T> random_logits(index_t n, index_t E, unsigned seed, double scale = 1.5) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<T> x(static_cast<std::size_t>(n * E));
  for (auto& v : x) v = static_cast<T>(d(rng));
  return x;
}

template <class T>
semoe::matrix_view<const T> view(const std::vector<T>& x, index_t E) {
  return semoe::as_matrix<const T>(x.data(), static_cast<index_t>(x.size()) / E, E);
}

inline route_context one_rank(index_t n, bool training = true, std::uint64_t seed = 7, std::uint64_t step = 3) {
  route_context c;
  c.global_tokens = n;
  c.training = training;
  c.seed = seed;
  c.step = step;
  return c;
}

/// Dense reference: softmax of every row, computed the obvious way.
struct dense_softmax {
  std::vector<double> p, lse;
  dense_softmax(std::span<const double> x, index_t n, index_t E) : p(x.size()), lse(static_cast<std::size_t>(n)) {
    for (index_t t = 0; t < n; ++t) {
      double mx = -INFINITY, s = 0;
      for (index_t e = 0; e < E; ++e) mx = std::max(mx, x[t * E + e]);
      for (index_t e = 0; e < E; ++e) s += std::exp(x[t * E + e] - mx);
      for (index_t e = 0; e < E; ++e) p[t * E + e] = std::exp(x[t * E + e] - mx) / s;
      lse[t] = mx + std::log(s);
    }
  }
  double operator()(index_t t, index_t e, index_t E) const { return p[t * E + e]; }
};

/// coef * E * sum_e f_e * P_e with f_e = counted[e] / (n * choices), P_e = mean prob.
inline double ref_balance_loss(const dense_softmax& s, const std::vector<double>& counted, index_t n, index_t E,
                               index_t choices, double coef) {
  double sum = 0;
  for (index_t e = 0; e < E; ++e) {
    double P = 0;
    for (index_t t = 0; t < n; ++t) P += s.p[t * E + e];
    sum += counted[e] / double(n * choices) * P / double(n);
  }
  return coef * double(E) * sum;
}

inline double ref_z_loss(const dense_softmax& s, double coef) {
  double sum = 0;
  for (double l : s.lse) sum += l * l;
  return coef * sum / double(s.lse.size());
}

/// Per expert, slots 0..count-1 each used once; offsets the prefix of counts;
/// dropped = routed but slot < 0.
template <class T>
void check_consistent(const routing_plan<T>& plan) {
  const index_t E = plan.experts;
  std::vector<std::vector<int>> seen(static_cast<std::size_t>(E));
  index_t dropped = 0;
  for (index_t a = 0; a < plan.assignments(); ++a) {
    const auto e = plan.expert[a];
    REQUIRE(e < E);
    if (e < 0) {
      CHECK(plan.slot[a] == -1);
      continue;
    }
    if (plan.slot[a] < 0) {
      ++dropped;
      continue;
    }
    seen[e].push_back(plan.slot[a]);
  }
  CHECK(plan.dropped == dropped);
  CHECK(plan.offsets[0] == 0);
  for (index_t e = 0; e < E; ++e) {
    CHECK(plan.counts[e] == static_cast<int>(seen[e].size()));
    CHECK(plan.offsets[e + 1] == plan.offsets[e] + plan.counts[e]);
    auto s = seen[e];
    std::sort(s.begin(), s.end());
    for (std::size_t i = 0; i < s.size(); ++i) CHECK(s[i] == static_cast<int>(i));
  }
}

/// Central-difference check of L = sum_a g_a * w_a + balance_loss + z_loss
/// (g_a random on kept assignments, 0 on dropped ones, as the layer passes)
/// against gate.backward. The discrete choices must not move under +-h.
template <class G>
void check_gradient(const G& gate0, const std::vector<double>& logits, index_t E, const route_context& ctx,
                    unsigned seed = 1, bool expect_nonzero = true) {
  const index_t n = static_cast<index_t>(logits.size()) / E;
  G gate = gate0;
  routing_plan<double> plan;
  gate.route(ctx, view(logits, E), plan);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<double> g(static_cast<std::size_t>(plan.assignments()));
  for (index_t a = 0; a < plan.assignments(); ++a) g[a] = plan.expert[a] >= 0 && plan.slot[a] >= 0 ? u(rng) : 0.0;
  std::vector<double> dl(logits.size(), 12345.0);  // backward must overwrite
  gate.backward(ctx, view(logits, E), plan, std::span<const double>(g), semoe::as_matrix(dl.data(), n, E));

  auto loss = [&](const std::vector<double>& x) {
    G gg = gate0;
    routing_plan<double> p;
    gg.route(ctx, view(x, E), p);
    for (index_t a = 0; a < p.assignments(); ++a) {
      REQUIRE(p.expert[a] == plan.expert[a]);  // choices held fixed
      REQUIRE(p.slot[a] == plan.slot[a]);
    }
    double L = p.balance_loss + p.z_loss;
    for (index_t a = 0; a < p.assignments(); ++a) L += g[a] * p.weight[a];
    return L;
  };
  const double h = 1e-6;
  double worst = 0, norm = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) {
    auto xp = logits, xm = logits;
    xp[i] += h;
    xm[i] -= h;
    const double fd = (loss(xp) - loss(xm)) / (2 * h);
    worst = std::max(worst, std::abs(fd - dl[i]) / (1e-6 * (std::abs(fd) + std::abs(dl[i])) + 1e-8));
    norm += dl[i] * dl[i];
  }
  INFO("worst |fd - analytic| / (1e-6 * (|fd| + |analytic|) + 1e-8) = " << worst);
  CHECK(worst <= 1.0);
  if (expect_nonzero) CHECK(norm > 1e-6);
}

/// P ranks as threads. Collectives gather every rank's values into shared
/// slots and sum them in rank order, so all ranks see bit-identical results.
class sim_group {
 public:
  explicit sim_group(int ranks)
      : p_(ranks), bar_(ranks), d_(static_cast<std::size_t>(ranks)), u_(static_cast<std::size_t>(ranks)) {}

  route_context context(int r, route_context c) {
    c.rank = r;
    c.ranks = p_;
    c.all_reduce_sum = [this, r](std::span<double> v) { reduce(d_, r, v); };
    c.all_reduce_sum_u64 = [this, r](std::span<std::uint64_t> v) { reduce(u_, r, v); };
    c.all_gather = [this, r](std::span<const std::uint64_t> mine, std::span<std::uint64_t> all) {
      u_[r].assign(mine.begin(), mine.end());
      bar_.arrive_and_wait();
      for (int p = 0; p < p_; ++p) std::copy(u_[p].begin(), u_[p].end(), all.begin() + p * mine.size());
      bar_.arrive_and_wait();
    };
    return c;
  }

  /// f(rank) on every rank; rethrows the first exception. A throwing rank
  /// leaves the barrier so the others cannot hang.
  template <class F>
  void run(F&& f) {
    std::exception_ptr first;
    std::mutex m;
    {
      std::vector<std::jthread> ts;
      for (int r = 0; r < p_; ++r)
        ts.emplace_back([&, r] {
          try {
            f(r);
          } catch (...) {
            std::lock_guard lock(m);
            if (!first) first = std::current_exception();
            bar_.arrive_and_drop();
          }
        });
    }
    if (first) std::rethrow_exception(first);
  }

 private:
  template <class V>
  void reduce(std::vector<std::vector<V>>& slots, int r, std::span<V> v) {
    slots[r].assign(v.begin(), v.end());
    bar_.arrive_and_wait();
    for (std::size_t i = 0; i < v.size(); ++i) {
      V s = 0;
      for (int p = 0; p < p_; ++p) s += slots[p][i];
      v[i] = s;
    }
    bar_.arrive_and_wait();
  }

  int p_;
  std::barrier<> bar_;
  std::vector<std::vector<double>> d_;
  std::vector<std::vector<std::uint64_t>> u_;
};

/// First token and count of rank r when n tokens are split over P ranks
/// unevenly (the first n % P ranks get one more).
inline std::pair<index_t, index_t> shard(index_t n, int P, int r) {
  const index_t base = n / P, rem = n % P;
  const index_t first = r * base + std::min<index_t>(r, rem);
  return {first, base + (r < rem ? 1 : 0)};
}

}  // namespace gate_testing
