// semoe/storage/host_tier.hpp: host DRAM, SE-MoE's cache over the SSD shard.
// Blocks are 4 KiB aligned so the SSD tier reads and writes them with
// O_DIRECT straight from here. Under a device tier in device memory the
// arena is pinned (page-locked) host memory, so moves to the device are
// asynchronous DMA rather than staged by the driver.
#pragma once

#include "semoe/core/memory_space.hpp"
#include "semoe/storage/detail/arena.hpp"
#include "semoe/storage/concepts.hpp"

namespace semoe::storage {

struct host_tier {
  using tier_kind = tier_tag;
  static constexpr std::string_view name = "host";
  /// On CPU builds the host runs the optimizer of offloaded blocks here.
  static constexpr bool compute_reads = false;

  struct options {
    std::size_t budget_bytes = 0;  ///< 0: unbounded
  };

  /// The tier's memory in HostSpace: plain host memory, or pinned memory
  /// when the blocks move to and from a device (host_staging_t of its space).
  template <MemorySpace HostSpace = host_space>
  class basic_arena : public detail::budget_arena {
   public:
    explicit basic_arena(options o)
        : budget_arena("semoe::storage::host_tier", o.budget_bytes, 4096, &allocate_aligned<HostSpace>,
                       &deallocate_aligned<HostSpace>) {}
  };
  using arena = basic_arena<host_space>;
};

}  // namespace semoe::storage
