// semoe/gate/gshard.hpp: GShard top-2 gating (Lepikhin et al. 2020, Alg. 1):
// weights normalized over the two picked experts; while training the second
// expert is used only with probability 2 * w2 ("random routing"), and when it
// is not, the first keeps w1 = p1 / (p1 + p2). The balance loss counts first
// choices only, as in the paper.
#pragma once

#include <span>

#include "semoe/core/tensor.hpp"
#include "semoe/gate/balance.hpp"
#include "semoe/gate/concepts.hpp"
#include "semoe/gate/detail/common.hpp"
#include "semoe/gate/detail/top_k_route.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate {

struct gshard_options {
  double capacity_factor = 1.25;
  double eval_capacity_factor = 2.0;  ///< used when not training (GShard's evaluation capacity)
  bool dropless = false;
  index_t min_capacity = 0;           ///< no expert's capacity below this (DeepSpeed's min_capacity; 0: none)
  drop_policy drop = drop_policy::position;
  balance_mode balance = balance_mode::aux_loss;
  double aux_loss_coef = 1e-2;  ///< used when balance == aux_loss
  double z_loss_coef = 1e-3;
  double bias_rate = 1e-3;      ///< used when balance == aux_free
  bool random_routing = true;   ///< route the 2nd expert with probability 2 * w2 while training
};

class gshard : public detail::balanced_gate<gshard_options> {
 public:
  using policy_kind = gate_tag;
  using options = gshard_options;
  static constexpr const char* name = "semoe::gate::gshard";

  explicit gshard(options o = {}) : detail::balanced_gate<gshard_options>(o) { validate(o_); }
  static void validate(const options& o) { detail::validate_common(name, o); }

  index_t choices(index_t experts) const { return detail::check_choices(name, 2, experts); }

  template <class T>
  void route(const route_context& ctx, matrix_view<const T> logits, routing_plan<T>& plan) {
    const index_t k = choices(logits.cols());
    const route_context g = detail::begin_route(name, ctx, logits, plan, k);
    // Saved after the balance values: the picked 2nd expert of every token,
    // which the normalization of w1 depends on even when it is not routed.
    const index_t second = detail::router_probs(logits, plan, plan.tokens);
    detail::select_top_k(plan, true, o_.balance == balance_mode::aux_free ? &bias_ : nullptr);
    const auto rng = detail::noise_source(g, detail::noise_use::gshard_second);
    for (index_t t = 0; t < plan.tokens; ++t) {
      const index_t a = 2 * t + 1;
      const auto e2 = plan.expert[a];
      plan.aux_saved[second + t] = static_cast<T>(e2);
      if (!(o_.random_routing && g.training)) continue;
      const float u = rng.uniform(detail::noise_counter(g, t, plan.experts, e2));
      if (!(2 * static_cast<double>(plan.weight[a]) > static_cast<double>(u))) {
        plan.expert[a] = -1;
        plan.weight[a] = T(0);
      }
    }
    detail::apply_capacity(g, plan, o_);
    detail::router_losses(g, plan, o_.balance, o_.aux_loss_coef, o_.z_loss_coef, 1, &bias_);
  }

  template <class T>
  void backward(const route_context&, matrix_view<const T> logits, const routing_plan<T>& plan,
                std::span<const T> dweight, matrix_view<T> dlogits) const {
    detail::begin_backward(name, logits, plan, dweight, dlogits);
    const T* second = plan.aux_saved.data() + detail::balance_saved_size(plan.experts, plan.tokens);
    auto selected = [&](index_t a) {
      return a % 2 == 0 ? static_cast<index_t>(plan.expert[a]) : static_cast<index_t>(second[a / 2]);
    };
    detail::top_k_backward(plan, dweight, true, selected, dlogits);
  }


 private:
  using detail::balanced_gate<gshard_options>::o_;
  using detail::balanced_gate<gshard_options>::bias_;
};

}  // namespace semoe::gate
