// semoe/gate/hash.hpp: hash layers (Roller et al. 2021): a token goes to the
// expert hash(key) % E, key = its token id when the caller gives token_keys
// (so a word always meets the same expert), else its global position. Fixed,
// parameter-free routing: weight 1 and no gradient to the router.
#pragma once

#include <cstdint>
#include <span>

#include "semoe/core/tensor.hpp"
#include "semoe/gate/balance.hpp"
#include "semoe/gate/concepts.hpp"
#include "semoe/gate/detail/common.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate {

struct hash_options {
  double capacity_factor = 1.25;
  bool dropless = false;
  drop_policy drop = drop_policy::position;
  balance_mode balance = balance_mode::none;  ///< must stay none: nothing to balance by gradient
  double aux_loss_coef = 0;                   ///< must stay 0
  double z_loss_coef = 0;                     ///< must stay 0
  double bias_rate = 0;                       ///< unused
  std::uint64_t seed = 0x5e3d'0e6a'11ce'5eedull;  ///< fixed: the token -> expert map never changes
};

class hash_gate {
 public:
  using policy_kind = gate_tag;
  using options = hash_options;
  static constexpr const char* name = "semoe::gate::hash_gate";

  explicit hash_gate(options o = {}) : o_(o) { validate(o_); }
  static void validate(const options& o) {
    detail::validate_common(name, o);
    SEMOE_CHECK(o.balance == balance_mode::none && o.aux_loss_coef == 0 && o.z_loss_coef == 0, name,
                ": options.balance = ", static_cast<int>(o.balance), ", aux_loss_coef = ", o.aux_loss_coef,
                ", z_loss_coef = ", o.z_loss_coef, ": expected none, 0 and 0; hash routing has no router gradient");
  }
  const options& opts() const { return o_; }

  index_t choices(index_t experts) const { return detail::check_choices(name, 1, experts); }

  /// The expert of a token key: splitmix64 of key ^ seed, modulo E.
  std::int32_t expert_of(std::int64_t key, index_t experts) const {
    std::uint64_t z = static_cast<std::uint64_t>(key) ^ o_.seed;
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return static_cast<std::int32_t>(z % static_cast<std::uint64_t>(experts));
  }

  template <class T>
  void route(const route_context& ctx, matrix_view<const T> logits, routing_plan<T>& plan) {
    const index_t k = choices(logits.cols());
    const route_context g = detail::begin_route(name, ctx, logits, plan, k);
    SEMOE_CHECK(g.token_keys.empty() || static_cast<index_t>(g.token_keys.size()) == plan.tokens, name,
                ": route_context.token_keys has ", g.token_keys.size(), " keys; expected 0 or tokens = ",
                plan.tokens);
    for (index_t t = 0; t < plan.tokens; ++t) {
      const std::int64_t key = g.token_keys.empty() ? g.token_offset + t : g.token_keys[static_cast<std::size_t>(t)];
      plan.expert[t] = expert_of(key, plan.experts);
      plan.weight[t] = T(1);
      plan.score[t] = 1.0f;
    }
    plan.probs.resize_discard(0);
    plan.aux_saved.resize_discard(0);
    detail::apply_capacity(g, plan, o_);
  }

  template <class T>
  void backward(const route_context&, matrix_view<const T> logits, const routing_plan<T>& plan,
                std::span<const T> dweight, matrix_view<T> dlogits) const {
    detail::begin_backward(name, logits, plan, dweight, dlogits);  // leaves dlogits = 0
  }

 private:
  options o_;
};

}  // namespace semoe::gate
