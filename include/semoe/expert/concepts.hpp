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
  matrix_view<T> work;               ///< [rows, work_cols()] forward's and backward's; kept between them
  bool backward_follows = true;      ///< false in eval mode: forward need keep nothing for backward

  index_t experts() const { return static_cast<index_t>(offsets.size()) - 1; }
  index_t rows(index_t e) const { return offsets[e + 1] - offsets[e]; }
};

namespace detail {

// One sub-concept per requirement of Expert; expert_contract below gives each
// its fix-it sentence. A requirement about a member that is missing
// altogether holds vacuously, so one broken piece gives one sentence.

template <class E>
concept expert_opted_in = requires { requires std::same_as<typename E::policy_kind, expert_tag>; };

template <class E>
concept expert_has_options = requires { typename E::options; } && std::default_initializable<typename E::options>;

template <class E>
concept expert_options_have_hidden =
    !expert_has_options<E> || requires(typename E::options o, index_t h) { o.hidden = h; };

template <class E>
concept expert_constructible_from_options =
    !expert_has_options<E> || std::constructible_from<E, const typename E::options&>;

template <class E>
concept expert_sizes_options = !expert_has_options<E> || requires(const typename E::options& o) {
  { E::block_elems(o) } -> std::convertible_to<index_t>;
};

template <class E>
concept expert_has_block_elems = requires(const E& e) {
  { e.block_elems() } -> std::convertible_to<index_t>;
};

template <class E>
concept expert_has_saved_cols = requires(const E& e) {
  { e.saved_cols() } -> std::convertible_to<index_t>;
};

template <class E>
concept expert_has_work_cols = requires(const E& e) {
  { e.work_cols() } -> std::convertible_to<index_t>;
};

template <class E, class T>
concept expert_has_init = requires(E& e, std::span<T> block, philox rng, index_t id) { e.init(block, rng, id); };

template <class E, class T>
concept expert_init_is_const =
    !expert_has_init<E, T> || requires(const E& e, std::span<T> block, philox rng, index_t id) {
      e.init(block, rng, id);
    };

template <class E, class Exec, class T>
concept expert_has_forward =
    requires(E& e, Exec& ex, const expert_batch<T>& b, matrix_view<T> y) { e.forward(ex, b, y); };

template <class E, class Exec, class T>
concept expert_forward_is_const = !expert_has_forward<E, Exec, T> ||
    requires(const E& e, Exec& ex, const expert_batch<T>& b, matrix_view<T> y) { e.forward(ex, b, y); };

template <class E, class Exec, class T>
concept expert_has_backward = requires(E& e, Exec& ex, const expert_batch<T>& b, matrix_view<const T> dy,
                                       matrix_view<T> dx) { e.backward(ex, b, dy, dx); };

template <class E, class Exec, class T>
concept expert_backward_is_const =
    !expert_has_backward<E, Exec, T> || requires(const E& e, Exec& ex, const expert_batch<T>& b,
                                                  matrix_view<const T> dy, matrix_view<T> dx) {
      e.backward(ex, b, dy, dx);
    };

/// The Expert contract, one requirement per entry: its sub-concept and its
/// fix-it. Diagnose = false answers the concept; Diagnose = true stops
/// compilation with the sentence of every broken requirement.
template <class E, class Exec, class T, bool Diagnose>
constexpr bool expert_contract() {
  bool ok = true;
  if constexpr (!expert_opted_in<E>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert must opt in with `using policy_kind = "
                  "semoe::expert::expert_tag;`; see expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_has_options<E>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert must define a nested, default-constructible `options` "
                  "struct; see expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_options_have_hidden<E>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert's options need a `hidden` field (index_t): the layer "
                  "writes the model width into it; see expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_constructible_from_options<E>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert must be constructible from its options: add "
                  "`explicit E(options)`; see expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_sizes_options<E>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert must provide `static index_t block_elems(const "
                  "options&)`, its parameter block size for those options; see expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_has_block_elems<E>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert must provide `index_t block_elems() const`; see "
                  "expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_has_saved_cols<E>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert must provide `index_t saved_cols() const`, the "
                  "columns per row that forward keeps for backward; see expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_has_work_cols<E>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert must provide `index_t work_cols() const`, the "
                  "scratch columns per row; see expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_has_init<E, T>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert must provide init(std::span<T> block, philox rng, "
                  "index_t expert) const, which fills one expert's parameter block; see expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_init_is_const<E, T>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert's init(...) must be const: make init const; see "
                  "expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_has_forward<E, Exec, T>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert must provide forward(executor, expert_batch, y) const "
                  "for the layer's executor and scalar; see expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_forward_is_const<E, Exec, T>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert's forward(...) must be const: make forward const; see "
                  "expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_has_backward<E, Exec, T>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert must provide backward(executor, expert_batch, dy, dx) "
                  "const for the layer's executor and scalar; see expert/concepts.hpp");
    ok = false;
  }
  if constexpr (!expert_backward_is_const<E, Exec, T>) {
    static_assert(!Diagnose, "semoe::moe_layer: an Expert's backward(...) must be const: make backward const; "
                  "see expert/concepts.hpp");
    ok = false;
  }
  return ok || Diagnose;
}

}  // namespace detail

/// An expert policy over scalar T whose forward and backward run on executor
/// Exec (the cpu backend's by default; a layer checks its own backend's and
/// its own scalar). What the layer relies on:
///   using policy_kind = expert_tag;
///   struct options { index_t hidden; ... }  default-constructible; the layer
///       writes the model width into `hidden` (and `ffn` where there is one;
///       see with_layer_sizes) and constructs the expert with E(options)
///   static index_t block_elems(const options&), index_t block_elems() const
///       one expert's parameter block (and gradient block) size
///   index_t saved_cols() const, work_cols() const   columns per routed row
///       of batch.saved and batch.work
///   init(std::span<T> block, philox rng, index_t expert) const
///       fills one block in host memory; called once per local expert at
///       construction with its global id: the same values on every rank
///   forward(ex, const expert_batch<T>& b, matrix_view<T> y) const
///       overwrites y's rows of every expert of b and keeps in b.saved (and
///       b.work: the layer leaves both alone until backward) what backward
///       needs; with b.backward_follows false (eval mode) it need keep nothing
///   backward(ex, const expert_batch<T>& b, in_view<T> dy, matrix_view<T> dx) const
///       accumulates (+=) into b.grads, overwrites dx's rows; may destroy
///       b.saved and b.work
/// Rows of expert i are rows b.offsets[i] .. b.offsets[i+1] of every view,
/// and offsets[0] need not be 0 (one expert of a larger batch keeps its rows'
/// places); index with the offsets. Views are in Exec's memory.
/// dy and dx are distinct memory unless the expert declares
/// `static constexpr bool backward_in_place = true;` (see backward_in_place_v).
/// Everything is const: a policy holds its configuration, never per-step
/// state, which lives in the blocks and in saved/work.
/// `static_assert(check_expert<E>())` names every requirement a type breaks.
template <class E, class Exec = cpu::executor, class T = float>
concept Expert = detail::expert_contract<E, Exec, T, false>();

/// Fix-it diagnostics: one sentence per broken requirement of Expert. Returns
/// true so it can sit in a static_assert; the sentences come from inside.
template <class E, class Exec = cpu::executor, class T = float>
constexpr bool check_expert() {
  return detail::expert_contract<E, Exec, T, true>();
}

/// Whether the layer may hand an expert's backward dx in the same memory as
/// dy. An expert opts in with `static constexpr bool backward_in_place =
/// true;` only if it never reads an element of dy after writing the element
/// of dx at the same place; every other expert gets dy in a buffer of its own
/// (one copy of the rows per backward).
template <class E>
inline constexpr bool backward_in_place_v = [] {
  if constexpr (requires { E::backward_in_place; })
    return static_cast<bool>(E::backward_in_place);
  else
    return false;
}();

/// The layer's sizes written into an expert's options: `hidden` and `ffn`
/// each where the options have a field of that name (an expert with other
/// widths, a low-rank one say, keeps them as its own fields). A field the
/// user already set to another value is an error naming both, never
/// silently replaced. Options without `hidden` break the Expert contract
/// (the layer's check_expert says so); they are left as they are here.
template <class O>
O with_layer_sizes(O o, index_t hidden, index_t ffn) {
  if constexpr (requires { o.hidden = hidden; }) {
    SEMOE_CHECK(o.hidden == 0 || o.hidden == hidden, "semoe::moe_layer: options.expert.hidden = ", o.hidden,
                " but the layer's hidden = ", hidden, ": leave it 0, the layer fills it in");
    o.hidden = hidden;
  }
  if constexpr (requires { o.ffn = ffn; }) {
    SEMOE_CHECK(o.ffn == 0 || o.ffn == ffn, "semoe::moe_layer: options.expert.ffn = ", o.ffn,
                " but the layer's ffn = ", ffn, ": leave it 0, the layer fills it in");
    o.ffn = ffn;
  }
  return o;
}

}  // namespace semoe::expert
