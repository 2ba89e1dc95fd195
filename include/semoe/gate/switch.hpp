// semoe/gate/switch.hpp: the Switch Transformer router (Fedus et al. 2021):
// top-1, combine weight = the expert's softmax probability, multiplicative
// jitter on the router input during training (applied by the layer).
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

struct switch_options {
  double capacity_factor = 1.25;
  double eval_capacity_factor = 2.0;  ///< used when not training (GShard's evaluation capacity)
  bool dropless = false;
  index_t min_capacity = 0;           ///< no expert's capacity below this (DeepSpeed's min_capacity; 0: none)
  drop_policy drop = drop_policy::position;
  balance_mode balance = balance_mode::aux_loss;
  double aux_loss_coef = 1e-2;  ///< used when balance == aux_loss
  double z_loss_coef = 1e-3;
  double bias_rate = 1e-3;      ///< used when balance == aux_free
  double jitter_eps = 1e-2;     ///< router input times U(1 - eps, 1 + eps) while training; 0 turns it off
};

class switch_gate : public detail::balanced_gate<switch_options> {
 public:
  using policy_kind = gate_tag;
  using options = switch_options;
  static constexpr const char* name = "semoe::gate::switch_gate";

  explicit switch_gate(options o = {}) : detail::balanced_gate<switch_options>(o) { validate(o_); }
  static void validate(const options& o) {
    detail::validate_common(name, o);
    SEMOE_CHECK(o.jitter_eps >= 0 && o.jitter_eps < 1, name, ": options.jitter_eps = ", o.jitter_eps,
                ": expected a value in [0, 1)");
  }

  index_t choices(index_t experts) const { return detail::check_choices(name, 1, experts); }
  float input_jitter() const { return static_cast<float>(o_.jitter_eps); }

  /// Routes on executor `ex` over logits and a plan in its memory: softmax
  /// and top-k fused per token, capacity and the loss sums as kernels, the
  /// plan's tables by histogram, scan and stable sort. The same bits on
  /// every executor.
  template <Executor Exec, class T, class Space>
  void route(Exec& ex, const route_context& ctx, matrix_view<const T> logits, routing_plan<T, Space>& plan) {
    detail::route_top_k(ex, name, ctx, logits, plan, choices(logits.cols()), false, o_, bias_);
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
    detail::backward_top_k(ex, name, logits, plan, dweight, false, dlogits);
  }
  template <class T>
  void backward(const route_context& ctx, matrix_view<const T> logits, const routing_plan<T>& plan,
                std::span<const T> dweight, matrix_view<T> dlogits) const {
    sequential_executor seq;
    backward(seq, ctx, logits, plan, dweight, dlogits);
  }

 private:
  using detail::balanced_gate<switch_options>::o_;
  using detail::balanced_gate<switch_options>::bias_;
};

}  // namespace semoe::gate
