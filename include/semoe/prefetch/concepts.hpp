// semoe/prefetch/concepts.hpp: the Prefetcher contract. The layer calls these
// hooks at fixed points: before and after its forward and its
// backward, and the trainer calls end_step. A prefetcher that moves blocks
// ahead of need (vertical, 2D) implements the same hooks as on_demand.
#pragma once

#include <concepts>

#include "semoe/core/config.hpp"
#include "semoe/storage/resident.hpp"

namespace semoe::prefetch {

struct prefetch_tag {};

/// The point in a step a hook is called at.
enum class phase { forward, backward };

template <class P>
concept Prefetcher = std::same_as<typename P::policy_kind, prefetch_tag> &&
    requires(P& p, storage::resident::store<float>& s, index_t layer, std::span<const std::int32_t> counts) {
      { p.before(s, layer, phase::forward, counts) };
      { p.after(s, layer, phase::forward) };
      { p.end_step(s) };
    };

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
