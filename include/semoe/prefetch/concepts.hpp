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

}  // namespace semoe::prefetch
