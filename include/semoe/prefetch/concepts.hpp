// semoe/prefetch/concepts.hpp: the Prefetcher contract. The layer calls these
// hooks at fixed points: before and after its forward and its
// backward, and the trainer calls end_step. A prefetcher that moves blocks
// ahead of need (vertical, 2D) implements the same hooks as on_demand.
#pragma once

#include <concepts>
#include <cstdint>
#include <span>

#include "semoe/core/config.hpp"
#include "semoe/storage/resident.hpp"

namespace semoe::prefetch {

struct prefetch_tag {};

/// The point in a step a hook is called at.
enum class phase { forward, backward };

namespace detail {

// One sub-concept per requirement of Prefetcher; prefetcher_contract below
// gives each its fix-it sentence. The hooks are probed with the resident store.

template <class P>
concept prefetcher_opted_in = requires { requires std::same_as<typename P::policy_kind, prefetch_tag>; };

template <class P>
concept prefetcher_default_constructible = std::default_initializable<P>;

template <class P>
concept prefetcher_has_before = requires(P& p, storage::resident::store<float>& s, index_t layer,
                                         std::span<const std::int32_t> counts) {
  p.before(s, layer, phase::forward, counts);
};

template <class P>
concept prefetcher_has_after =
    requires(P& p, storage::resident::store<float>& s, index_t layer) { p.after(s, layer, phase::forward); };

template <class P>
concept prefetcher_has_end_step = requires(P& p, storage::resident::store<float>& s) { p.end_step(s); };

/// The Prefetcher contract, one requirement per entry: its sub-concept and its
/// fix-it. Diagnose = false answers the concept; Diagnose = true stops
/// compilation with the sentence of every broken requirement.
template <class P, bool Diagnose>
constexpr bool prefetcher_contract() {
  bool ok = true;
  if constexpr (!prefetcher_opted_in<P>) {
    static_assert(!Diagnose, "semoe::moe_layer: Prefetch must opt in with `using policy_kind = "
                  "semoe::prefetch::prefetch_tag;`; see prefetch/concepts.hpp");
    ok = false;
  }
  if constexpr (!prefetcher_default_constructible<P>) {
    static_assert(!Diagnose, "semoe::moe_layer: Prefetch must be default-constructible (the layer makes its "
                  "own); see prefetch/concepts.hpp");
    ok = false;
  }
  if constexpr (!prefetcher_has_before<P>) {
    static_assert(!Diagnose, "semoe::moe_layer: Prefetch must provide before(store, layer, phase, counts), a "
                  "template over the store; see prefetch/concepts.hpp");
    ok = false;
  }
  if constexpr (!prefetcher_has_after<P>) {
    static_assert(!Diagnose, "semoe::moe_layer: Prefetch must provide after(store, layer, phase), a template "
                  "over the store; see prefetch/concepts.hpp");
    ok = false;
  }
  if constexpr (!prefetcher_has_end_step<P>) {
    static_assert(!Diagnose, "semoe::moe_layer: Prefetch must provide end_step(store), a template over the "
                  "store; see prefetch/concepts.hpp");
    ok = false;
  }
  return ok || Diagnose;
}

}  // namespace detail

/// A prefetch policy: `using policy_kind = prefetch_tag;`, default-constructible,
/// and three hooks, each a template over the store:
///   before(store, layer, phase, counts)  before the layer acquires blocks in
///                                        that phase; counts: rows per local
///                                        expert (then replica slots) this step
///   after(store, layer, phase)           once the phase released its blocks
///   end_step(store)                      once per optimizer step
/// `static_assert(check_prefetcher<P>())` names every requirement a type breaks.
template <class P>
concept Prefetcher = detail::prefetcher_contract<P, false>();

/// Fix-it diagnostics: one sentence per broken requirement of Prefetcher.
template <class P>
constexpr bool check_prefetcher() {
  return detail::prefetcher_contract<P, true>();
}

/// Storage and prefetch policies that only work with a particular partner
/// say so at compile time: a storage policy may define
///   template <class Prefetch> static constexpr bool pairs_with_prefetch()
/// and a prefetch policy
///   template <class Storage> static constexpr bool pairs_with_storage()
/// each holding a static_assert whose message names the fix. moe_layer
/// instantiates both, so a pairing that cannot work (infer::ring without
/// infer::ring_release waits forever at layer K) does not compile.
template <class Storage, class Prefetch>
constexpr bool check_pairing() {
  if constexpr (requires { Storage::template pairs_with_prefetch<Prefetch>(); })
    static_cast<void>(Storage::template pairs_with_prefetch<Prefetch>());
  if constexpr (requires { Prefetch::template pairs_with_storage<Storage>(); })
    static_cast<void>(Prefetch::template pairs_with_storage<Storage>());
  return true;
}

}  // namespace semoe::prefetch
