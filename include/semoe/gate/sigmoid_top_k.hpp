// semoe/gate/sigmoid_top_k.hpp: DeepSeek-V3's router. Each expert's score is
// the sigmoid of its logit (not a softmax over experts); the k experts are
// chosen by score + a per-expert selection bias (aux-loss-free balancing),
// optionally only among the `top_groups` best of `groups` equal groups of
// experts (a group scores the sum of its two best biased scores). The combine
// weights are the unbiased scores of the chosen experts, divided by their sum
// when `normalize`, times `scaling` (DeepSeek-V3's routed_scaling_factor). The
// bias only ever changes which experts are chosen: it has no gradient.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/executor.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/gate/balance.hpp"
#include "semoe/gate/concepts.hpp"
#include "semoe/gate/detail/common.hpp"
#include "semoe/gate/detail/kernels.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate {

template <int K>
struct sigmoid_top_k_options {
  double capacity_factor = 1.25;
  double eval_capacity_factor = 2.0;  ///< used when not training
  bool dropless = false;
  index_t min_capacity = 0;  ///< no expert's capacity below this (0: none)
  drop_policy drop = drop_policy::position;
  /// aux_free (DeepSeek-V3) or none. The softmax balance loss and the z-loss
  /// are defined on a softmax over experts and are refused here.
  balance_mode balance = balance_mode::aux_free;
  double aux_loss_coef = 0;
  double z_loss_coef = 0;
  double bias_rate = 1e-3;  ///< the bias's step per update (DeepSeek-V3's gamma)
  bool normalize = K > 1;   ///< weights / sum of the K chosen scores (norm_topk_prob)
  double scaling = 1.0;     ///< weights times this (routed_scaling_factor)
  index_t groups = 1;       ///< experts form this many equal groups (n_group)
  index_t top_groups = 1;   ///< choices come from the best this many groups (topk_group)
};

namespace detail {

/// Largest group count the per-token kernels handle (a 64-bit group mask).
inline constexpr index_t max_expert_groups = 64;

/// scores[t, e] = sigmoid(logits[t, e]), evaluated in double and rounded once.
template <class T>
struct sigmoid_kernel {
  const T* logits;
  index_t ld, experts;
  T* scores;
  SEMOE_HD void operator()(index_t t) const {
    for (index_t e = 0; e < experts; ++e)
      scores[t * experts + e] = static_cast<T>(1.0 / (1.0 + ::exp(-static_cast<double>(logits[t * ld + e]))));
  }
};

/// Per token: the best `top_groups` groups by the sum of each group's two
/// largest biased scores, then the k largest biased scores inside them;
/// weights from the unbiased scores. Ties keep the lower index (top_k_by).
template <class T>
struct sigmoid_select_kernel {
  const T* scores;
  const double* bias;  // [experts] or null
  index_t experts, k, groups, top_groups;
  bool normalize;
  double scaling;
  std::int32_t* expert;
  T* weight;
  float* score;

  SEMOE_HD double biased(index_t t, index_t e) const {
    return static_cast<double>(scores[t * experts + e]) + (bias ? bias[e] : 0.0);
  }

  SEMOE_HD void operator()(index_t t) const {
    std::uint64_t allowed = ~std::uint64_t{0};
    const index_t per = experts / groups;
    if (top_groups < groups) {
      const auto group_score = [this, t, per](index_t g) {
        double best = -1e300, second = -1e300;
        for (index_t e = g * per; e < (g + 1) * per; ++e) {
          const double s = biased(t, e);
          if (s > best) {
            second = best;
            best = s;
          } else if (s > second) {
            second = s;
          }
        }
        return per > 1 ? best + second : best;
      };
      std::int32_t kept[max_expert_groups];
      top_k_by(group_score, groups, top_groups, kept);
      allowed = 0;
      for (index_t i = 0; i < top_groups; ++i) allowed |= std::uint64_t{1} << kept[i];
    }
    std::int32_t* sel = expert + t * k;
    top_k_by(
        [this, t, per, allowed](index_t e) {
          return (allowed >> (e / per)) & 1 ? biased(t, e) : -std::numeric_limits<double>::infinity();
        },
        experts, k, sel);
    double sum = 0;
    for (index_t c = 0; c < k; ++c) sum += static_cast<double>(scores[t * experts + sel[c]]);
    for (index_t c = 0; c < k; ++c) {
      const double s = static_cast<double>(scores[t * experts + sel[c]]);
      weight[t * k + c] = static_cast<T>((normalize ? s / sum : s) * scaling);
      score[t * k + c] = static_cast<float>(s);
    }
  }
};

/// dlogits[t, :] of sum_c dweight[c] * weight[c]: through the normalization
/// (w_c = a s_c / S: dL/ds_c = a (g_c - sum_j g_j s_j / S) / S) and the
/// sigmoid (ds/dx = s (1 - s)). Experts not chosen get 0; so does the bias.
/// Choices capacity dropped still count in S, as in forward; their dweight
/// is ignored (nothing combined them).
template <class T>
struct sigmoid_backward_kernel {
  const T* scores;
  const std::int32_t* expert;  // the K chosen per token
  const std::int32_t* slot;    // < 0: dropped by capacity
  const T* dweight;
  index_t experts, k;
  bool normalize;
  double scaling;
  T* dlogits;
  index_t ld;
  SEMOE_HD void operator()(index_t t) const {
    T* out = dlogits + t * ld;
    for (index_t e = 0; e < experts; ++e) out[e] = T(0);
    double sum = 0, gs = 0;
    for (index_t c = 0; c < k; ++c) {
      const index_t a = t * k + c;
      const double s = static_cast<double>(scores[t * experts + expert[a]]);
      const double g = slot[a] >= 0 ? static_cast<double>(dweight[a]) : 0.0;
      sum += s;
      gs += g * s;
    }
    for (index_t c = 0; c < k; ++c) {
      const index_t a = t * k + c, e = expert[a];
      const double s = static_cast<double>(scores[t * experts + e]);
      const double g = slot[a] >= 0 ? static_cast<double>(dweight[a]) : 0.0;
      const double ds = normalize ? scaling * (g - gs / sum) / sum : scaling * g;
      out[e] = static_cast<T>(static_cast<double>(out[e]) + ds * s * (1.0 - s));
    }
  }
};

}  // namespace detail

template <int K>
class sigmoid_top_k : public detail::balanced_gate<sigmoid_top_k_options<K>> {
  static_assert(K >= 1, "semoe::gate::sigmoid_top_k<K>: K must be at least 1");

 public:
  using policy_kind = gate_tag;
  using options = sigmoid_top_k_options<K>;
  static constexpr const char* name = "semoe::gate::sigmoid_top_k";

  explicit sigmoid_top_k(options o = {}) : detail::balanced_gate<options>(o) { validate(o_); }

  static void validate(const options& o) {
    detail::validate_common(name, o);
    SEMOE_CHECK(o.balance != balance_mode::aux_loss, name,
                ": options.balance = aux_loss: the auxiliary loss is "
                "defined on softmax probabilities; use balance_mode::aux_free (DeepSeek-V3) or none");
    SEMOE_CHECK(o.z_loss_coef == 0, name, ": options.z_loss_coef = ", o.z_loss_coef,
                ": the router z-loss is defined on a softmax over experts; expected 0");
    SEMOE_CHECK(o.scaling > 0 && std::isfinite(o.scaling), name, ": options.scaling = ", o.scaling,
                ": expected a finite value > 0");
    SEMOE_CHECK(o.groups >= 1 && o.groups <= detail::max_expert_groups, name, ": options.groups = ", o.groups,
                ": expected 1 .. ", detail::max_expert_groups);
    SEMOE_CHECK(o.top_groups >= 1 && o.top_groups <= o.groups, name, ": options.top_groups = ", o.top_groups,
                ": expected 1 .. groups = ", o.groups);
  }

  index_t choices(index_t experts) const {
    detail::check_choices(name, K, experts);
    SEMOE_CHECK(experts % o_.groups == 0, name, ": experts = ", experts,
                " do not split into options.groups = ", o_.groups, " equal groups");
    SEMOE_CHECK(K <= o_.top_groups * (experts / o_.groups), name, ": k = ", K, " exceeds the ",
                o_.top_groups * (experts / o_.groups), " experts of options.top_groups = ", o_.top_groups, " groups");
    return K;
  }

  /// Routes on executor `ex` over logits and a plan in its memory.
  template <Executor Exec, class T, class Space>
  void route(Exec& ex, const route_context& ctx, matrix_view<const T> logits, routing_plan<T, Space>& plan) {
    const index_t k = choices(logits.cols()), E = logits.cols();
    const route_context g = detail::begin_route(ex, name, ctx, logits, plan, k);
    plan.probs.resize_discard(plan.tokens * E);
    plan.aux_saved.resize_discard(detail::balance_saved_size(E, plan.tokens));
    plan.aux_saved.zero();  // no log-sum-exp: router_losses only counts loads here
    ex.parallel_for(plan.tokens, detail::sigmoid_kernel<T>{logits.data(), logits.ld(), E, plan.probs.data()}, 64);
    buffer<double, Space> b;
    const bool biased = o_.balance == balance_mode::aux_free;
    if (biased) {
      std::vector<double> host(static_cast<std::size_t>(E));
      for (index_t e = 0; e < E; ++e) host[static_cast<std::size_t>(e)] = bias_[e];
      b.resize_discard(E);
      ex.copy(b.data(), host.data(), b.bytes());
    }
    ex.parallel_for(plan.tokens,
                    detail::sigmoid_select_kernel<T>{plan.probs.data(), biased ? b.data() : nullptr, E, k, o_.groups,
                                                     o_.top_groups, o_.normalize, o_.scaling, plan.expert.data(),
                                                     plan.weight.data(), plan.score.data()},
                    64);
    detail::apply_capacity(ex, g, plan, o_);
    detail::router_losses(ex, g, plan, o_.balance, 0.0, 0.0, k, &bias_);
  }
  template <class T>
  void route(const route_context& ctx, matrix_view<const T> logits, routing_plan<T>& plan) {
    sequential_executor seq;
    route(seq, ctx, logits, plan);
  }

  /// Writes every element of dlogits (in the executor's memory).
  template <Executor Exec, class T, class Space>
  void backward(Exec& ex, const route_context&, matrix_view<const T> logits, const routing_plan<T, Space>& plan,
                std::span<const T> dweight, matrix_view<T> dlogits) const {
    detail::check_backward(name, logits, plan, dweight, dlogits);
    ex.parallel_for(plan.tokens,
                    detail::sigmoid_backward_kernel<T>{plan.probs.data(), plan.expert.data(), plan.slot.data(),
                                                       dweight.data(), plan.experts, plan.k, o_.normalize, o_.scaling,
                                                       dlogits.data(), dlogits.ld()},
                    64);
  }
  template <class T>
  void backward(const route_context& ctx, matrix_view<const T> logits, const routing_plan<T>& plan,
                std::span<const T> dweight, matrix_view<T> dlogits) const {
    sequential_executor seq;
    backward(seq, ctx, logits, plan, dweight, dlogits);
  }

 private:
  using detail::balanced_gate<options>::o_;
  using detail::balanced_gate<options>::bias_;
};

}  // namespace semoe::gate
