// semoe/gate/noisy_top_k.hpp: noisy top-k gating (Shazeer et al. 2017):
// H = logits + noise, keep the top k of H, weights = softmax over the kept H.
// The paper learns the noise scale with a second router matrix; the layer
// owns only Wg, so the scale here is the fixed options.noise_std.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "semoe/core/tensor.hpp"
#include "semoe/gate/balance.hpp"
#include "semoe/gate/concepts.hpp"
#include "semoe/gate/detail/common.hpp"
#include "semoe/gate/detail/softmax.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate {

struct noisy_top_k_options {
  double capacity_factor = 1.25;
  double eval_capacity_factor = 2.0;  ///< used when not training (GShard's evaluation capacity)
  bool dropless = false;
  drop_policy drop = drop_policy::position;
  balance_mode balance = balance_mode::aux_loss;
  double aux_loss_coef = 1e-2;  ///< used when balance == aux_loss
  double z_loss_coef = 1e-3;
  double bias_rate = 1e-3;      ///< used when balance == aux_free (added to H for selection)
  double noise_std = 1.0;       ///< std of the Gaussian added to the logits while training
};

template <int K>
class noisy_top_k : public detail::balanced_gate<noisy_top_k_options> {
  static_assert(K >= 1, "semoe::gate::noisy_top_k<K>: K must be at least 1");

 public:
  using policy_kind = gate_tag;
  using options = noisy_top_k_options;
  static constexpr const char* name = "semoe::gate::noisy_top_k";

  explicit noisy_top_k(options o = {}) : detail::balanced_gate<noisy_top_k_options>(o) { validate(o_); }
  static void validate(const options& o) {
    detail::validate_common(name, o);
    SEMOE_CHECK(o.noise_std >= 0 && std::isfinite(o.noise_std), name, ": options.noise_std = ", o.noise_std,
                ": expected a finite value >= 0");
  }

  index_t choices(index_t experts) const { return detail::check_choices(name, K, experts); }

  template <class T>
  void route(const route_context& ctx, matrix_view<const T> logits, routing_plan<T>& plan) {
    const index_t k = choices(logits.cols());
    const route_context g = detail::begin_route(name, ctx, logits, plan, k);
    const index_t E = plan.experts;
    detail::router_probs(logits, plan);  // clean probabilities: balance and z-loss
    const bool noisy = g.training && o_.noise_std > 0;
    const auto rng = detail::noise_source(g, detail::noise_use::noisy_logits);
    const bool biased = o_.balance == balance_mode::aux_free;
    std::vector<T> h(static_cast<std::size_t>(E));
    std::vector<double> s(static_cast<std::size_t>(E));
    std::vector<std::int32_t> sel(static_cast<std::size_t>(k));
    std::vector<T> kept(static_cast<std::size_t>(k));
    for (index_t t = 0; t < plan.tokens; ++t) {
      for (index_t e = 0; e < E; ++e) {
        h[e] = logits(t, e);
        if (noisy)
          h[e] += static_cast<T>(o_.noise_std) * static_cast<T>(rng.normal(detail::noise_counter(g, t, E, e)));
        s[e] = static_cast<double>(h[e]) + (biased ? bias_[e] : 0.0);
      }
      detail::top_k_indices(s.data(), E, k, sel.data());
      for (index_t c = 0; c < k; ++c) kept[c] = h[sel[c]];
      detail::softmax_row(as_matrix<const T>(kept.data(), 1, k), 0, plan.weight.data() + t * k);
      for (index_t c = 0; c < k; ++c) {
        plan.expert[t * k + c] = sel[c];
        plan.score[t * k + c] = static_cast<float>(plan.weight[t * k + c]);
      }
    }
    detail::apply_capacity(g, plan, o_);
    detail::router_losses(g, plan, o_.balance, o_.aux_loss_coef, o_.z_loss_coef, k, &bias_);
  }

  /// The noise is held fixed: dH = dlogits, and the weights are a softmax of
  /// the kept H, so their gradient is the softmax Jacobian on those k entries.
  template <class T>
  void backward(const route_context&, matrix_view<const T> logits, const routing_plan<T>& plan,
                std::span<const T> dweight, matrix_view<T> dlogits) const {
    detail::begin_backward(name, logits, plan, dweight, dlogits);
    const index_t E = plan.experts, k = plan.k;
    std::vector<T> dp(static_cast<std::size_t>(E)), dh(static_cast<std::size_t>(k));
    for (index_t t = 0; t < plan.tokens; ++t) {
      detail::softmax_backward(plan.weight.data() + t * k, dweight.data() + t * k, k, dh.data());
      for (index_t c = 0; c < k; ++c) dlogits(t, plan.expert[t * k + c]) += dh[c];
      std::fill(dp.begin(), dp.end(), T(0));
      detail::router_probs_backward(plan, t, dp.data(), dlogits);
    }
  }


 private:
  using detail::balanced_gate<noisy_top_k_options>::o_;
  using detail::balanced_gate<noisy_top_k_options>::bias_;
};

}  // namespace semoe::gate
