// semoe/gate/detail/top_k_route.hpp: softmax -> top-k -> weights, and its
// exact backward; the body of top_k, switch_gate and gshard.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "semoe/gate/balance.hpp"
#include "semoe/gate/detail/softmax.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate::detail {

/// Picks the k largest of probs + bias per token (bias: aux-free balancing;
/// selection only) and sets the weights from the unbiased probs, divided by
/// the sum over the k picked when `normalize`. Needs router_probs() first.
template <class T>
void select_top_k(routing_plan<T>& plan, bool normalize, const aux_free_bias* bias) {
  const index_t n = plan.tokens, E = plan.experts, k = plan.k;
  std::vector<double> s(static_cast<std::size_t>(E));
  std::vector<std::int32_t> sel(static_cast<std::size_t>(k));
  for (index_t t = 0; t < n; ++t) {
    const T* p = plan.probs.data() + t * E;
    for (index_t e = 0; e < E; ++e) s[e] = static_cast<double>(p[e]) + (bias ? (*bias)[e] : 0.0);
    top_k_indices(s.data(), E, k, sel.data());
    double sum = 0;
    for (index_t c = 0; c < k; ++c) sum += static_cast<double>(p[sel[c]]);
    for (index_t c = 0; c < k; ++c) {
      const index_t a = t * k + c;
      const T pe = p[sel[c]];
      plan.expert[a] = sel[c];
      plan.weight[a] = normalize ? static_cast<T>(static_cast<double>(pe) / sum) : pe;
      plan.score[a] = static_cast<float>(pe);
    }
  }
}

/// Adds the gradient of sum_a dweight[a] * weight[a] + aux losses to dlogits
/// (zeroed by the caller). selected(a) is the expert choice a picked, also when
/// the gate then did not route it (GShard's second expert still normalizes
/// the first); dweight of unrouted choices is ignored, their weight being 0.
template <class T, class Selected>
void top_k_backward(const routing_plan<T>& plan, std::span<const T> dweight, bool normalize, Selected selected,
                    matrix_view<T> dlogits) {
  const index_t n = plan.tokens, E = plan.experts, k = plan.k;
  std::vector<T> dp(static_cast<std::size_t>(E));
  for (index_t t = 0; t < n; ++t) {
    const T* p = plan.probs.data() + t * E;
    std::fill(dp.begin(), dp.end(), T(0));
    auto g = [&](index_t a) { return plan.expert[a] >= 0 ? static_cast<double>(dweight[a]) : 0.0; };
    if (normalize) {
      // w_c = p_c / S  =>  dL/dp_c = (g_c - sum_j g_j w_j) / S
      double sum = 0, gw = 0;
      for (index_t c = 0; c < k; ++c) sum += static_cast<double>(p[selected(t * k + c)]);
      for (index_t c = 0; c < k; ++c) gw += g(t * k + c) * static_cast<double>(p[selected(t * k + c)]) / sum;
      for (index_t c = 0; c < k; ++c) dp[selected(t * k + c)] += static_cast<T>((g(t * k + c) - gw) / sum);
    } else {
      for (index_t c = 0; c < k; ++c) dp[selected(t * k + c)] += static_cast<T>(g(t * k + c));
    }
    router_probs_backward(plan, t, dp.data(), dlogits);
  }
}

}  // namespace semoe::gate::detail
