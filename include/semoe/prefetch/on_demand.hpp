// semoe/prefetch/on_demand.hpp: load a block when the layer needs it, and
// nothing ahead of time. The baseline, and with a resident store, free.
#pragma once

#include <span>

#include "semoe/prefetch/concepts.hpp"

namespace semoe::prefetch {

struct on_demand {
  using policy_kind = prefetch_tag;

  /// counts: routed rows per local expert this step; a block with no rows
  /// need not be made resident.
  template <class Store>
  void before(Store&, index_t, phase, std::span<const std::int32_t>) {}
  template <class Store>
  void after(Store&, index_t, phase) {}
  template <class Store>
  void end_step(Store&) {}
};

static_assert(Prefetcher<on_demand>);

}  // namespace semoe::prefetch
