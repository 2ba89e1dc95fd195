// semoe/storage/host_tier.hpp: host DRAM, SE-MoE's cache over the SSD shard.
// Blocks are 4 KiB aligned so the SSD tier reads and writes them with
// O_DIRECT straight from here (pinned memory on CUDA builds).
#pragma once

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

  class arena : public detail::budget_arena {
   public:
    explicit arena(options o) : budget_arena("semoe::storage::host_tier", o.budget_bytes, 4096) {}
  };
};

}  // namespace semoe::storage
