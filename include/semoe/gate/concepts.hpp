// semoe/gate/concepts.hpp: the Gate concept. A gate maps router logits [T, E]
// to a routing_plan and returns the exact gradient of the combine weights and
// aux losses w.r.t. the logits. The layer owns the router weight Wg.
#pragma once

#include <concepts>
#include <span>

#include "semoe/core/config.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate {

/// Opt-in tag: a type is a gate because it says so
/// (`using policy_kind = semoe::gate::gate_tag;`), not by accident.
struct gate_tag {};

namespace detail {

template <class G>
concept gate_opted_in = requires { typename G::policy_kind; } && std::same_as<typename G::policy_kind, gate_tag>;

template <class G>
concept gate_has_options = requires { typename G::options; } && std::constructible_from<G, typename G::options>;

template <class G>
concept gate_has_choices = requires(const G& g, index_t experts) {
  { g.choices(experts) } -> std::convertible_to<index_t>;
};

template <class G>
concept gate_has_route =
    requires(G& g, const route_context& ctx, matrix_view<const float> logits, routing_plan<float>& plan) {
      { g.route(ctx, logits, plan) } -> std::same_as<void>;
    };

template <class G>
concept gate_has_backward = requires(const G& g, const route_context& ctx, matrix_view<const float> logits,
                                     const routing_plan<float>& plan, std::span<const float> dweight,
                                     matrix_view<float> dlogits) {
  { g.backward(ctx, logits, plan, dweight, dlogits) } -> std::same_as<void>;
};

}  // namespace detail

/// A gate policy:
///   using policy_kind = gate_tag;   struct options; explicit G(options)
///   static void validate(const options&)             throws semoe::error naming the field
///   index_t choices(index_t experts) const           k, choices per token
///   route(ctx, logits [T, E], plan)                   fills the plan, capacity and aux losses
///   backward(ctx, logits, plan, dweight [T*k], dlogits [T, E]) const
///       dlogits = d(sum_a dweight[a] * weight[a] + balance_loss + z_loss) / dlogits
/// route and backward are member templates over the scalar (float, double).
/// Optional: input_jitter() (the layer jitters the router input), end_step(ctx).
template <class G>
concept Gate = detail::gate_opted_in<G> && detail::gate_has_options<G> && detail::gate_has_choices<G> &&
               detail::gate_has_route<G> && detail::gate_has_backward<G>;

/// Gates that route on an executor, over logits and a plan in its memory
/// (top_k, switch_gate): the layer routes on its own executor, a GPU
/// included, instead of bringing the logits to the host.
///   route(ex, ctx, logits, routing_plan<T, Exec::memory_space>&)
///   backward(ex, ctx, logits, plan, dweight, dlogits) const
template <class G, class Exec, class T>
concept executor_routed_gate =
    requires(G& g, const G& cg, Exec& ex, const route_context& ctx, matrix_view<const T> logits,
             routing_plan<T, typename Exec::memory_space>& plan, std::span<const T> dweight, matrix_view<T> dlogits) {
      g.route(ex, ctx, logits, plan);
      cg.backward(ex, ctx, logits, plan, dweight, dlogits);
    };

/// Gates whose router input the layer multiplies by U(1 - eps, 1 + eps) noise.
template <class G>
concept jittered_gate = requires(const G& g) {
  { g.input_jitter() } -> std::convertible_to<float>;
};

/// Gates with per-step state (the aux-free bias) to update after each step.
template <class G>
concept stepped_gate = requires(G& g, const route_context& ctx) { g.end_step(ctx); };

/// Fix-it diagnostics: one sentence per missing piece of Gate. Returns true so
/// it can sit in a static_assert; the sentences come from the asserts inside.
template <class G>
constexpr bool check_gate() {
  static_assert(detail::gate_opted_in<G>,
                "semoe::moe_layer: Gate must declare `using policy_kind = semoe::gate::gate_tag;` to opt in; "
                "see gate/concepts.hpp");
  static_assert(detail::gate_has_options<G>,
                "semoe::moe_layer: Gate must provide a nested `options` type and a constructor from it; "
                "see gate/concepts.hpp");
  static_assert(detail::gate_has_choices<G>,
                "semoe::moe_layer: Gate must provide choices(experts) const returning index_t; see gate/concepts.hpp");
  static_assert(detail::gate_has_route<G>,
                "semoe::moe_layer: Gate must provide route(ctx, logits, plan) returning void; see gate/concepts.hpp");
  static_assert(detail::gate_has_backward<G>,
                "semoe::moe_layer: Gate must provide backward(ctx, logits, plan, dweight, dlogits) const returning "
                "void; see gate/concepts.hpp");
  return true;
}

}  // namespace semoe::gate
