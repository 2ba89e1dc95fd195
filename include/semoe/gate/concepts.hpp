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

// One sub-concept per requirement of Gate; gate_contract below gives each its
// fix-it sentence. A requirement about a member that is missing altogether
// holds vacuously, so one broken piece gives one sentence.

template <class G>
concept gate_opted_in = requires { typename G::policy_kind; } && std::same_as<typename G::policy_kind, gate_tag>;

template <class G>
concept gate_has_options = requires { typename G::options; } && std::default_initializable<typename G::options>;

template <class G>
concept gate_constructible_from_options =
    !gate_has_options<G> || std::constructible_from<G, const typename G::options&>;

template <class G>
concept gate_has_choices = requires(const G& g, index_t experts) {
  { g.choices(experts) } -> std::convertible_to<index_t>;
};

template <class G, class T>
concept gate_has_route =
    requires(G& g, const route_context& ctx, matrix_view<const T> logits, routing_plan<T>& plan) {
      { g.route(ctx, logits, plan) } -> std::same_as<void>;
    };

template <class G, class T>
concept gate_has_backward = requires(G& g, const route_context& ctx, matrix_view<const T> logits,
                                     const routing_plan<T>& plan, std::span<const T> dweight,
                                     matrix_view<T> dlogits) { g.backward(ctx, logits, plan, dweight, dlogits); };

template <class G, class T>
concept gate_backward_is_const_void =
    !gate_has_backward<G, T> ||
    requires(const G& g, const route_context& ctx, matrix_view<const T> logits, const routing_plan<T>& plan,
             std::span<const T> dweight, matrix_view<T> dlogits) {
      { g.backward(ctx, logits, plan, dweight, dlogits) } -> std::same_as<void>;
    };

/// The Gate contract, one requirement per entry: its sub-concept and its
/// fix-it. Diagnose = false answers the concept; Diagnose = true stops
/// compilation with the sentence of every broken requirement.
template <class G, class T, bool Diagnose>
constexpr bool gate_contract() {
  bool ok = true;
  if constexpr (!gate_opted_in<G>) {
    static_assert(!Diagnose, "semoe::moe_layer: Gate must declare `using policy_kind = semoe::gate::gate_tag;` to "
                  "opt in; see gate/concepts.hpp");
    ok = false;
  }
  if constexpr (!gate_has_options<G>) {
    static_assert(!Diagnose, "semoe::moe_layer: Gate must provide a nested, default-constructible `options` type; "
                  "see gate/concepts.hpp");
    ok = false;
  }
  if constexpr (!gate_constructible_from_options<G>) {
    static_assert(!Diagnose, "semoe::moe_layer: Gate must be constructible from its options: add `explicit "
                  "G(options)`; see gate/concepts.hpp");
    ok = false;
  }
  if constexpr (!gate_has_choices<G>) {
    static_assert(!Diagnose, "semoe::moe_layer: Gate must provide choices(experts) const returning index_t; see "
                  "gate/concepts.hpp");
    ok = false;
  }
  if constexpr (!gate_has_route<G, T>) {
    static_assert(!Diagnose, "semoe::moe_layer: Gate must provide route(ctx, logits, plan) returning void for the "
                  "layer's scalar; see gate/concepts.hpp");
    ok = false;
  }
  if constexpr (!gate_has_backward<G, T>) {
    static_assert(!Diagnose, "semoe::moe_layer: Gate must provide backward(ctx, logits, plan, dweight, dlogits) "
                  "const returning void for the layer's scalar; see gate/concepts.hpp");
    ok = false;
  }
  if constexpr (!gate_backward_is_const_void<G, T>) {
    static_assert(!Diagnose, "semoe::moe_layer: Gate's backward(...) must be const and return void: make it "
                  "`void backward(...) const`; see gate/concepts.hpp");
    ok = false;
  }
  return ok || Diagnose;
}

}  // namespace detail

/// A gate policy over scalar T (float by default; the layer checks its own):
///   using policy_kind = gate_tag;
///   struct options;  default-constructible     explicit G(options)
///   static void validate(const options&)       throws semoe::error naming the field
///   index_t choices(index_t experts) const     k, choices per token; the layer calls it at
///                                              construction, so k > experts fails there
///   route(ctx, logits [T, E], plan)            fills the plan, capacity and aux losses; the
///                                              layer checks the plan (check_plan) before use
///   backward(ctx, logits, plan, dweight [T*k], dlogits [T, E]) const
///       overwrites dlogits = d(sum_a dweight[a] * weight[a] + balance_loss + z_loss) / dlogits
/// route and backward are member templates over the scalar (float, double).
/// Optional: input_jitter() (the layer jitters the router input), end_step(ctx).
/// `static_assert(check_gate<G>())` names every requirement a type breaks.
template <class G, class T = float>
concept Gate = detail::gate_contract<G, T, false>();

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

/// Fix-it diagnostics: one sentence per broken requirement of Gate. Returns
/// true so it can sit in a static_assert; the sentences come from inside.
template <class G, class T = float>
constexpr bool check_gate() {
  return detail::gate_contract<G, T, true>();
}

}  // namespace semoe::gate
