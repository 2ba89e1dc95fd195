// semoe/gate/expert_choice.hpp: expert-choice routing (Zhou et al. 2022):
// S = softmax over experts; every expert takes the C tokens of the whole group
// with the highest S[t, e], C = ceil(capacity_factor * tokens / E). Written as
// k = E candidates per token ranked by score = S[t, e], so the group-wide
// top-C is limit_by_capacity's probability policy; weight = S[t, e]. A token
// may get any number of experts, including none. Balanced by construction.
#pragma once

#include <algorithm>
#include <span>
#include <vector>

#include "semoe/core/tensor.hpp"
#include "semoe/gate/balance.hpp"
#include "semoe/gate/concepts.hpp"
#include "semoe/gate/detail/common.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate {

struct expert_choice_options {
  double capacity_factor = 1.25;  ///< tokens per expert = capacity_factor * tokens / experts
  bool dropless = false;          ///< must stay false: the capacity is what experts choose
  drop_policy drop = drop_policy::probability;  ///< must stay probability: experts take their best tokens
  balance_mode balance = balance_mode::none;     ///< must stay none: balanced by construction
  double aux_loss_coef = 0;                      ///< must stay 0
  double z_loss_coef = 1e-3;
  double bias_rate = 0;                          ///< unused
};

class expert_choice {
 public:
  using policy_kind = gate_tag;
  using options = expert_choice_options;
  static constexpr const char* name = "semoe::gate::expert_choice";

  explicit expert_choice(options o = {}) : o_(o) { validate(o_); }
  static void validate(const options& o) {
    detail::validate_common(name, o);
    SEMOE_CHECK(!o.dropless, name, ": options.dropless = true: expected false; experts choose capacity_factor * "
                "tokens / experts tokens each");
    SEMOE_CHECK(o.drop == drop_policy::probability, name,
                ": options.drop = position: expected drop_policy::probability; experts choose their best tokens");
    SEMOE_CHECK(o.balance == balance_mode::none && o.aux_loss_coef == 0, name, ": options.balance = ",
                static_cast<int>(o.balance), ", aux_loss_coef = ", o.aux_loss_coef,
                ": expected none and 0; expert choice is balanced by construction");
  }
  const options& opts() const { return o_; }

  /// Every expert is a candidate of every token.
  index_t choices(index_t experts) const { return detail::check_choices(name, experts, experts); }

  template <class T>
  void route(const route_context& ctx, matrix_view<const T> logits, routing_plan<T>& plan) {
    const index_t E = choices(logits.cols());
    const route_context g = detail::begin_route(name, ctx, logits, plan, E);
    detail::router_probs(logits, plan);
    for (index_t a = 0; a < plan.assignments(); ++a) {
      plan.expert[a] = static_cast<std::int32_t>(a % E);
      plan.weight[a] = plan.probs[a];  // assignment a = t * E + e is probs[t, e]
      plan.score[a] = static_cast<float>(plan.probs[a]);
    }
    plan.capacity = expert_capacity(o_.capacity_factor, g.global_tokens, 1, E);
    limit_by_capacity(plan, g, drop_policy::probability);
    // Candidates an expert did not choose are not routed, not dropped.
    for (index_t a = 0; a < plan.assignments(); ++a)
      if (plan.slot[a] < 0) plan.expert[a] = -1;
    plan.dropped = 0;
    detail::router_losses(g, plan, balance_mode::none, 0, o_.z_loss_coef, 1);
  }

  template <class T>
  void backward(const route_context&, matrix_view<const T> logits, const routing_plan<T>& plan,
                std::span<const T> dweight, matrix_view<T> dlogits) const {
    detail::begin_backward(name, logits, plan, dweight, dlogits);
    const index_t E = plan.experts;
    std::vector<T> dp(static_cast<std::size_t>(E));
    for (index_t t = 0; t < plan.tokens; ++t) {
      for (index_t e = 0; e < E; ++e) dp[e] = plan.expert[t * E + e] >= 0 ? dweight[t * E + e] : T(0);
      detail::router_probs_backward(plan, t, dp.data(), dlogits);
    }
  }

 private:
  options o_;
};

}  // namespace semoe::gate
