// semoe/gate/detail/top_k_route.hpp: softmax -> top-k -> weights, and its
// exact backward, on any executor; the body of top_k, switch_gate and gshard.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/core/executor.hpp"
#include "semoe/gate/balance.hpp"
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
  ex.parallel_for(plan.tokens, top_k_select_kernel<T>{plan.probs.data(), E, plan.k, bias ? b.data() : nullptr, normalize,
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

}  // namespace semoe::gate::detail
