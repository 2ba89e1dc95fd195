// semoe/storage/device_tier.hpp: fast memory for expert blocks under compute.
// On CPU builds it is a bounded arena standing for HBM: allocations are real,
// the byte budget is never exceeded, and moves into it are real copies that
// the trace shows on the copy-engine lane (a CUDA stream on GPU builds).
#pragma once

#include "semoe/storage/detail/arena.hpp"
#include "semoe/storage/concepts.hpp"

namespace semoe::storage {

struct device_tier {
  using tier_kind = tier_tag;
  static constexpr std::string_view name = "device";
  /// What compute reads: blocks must be here while a layer runs on them.
  static constexpr bool compute_reads = true;

  struct options {
    std::size_t budget_bytes = 0;  ///< 0: unbounded
  };

  class arena : public detail::budget_arena {
   public:
    explicit arena(options o) : budget_arena("semoe::storage::device_tier", o.budget_bytes, 256) {}
  };
};

}  // namespace semoe::storage
