// semoe/gate/top_k.hpp: softmax top-k gating (Shazeer et al. 2017 without the
// noise; the SE-MoE paper's default gate). Weights are the softmax
// probabilities of the k picked experts, renormalized over them by default.
#pragma once

#include <span>

#include "semoe/core/executor.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/gate/balance.hpp"
#include "semoe/gate/concepts.hpp"
#include "semoe/gate/detail/common.hpp"
#include "semoe/gate/detail/top_k_route.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate {

template <int K>
struct top_k_options {
  double capacity_factor = 1.25;
  double eval_capacity_factor = 2.0;  ///< used when not training (GShard's evaluation capacity)
  bool dropless = false;
  index_t min_capacity = 0;           ///< no expert's capacity below this (DeepSpeed's min_capacity; 0: none)
  drop_policy drop = drop_policy::position;
  balance_mode balance = balance_mode::aux_loss;
  double aux_loss_coef = 1e-2;  ///< used when balance == aux_loss
  double z_loss_coef = 1e-3;
  double bias_rate = 1e-3;      ///< used when balance == aux_free
  /// Weights / sum over the K picked (Mixtral, Qwen3-MoE, DeepSpeed); false
  /// keeps the raw softmax probabilities (OLMoE, Qwen2-MoE's
  /// norm_topk_prob = false). With K = 1 it would make every weight 1.
  bool normalize = K > 1;
  /// After capacity drops, divide each token's kept weights by their sum
  /// (DeepSpeed's top-2 gating), whatever `normalize` says.
  bool renormalize_after_drops = false;
};

template <int K>
class top_k : public detail::balanced_gate<top_k_options<K>> {
  static_assert(K >= 1, "semoe::gate::top_k<K>: K must be at least 1");

 public:
  using policy_kind = gate_tag;
  using options = top_k_options<K>;
  static constexpr const char* name = "semoe::gate::top_k";

  explicit top_k(options o = {}) : detail::balanced_gate<top_k_options<K>>(o) { validate(o_); }
  static void validate(const options& o) { detail::validate_common(name, o); }

  index_t choices(index_t experts) const { return detail::check_choices(name, K, experts); }

  /// Routes on executor `ex` over logits and a plan in its memory: softmax
  /// and top-k fused per token, capacity and the loss sums as kernels, the
  /// plan's tables by histogram, scan and stable sort. The same bits on
  /// every executor.
  template <Executor Exec, class T, class Space>
  void route(Exec& ex, const route_context& ctx, matrix_view<const T> logits, routing_plan<T, Space>& plan) {
    detail::route_top_k(ex, name, ctx, logits, plan, choices(logits.cols()), o_.normalize, o_, bias_);
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
    detail::backward_top_k(ex, name, logits, plan, dweight, o_.normalize, dlogits, o_.renormalize_after_drops);
  }
  template <class T>
  void backward(const route_context& ctx, matrix_view<const T> logits, const routing_plan<T>& plan,
                std::span<const T> dweight, matrix_view<T> dlogits) const {
    sequential_executor seq;
    backward(seq, ctx, logits, plan, dweight, dlogits);
  }

 private:
  using detail::balanced_gate<top_k_options<K>>::o_;
  using detail::balanced_gate<top_k_options<K>>::bias_;
};

}  // namespace semoe::gate
