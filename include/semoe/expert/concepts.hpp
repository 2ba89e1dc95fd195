// semoe/expert/concepts.hpp: the Expert concept. An expert policy describes
// one expert network; the layer calls it once per step for ALL local experts
// (a grouped computation), with parameters it fetched from its storage policy.
#pragma once

#include <concepts>
#include <span>
#include <type_traits>
#include <vector>

#include "semoe/core/backend.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/random.hpp"
#include "semoe/core/tensor.hpp"

namespace semoe::expert {

struct expert_tag {};

/// All local experts of one step. Rows of expert i are rows
/// offsets[i] .. offsets[i+1] of x, y, saved and work.
template <class T>
struct expert_batch {
  std::span<const index_t> offsets;  ///< [local experts + 1]
  std::span<T* const> params;        ///< parameter block of each local expert (null when it has no rows)
  std::span<T* const> grads;         ///< gradient block of each local expert (backward accumulates; null when no rows)
  matrix_view<const T> x;            ///< [rows, hidden] expert inputs
  matrix_view<T> saved;              ///< [rows, saved_cols()] written by forward, read by backward
  matrix_view<T> work;               ///< [rows, work_cols()] scratch for forward and backward

  index_t experts() const { return static_cast<index_t>(offsets.size()) - 1; }
  index_t rows(index_t e) const { return offsets[e + 1] - offsets[e]; }
};

/// An expert policy whose forward and backward run on executor Exec (the
/// cpu backend's by default; a layer checks its own backend's).
template <class E, class Exec = cpu::executor>
concept Expert = std::same_as<typename E::policy_kind, expert_tag> && requires(
    const E& e, Exec& ex, std::span<float> block, const expert_batch<float>& batch,
    matrix_view<float> out, matrix_view<const float> in, philox rng) {
  typename E::options;
  { E::block_elems(std::declval<const typename E::options&>()) } -> std::convertible_to<index_t>;
  { e.block_elems() } -> std::convertible_to<index_t>;
  { e.saved_cols() } -> std::convertible_to<index_t>;
  { e.work_cols() } -> std::convertible_to<index_t>;
  { e.init(block, rng, index_t{}) };
  { e.forward(ex, batch, out) };
  { e.backward(ex, batch, in, out) };
};

/// The layer's sizes written into an expert's options: `hidden` and `ffn`
/// each where the options have a field of that name (an expert with other
/// widths, a low-rank one say, keeps them as its own fields). A field the
/// user already set to another value is an error naming both, never
/// silently replaced; options with neither field are refused, since the
/// expert could not learn the model width.
template <class O>
O with_layer_sizes(O o, index_t hidden, index_t ffn) {
  constexpr bool has_hidden = requires { o.hidden = hidden; }, has_ffn = requires { o.ffn = ffn; };
  static_assert(has_hidden, "semoe::moe_layer: an Expert's options need a `hidden` field (index_t): the layer "
                "writes the model width into it");
  SEMOE_CHECK(o.hidden == 0 || o.hidden == hidden, "semoe::moe_layer: options.expert.hidden = ", o.hidden,
              " but the layer's hidden = ", hidden, ": leave it 0, the layer fills it in");
  o.hidden = hidden;
  if constexpr (has_ffn) {
    SEMOE_CHECK(o.ffn == 0 || o.ffn == ffn, "semoe::moe_layer: options.expert.ffn = ", o.ffn,
                " but the layer's ffn = ", ffn, ": leave it 0, the layer fills it in");
    o.ffn = ffn;
  }
  return o;
}

/// Fix-it messages, one per missing piece of the contract.
template <class E, class Exec = cpu::executor>
constexpr bool check_expert() {
  static_assert(requires { requires std::same_as<typename E::policy_kind, expert_tag>; },
                "semoe::moe_layer: an Expert must opt in with `using policy_kind = semoe::expert::expert_tag;`");
  static_assert(requires { typename E::options; },
                "semoe::moe_layer: an Expert must define a nested `options` struct; see expert/concepts.hpp");
  static_assert(requires(const E& e) { e.saved_cols(); e.work_cols(); e.block_elems(); },
                "semoe::moe_layer: an Expert must provide block_elems(), saved_cols() and work_cols(); see "
                "expert/concepts.hpp");
  static_assert(requires(const E& e, Exec& ex, const expert_batch<float>& b, matrix_view<float> y) {
    e.forward(ex, b, y);
  }, "semoe::moe_layer: an Expert must provide forward(executor, expert_batch, y); see expert/concepts.hpp");
  static_assert(requires(const E& e, Exec& ex, const expert_batch<float>& b, matrix_view<const float> dy,
                         matrix_view<float> dx) { e.backward(ex, b, dy, dx); },
                "semoe::moe_layer: an Expert must provide backward(executor, expert_batch, dy, dx); see "
                "expert/concepts.hpp");
  return true;
}

}  // namespace semoe::expert
