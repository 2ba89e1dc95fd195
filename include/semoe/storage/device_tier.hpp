// semoe/storage/device_tier.hpp: fast memory for expert blocks under compute.
// A bounded arena in the layer's memory space: device memory on the cuda
// backend, host memory standing for HBM on the cpu backend. Allocations are
// real, the byte budget is never exceeded, and moves into it are real copies
// that the trace shows on the copy-engine lane.
#pragma once

#include <type_traits>

#include "semoe/core/memory_space.hpp"
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

  /// The tier's memory in Space (host memory: the default).
  template <MemorySpace Space = host_space>
  class basic_arena : public detail::budget_arena {
   public:
    explicit basic_arena(options o)
        : budget_arena("semoe::storage::device_tier", o.budget_bytes, 256, &space_allocate, &space_deallocate) {}

   private:
    static void* space_allocate(std::size_t bytes, std::size_t alignment) {
      if constexpr (std::is_same_v<Space, host_space>)
        return budget_arena::host_allocate(bytes, alignment);
      else
        return Space::allocate(bytes);  // device allocators align to at least 256 bytes
    }
    static void space_deallocate(void* p, std::size_t bytes) {
      if constexpr (std::is_same_v<Space, host_space>)
        budget_arena::host_deallocate(p, bytes);
      else
        Space::deallocate(p, bytes);
    }
  };
  using arena = basic_arena<host_space>;
};

}  // namespace semoe::storage
