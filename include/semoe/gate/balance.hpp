// semoe/gate/balance.hpp: load balancing shared by every gate:
//  (1) the GShard / Switch auxiliary loss  coef * E * sum_e f_e * P_e,
//  (2) the router z-loss (ST-MoE, Zoph et al. 2022)  coef * mean_t logsumexp_t^2,
//  (3) aux-loss-free balancing (DeepSeek-V3): a per-expert bias on the scores
//      used for selection only, nudged toward uniform load after every step.
// Fractions and means are over the whole expert-parallel group (one
// all-reduce), so a batch split over P ranks has the loss of one rank.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/executor.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/gate/detail/kernels.hpp"
#include "semoe/gate/detail/softmax.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate {

enum class balance_mode {
  aux_loss,  ///< GShard / Switch auxiliary loss (aux_loss_coef)
  aux_free,  ///< DeepSeek-V3 selection bias (bias_rate); no auxiliary loss
  none,
};

/// The per-expert selection bias of aux-loss-free balancing. It only moves in
/// update(), from global loads, so it is identical on every rank.
class aux_free_bias {
 public:
  /// Bias of expert e; 0 before the first update.
  double operator[](index_t e) const {
    return e < static_cast<index_t>(bias_.size()) ? bias_[static_cast<std::size_t>(e)] : 0.0;
  }
  std::span<const double> values() const { return bias_; }
  /// Restore a bias (from a checkpoint).
  void assign(std::span<const double> b) { bias_.assign(b.begin(), b.end()); }

  /// Add the global per-expert load of one routed batch.
  void record(std::span<const double> load) {
    if (load_.size() != load.size()) load_.assign(load.size(), 0.0);
    for (std::size_t e = 0; e < load.size(); ++e) load_[e] += load[e];
    pending_ = true;
  }

  /// bias_e += rate * sign(mean_load - load_e) over the loads recorded since
  /// the last update (all micro-batches of the step).
  void update(double rate) {
    if (!pending_) return;
    if (bias_.size() != load_.size()) bias_.resize(load_.size(), 0.0);
    double mean = 0;
    for (double l : load_) mean += l;
    mean /= static_cast<double>(load_.size());
    for (std::size_t e = 0; e < load_.size(); ++e)
      bias_[e] += rate * static_cast<double>((load_[e] < mean) - (load_[e] > mean));
    std::fill(load_.begin(), load_.end(), 0.0);
    pending_ = false;
  }

 private:
  std::vector<double> bias_, load_;
  bool pending_ = false;
};

namespace detail {

/// What every softmax gate keeps besides its routing code: its options, the
/// aux-loss-free selection bias, and the end_step that moves the bias. The
/// gates derive from it so the state and its update are written once.
template <class Options>
class balanced_gate {
 public:
  const Options& opts() const { return o_; }
  /// Call after each optimizer step: the aux-free bias follows the last load.
  void end_step(const route_context&) {
    if (o_.balance == balance_mode::aux_free) bias_.update(o_.bias_rate);
  }
  /// The aux-loss-free selection bias (checkpoint it with the router weights).
  aux_free_bias& bias() { return bias_; }
  const aux_free_bias& bias() const { return bias_; }

 protected:
  explicit balanced_gate(const Options& o) : o_(o) {}
  Options o_;
  aux_free_bias bias_;
};

inline void validate_balance(const char* gate, balance_mode mode, double aux_loss_coef, double z_loss_coef,
                             double bias_rate) {
  SEMOE_CHECK(mode == balance_mode::aux_loss || mode == balance_mode::aux_free || mode == balance_mode::none,
              gate, ": options.balance = ", static_cast<int>(mode), ": expected aux_loss, aux_free or none");
  SEMOE_CHECK(aux_loss_coef >= 0 && std::isfinite(aux_loss_coef), gate, ": options.aux_loss_coef = ",
              aux_loss_coef, ": expected a finite value >= 0");
  SEMOE_CHECK(z_loss_coef >= 0 && std::isfinite(z_loss_coef), gate, ": options.z_loss_coef = ", z_loss_coef,
              ": expected a finite value >= 0");
  SEMOE_CHECK(bias_rate >= 0 && std::isfinite(bias_rate), gate, ": options.bias_rate = ", bias_rate,
              ": expected a finite value >= 0");
}

// plan.aux_saved layout of every softmax gate: [0, E) dL/dP_e of one token,
// [E] 2 * z_coef / G, [E + 1, E + 1 + tokens) logsumexp per token, then the
// gate's own saved values.
inline index_t balance_saved_size(index_t experts, index_t tokens) { return experts + 1 + tokens; }

/// plan.probs = softmax of the router logits, and each token's log-sum-exp.
/// Sizes plan.aux_saved for `extra` gate values; returns where they start.
template <Executor Exec, class T, class Space>
index_t router_probs(Exec& ex, matrix_view<const T> logits, routing_plan<T, Space>& plan, index_t extra = 0) {
  const index_t n = plan.tokens, E = plan.experts, base = balance_saved_size(E, n);
  plan.probs.resize_discard(n * E);
  plan.aux_saved.resize_discard(base + extra);
  ex.parallel_for(n, softmax_kernel<T>{logits.data(), logits.ld(), E, plan.probs.data(), plan.aux_saved.data() + E + 1},
                  64);
  return base;
}
template <class T>
index_t router_probs(matrix_view<const T> logits, routing_plan<T>& plan, index_t extra = 0) {
  sequential_executor seq;
  return router_probs(seq, logits, plan, extra);
}

/// Balance and z-loss of a routed plan (choices made, capacity not needed:
/// f_e is measured before capacity). f_e counts the choices c < counted_choices
/// (GShard counts first choices only). Records the global load of all routed
/// choices in `bias` when training. Ends with the saved values backward uses.
/// The sums run on `ex` (integer counts, and double sums in token order, so
/// every executor gives the same bits); the losses are formed on the host.
template <Executor Exec, class T, class Space>
void router_losses(Exec& ex, const route_context& ctx, routing_plan<T, Space>& plan, balance_mode mode,
                   double aux_loss_coef, double z_loss_coef, index_t counted_choices, aux_free_bias* bias = nullptr) {
  const index_t n = plan.tokens, E = plan.experts, k = plan.k;
  std::vector<T> saved(static_cast<std::size_t>(E + 1), T(0));  // aux_saved[0, E]
  plan.balance_loss = plan.z_loss = T(0);
  const bool aux = mode == balance_mode::aux_loss && aux_loss_coef > 0;
  const bool bias_on = mode == balance_mode::aux_free && bias != nullptr;
  const bool z = z_loss_coef > 0;
  if (aux || bias_on || z) {  // the same decision on every rank: no collective otherwise
    // One all-reduce: [counted choices | all routed choices | prob sums | sum lse^2].
    buffer<std::uint64_t, Space> count(2 * E);
    buffer<double, Space> sums(E + 1);
    count.zero();
    count_choices(ex, plan.expert.data(), n * k, k, E, counted_choices, count.data());
    ex.parallel_for(E + 1, router_sums_kernel<T>{plan.probs.data(), plan.aux_saved.data() + E + 1, n, E, sums.data()},
                    1);
    std::vector<std::uint64_t> c(static_cast<std::size_t>(2 * E));
    std::vector<double> red(static_cast<std::size_t>(3 * E + 1));
    ex.copy(c.data(), count.data(), count.bytes());
    ex.copy(red.data() + 2 * E, sums.data(), sums.bytes());
    for (index_t i = 0; i < 2 * E; ++i) red[static_cast<std::size_t>(i)] = static_cast<double>(c[i]);
    ctx.all_reduce_sum(red);

    const double G = static_cast<double>(ctx.global_tokens);
    if (aux) {
      double sum = 0;
      for (index_t e = 0; e < E; ++e) {
        const double f = red[static_cast<std::size_t>(e)] / (G * static_cast<double>(counted_choices));
        sum += f * red[static_cast<std::size_t>(2 * E + e)] / G;
        saved[e] = static_cast<T>(aux_loss_coef * static_cast<double>(E) * f / G);  // dL/dp[t, e], any t
      }
      plan.balance_loss = static_cast<T>(aux_loss_coef * static_cast<double>(E) * sum);
    }
    if (z) {
      plan.z_loss = static_cast<T>(z_loss_coef * red[static_cast<std::size_t>(3 * E)] / G);
      saved[E] = static_cast<T>(2 * z_loss_coef / G);
    }
    if (bias_on && ctx.training)
      bias->record(std::span<const double>(red).subspan(static_cast<std::size_t>(E), static_cast<std::size_t>(E)));
  }
  ex.copy(plan.aux_saved.data(), saved.data(), saved.size() * sizeof(T));
}
template <class T>
void router_losses(const route_context& ctx, routing_plan<T>& plan, balance_mode mode, double aux_loss_coef,
                   double z_loss_coef, index_t counted_choices, aux_free_bias* bias = nullptr) {
  sequential_executor seq;
  router_losses(seq, ctx, plan, mode, aux_loss_coef, z_loss_coef, counted_choices, bias);
}

/// Adds to dlogits row t the gradient through the router probabilities: dp
/// (the gate's dL/dp[t, :], used as scratch) plus the balance loss, pushed
/// through the softmax, plus the z-loss.
template <class T>
void router_probs_backward(const routing_plan<T>& plan, index_t t, T* dp, matrix_view<T> dlogits) {
  const index_t E = plan.experts;
  const T* p = plan.probs.data() + t * E;
  const T* saved = plan.aux_saved.data();
  double dot = 0;
  for (index_t e = 0; e < E; ++e) {
    dp[e] += saved[e];
    dot += static_cast<double>(p[e]) * static_cast<double>(dp[e]);
  }
  const double zt = static_cast<double>(saved[E]) * static_cast<double>(saved[E + 1 + t]);
  for (index_t e = 0; e < E; ++e)
    dlogits(t, e) += static_cast<T>(static_cast<double>(p[e]) * (static_cast<double>(dp[e]) - dot + zt));
}

}  // namespace detail
}  // namespace semoe::gate
