// semoe/core/memory_space.hpp: where a buffer's bytes live, in the manner of
// Kokkos memory spaces. A space allocates, frees, copies and zeroes raw bytes
// and says which processors may dereference it; `accessible_from` tells
// generic code (and the prefetcher) whether an executor can read a space
// directly or a move is due first.
#pragma once

#include <concepts>
#include <cstdlib>
#include <cstring>
#include <new>

#include "semoe/core/config.hpp"

namespace semoe {

/// What a memory space provides. `copy` moves bytes between this space and
/// any space the host can name (host, pinned, device: CUDA's unified virtual
/// addressing tells them apart); it returns when the bytes have landed.
template <class S>
concept MemorySpace = requires(std::size_t n, void* p, const void* q) {
  { S::name } -> std::convertible_to<const char*>;
  { S::host_accessible } -> std::convertible_to<bool>;
  { S::device_accessible } -> std::convertible_to<bool>;
  { S::allocate(n) } -> std::same_as<void*>;
  S::deallocate(p, n);
  S::copy(p, q, n);
  S::zero(p, n);
};

/// Host memory: the memory space of the cpu backend. 64-byte aligned.
struct host_space {
  static constexpr const char* name = "host";
  static constexpr bool host_accessible = true;
  static constexpr bool device_accessible = false;

  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const std::size_t rounded = (bytes + cache_line - 1) / cache_line * cache_line;
    void* p = std::aligned_alloc(cache_line, rounded);
    if (!p) throw std::bad_alloc();
    return p;
  }
  static void deallocate(void* p, std::size_t) { std::free(p); }
  static void copy(void* dst, const void* src, std::size_t bytes) {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  static void zero(void* p, std::size_t bytes) {
    if (bytes) std::memset(p, 0, bytes);
  }
};

static_assert(MemorySpace<host_space>);

/// A memory space's per-thread context: the CUDA device a thread allocates
/// on and copies to. Threads a store starts (movers, the ring's loader) take
/// the context of the thread that made the store, so a process on device 1
/// keeps its blocks there. Spaces without one (host memory) have context 0.
template <class Space>
struct space_context {
  static int current() {
    if constexpr (requires { Space::current_context(); })
      return Space::current_context();
    else
      return 0;
  }
  static void adopt(int context) {
    if constexpr (requires { Space::adopt_context(context); }) Space::adopt_context(context);
  }
};

/// The host memory that copies to and from Space come from: a space names it
/// as `host_staging_space` (device memory: pinned host memory, so copies run
/// asynchronously on a stream); plain host memory otherwise.
template <class Space>
struct host_staging {
  using type = host_space;
};
template <class Space>
  requires requires { typename Space::host_staging_space; }
struct host_staging<Space> {
  using type = typename Space::host_staging_space;
};
template <class Space>
using host_staging_t = typename host_staging<Space>::type;

/// `bytes` of host memory of HostSpace aligned to `alignment` (a power of two
/// >= 64): a space with allocate_aligned provides it (pinned memory registers
/// aligned pages); otherwise aligned host memory. nullptr when out of memory.
template <class HostSpace>
void* allocate_aligned(std::size_t bytes, std::size_t alignment) {
  if constexpr (requires { HostSpace::allocate_aligned(bytes, alignment); })
    return HostSpace::allocate_aligned(bytes, alignment);
  else
    return std::aligned_alloc(alignment, (bytes + alignment - 1) / alignment * alignment);
}
template <class HostSpace>
void deallocate_aligned(void* p, std::size_t bytes) {
  if constexpr (requires { HostSpace::deallocate_aligned(p, bytes); })
    HostSpace::deallocate_aligned(p, bytes);
  else
    std::free(p);
}

/// True when code run by executor Exec may dereference memory of Space
/// without a copy first.
template <class Space, class Exec>
inline constexpr bool accessible_from = Exec::on_device ? Space::device_accessible : Space::host_accessible;

/// Copy `bytes` from src (in SrcSpace) to dst (in DstSpace). A space that the
/// host cannot read does the copy, since only it knows how; otherwise it is a
/// host memcpy.
template <MemorySpace DstSpace, MemorySpace SrcSpace>
void copy_bytes(void* dst, const void* src, std::size_t bytes) {
  if constexpr (!DstSpace::host_accessible)
    DstSpace::copy(dst, src, bytes);
  else if constexpr (!SrcSpace::host_accessible)
    SrcSpace::copy(dst, src, bytes);
  else
    host_space::copy(dst, src, bytes);
}

}  // namespace semoe
