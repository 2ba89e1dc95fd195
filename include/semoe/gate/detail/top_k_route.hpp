// semoe/gate/detail/top_k_route.hpp: softmax -> top-k -> weights, and its
// exact backward, on any executor; the body of top_k, switch_gate and gshard.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/core/executor.hpp"
#include "semoe/gate/balance.hpp"
#include "semoe/gate/detail/common.hpp"
#include "semoe/gate/detail/kernels.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate::detail {

/// Picks the k largest of probs + bias per token (bias: aux-free balancing;
/// selection only) and sets the weights from the unbiased probs, divided by
/// the sum over the k picked when `normalize`. Needs router_probs() first.
template <Executor Exec, class T, class Space>
void select_top_k(Exec& ex, routing_plan<T, Space>& plan, bool normalize, const aux_free_bias* bias) {
  const index_t E = plan.experts;
  buffer<double, Space> b;
  if (bias) {
    std::vector<double> host(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) host[static_cast<std::size_t>(e)] = (*bias)[e];
    b.resize_discard(E);
    ex.copy(b.data(), host.data(), b.bytes());
  }
  ex.parallel_for(plan.tokens,
                  top_k_select_kernel<T>{plan.probs.data(), E, plan.k, bias ? b.data() : nullptr, normalize,
                                         plan.expert.data(), plan.weight.data(), plan.score.data()},
                  64);
}
template <class T>
void select_top_k(routing_plan<T>& plan, bool normalize, const aux_free_bias* bias) {
  sequential_executor seq;
  select_top_k(seq, plan, normalize, bias);
}

/// Sets every row of dlogits to the gradient of sum_a dweight[a] * weight[a]
/// + aux losses. selected(a) is the expert choice a picked, also when the
/// gate then did not route it (GShard's second expert still normalizes the
/// first); dweight of unrouted choices is ignored, their weight being 0.
template <Executor Exec, class T, class Space, class Selected>
void top_k_backward(Exec& ex, const routing_plan<T, Space>& plan, const T* dweight, bool normalize, Selected selected,
                    matrix_view<T> dlogits) {
  ex.parallel_for(plan.tokens,
                  top_k_backward_kernel<T, Selected>{plan.probs.data(), plan.aux_saved.data(), plan.expert.data(),
                                                     selected, dweight, plan.experts, plan.k, normalize,
                                                     dlogits.data(), dlogits.ld()},
                  64);
}
template <class T, class Selected>
void top_k_backward(const routing_plan<T>& plan, std::span<const T> dweight, bool normalize, Selected selected,
                    matrix_view<T> dlogits) {
  sequential_executor seq;
  top_k_backward(seq, plan, dweight.data(), normalize, selected, dlogits);
}

/// Whether options ask for DeepSpeed's re-normalization over kept choices.
template <class O>
constexpr bool renormalizes(const O& o) {
  if constexpr (requires { o.renormalize_after_drops; })
    return o.renormalize_after_drops;
  else
    return false;
}

/// The whole route of the softmax top-k gates (top_k, switch_gate) on
/// executor `ex`: softmax and top-k fused per token, capacity, then the loss
/// sums (and, where the options ask, weights re-normalized over the choices
/// capacity kept). The same bits on every executor.
template <Executor Exec, class T, class Space, class O>
void route_top_k(Exec& ex, const char* gate, const route_context& ctx, matrix_view<const T> logits,
                 routing_plan<T, Space>& plan, index_t k, bool normalize, const O& o, aux_free_bias& bias) {
  const route_context g = begin_route(ex, gate, ctx, logits, plan, k);
  router_probs(ex, logits, plan);
  select_top_k(ex, plan, normalize, o.balance == balance_mode::aux_free ? &bias : nullptr);
  apply_capacity(ex, g, plan, o);
  if (renormalizes(o))
    ex.parallel_for(plan.tokens,
                    renormalize_kept_kernel<T>{plan.probs.data(), plan.expert.data(), plan.slot.data(), plan.experts,
                                               plan.k, plan.weight.data()},
                    64);
  router_losses(ex, g, plan, o.balance, o.aux_loss_coef, o.z_loss_coef, k, &bias);
}

/// Their backward: writes every element of dlogits (in the executor's memory).
/// Re-normalized weights are normalized over the kept choices only.
template <Executor Exec, class T, class Space>
void backward_top_k(Exec& ex, const char* gate, matrix_view<const T> logits, const routing_plan<T, Space>& plan,
                    std::span<const T> dweight, bool normalize, matrix_view<T> dlogits, bool renormalized = false) {
  check_backward(gate, logits, plan, dweight, dlogits);
  if (renormalized)
    top_k_backward(ex, plan, dweight.data(), true, kept_expert{plan.expert.data(), plan.slot.data()}, dlogits);
  else
    top_k_backward(ex, plan, dweight.data(), normalize, selected_expert{plan.expert.data()}, dlogits);
}

}  // namespace semoe::gate::detail
