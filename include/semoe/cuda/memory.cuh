// semoe/cuda/memory.cuh: the memory spaces of the cuda backend.
//  * device_space: device memory, stream-ordered (cudaMallocFromPoolAsync on
//    the device's default pool, which keeps freed memory for reuse rather than
//    returning it to the driver), ordered on the compute stream of the
//    thread's current cuda_executor;
//  * pinned_space: page-locked host memory, readable by host and device, the
//    staging area of copies that must run asynchronously (host_tier's blocks).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "semoe/core/memory_space.hpp"
#include "semoe/cuda/error.cuh"

namespace semoe {

namespace detail {

/// The stream device allocations and frees are ordered on: the compute
/// stream of the innermost cuda_executor alive on this thread, or the
/// per-thread default stream when there is none (allocations made there are
/// synchronized before use, since no executor's stream is ordered after them).
inline cudaStream_t& allocation_stream_slot() {
  thread_local cudaStream_t s = nullptr;
  return s;
}
inline cudaStream_t allocation_stream() {
  const cudaStream_t s = allocation_stream_slot();
  return s ? s : cudaStreamPerThread;
}

/// The current device's default memory pool, told once to keep what is freed
/// (a release threshold of "everything"): steady-state steps then allocate
/// from the pool without calls into the driver.
inline cudaMemPool_t device_pool() {
  int device = 0;
  SEMOE_CUDA_TRY(cudaGetDevice(&device));
  cudaMemPool_t pool = nullptr;
  SEMOE_CUDA_TRY(cudaDeviceGetDefaultMemPool(&pool, device));
  static std::once_flag configured[64];
  if (device >= 0 && device < 64)
    std::call_once(configured[device], [pool] {
      std::uint64_t keep = UINT64_MAX;
      SEMOE_CUDA_TRY(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    });
  return pool;
}

}  // namespace detail

/// Page-locked host memory: the host reads it directly, and copies between it
/// and the device run asynchronously on a stream.
struct pinned_space {
  static constexpr const char* name = "pinned";
  static constexpr bool host_accessible = true;
  static constexpr bool device_accessible = true;

  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    SEMOE_CUDA_TRY(cudaMallocHost(&p, bytes));
    return p;
  }
  static void deallocate(void* p, std::size_t) noexcept {
    if (p) detail::cuda_warn(cudaFreeHost(p), "cudaFreeHost");
  }
  static void copy(void* dst, const void* src, std::size_t bytes) {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  static void zero(void* p, std::size_t bytes) {
    if (bytes) std::memset(p, 0, bytes);
  }
  /// Aligned pages (the SSD tier's O_DIRECT needs 4 KiB), then page-locked
  /// with cudaHostRegister. nullptr when the host is out of memory.
  static void* allocate_aligned(std::size_t bytes, std::size_t alignment) {
    const std::size_t rounded = (bytes + alignment - 1) / alignment * alignment;
    void* p = std::aligned_alloc(alignment, rounded);
    if (!p) return nullptr;
    const cudaError_t e = cudaHostRegister(p, rounded, cudaHostRegisterDefault);
    if (e != cudaSuccess) {
      std::free(p);
      SEMOE_CUDA_TRY(e);
    }
    return p;
  }
  static void deallocate_aligned(void* p, std::size_t) noexcept {
    if (!p) return;
    detail::cuda_warn(cudaHostUnregister(p), "cudaHostUnregister");
    std::free(p);
  }
};



/// Device memory (HBM), in stream order on the executor's compute stream.
struct device_space {
  static constexpr const char* name = "device";
  using host_staging_space = pinned_space;  // host tiers and bounce buffers
  static constexpr bool host_accessible = false;
  static constexpr bool device_accessible = true;

  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    const cudaStream_t s = detail::allocation_stream();
    SEMOE_CUDA_TRY(cudaMallocFromPoolAsync(&p, bytes, detail::device_pool(), s));
    if (detail::allocation_stream_slot() == nullptr) SEMOE_CUDA_TRY(cudaStreamSynchronize(s));
    return p;
  }
  static void deallocate(void* p, std::size_t) noexcept {
    if (p) detail::cuda_warn(cudaFreeAsync(p, detail::allocation_stream()), "cudaFreeAsync");
  }
  /// Ordered after the work already on the stream; returns once copied.
  static void copy(void* dst, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    const cudaStream_t s = detail::allocation_stream();
    SEMOE_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s));
    SEMOE_CUDA_TRY(cudaStreamSynchronize(s));
  }
  /// Stream-ordered: later work on the stream sees zeros.
  static void zero(void* p, std::size_t bytes) {
    if (bytes) SEMOE_CUDA_TRY(cudaMemsetAsync(p, 0, bytes, detail::allocation_stream()));
  }
  /// The context of a thread: its current device (see space_context).
  static int current_context() {
    int device = 0;
    SEMOE_CUDA_TRY(cudaGetDevice(&device));
    return device;
  }
  static void adopt_context(int device) { SEMOE_CUDA_TRY(cudaSetDevice(device)); }
};

static_assert(MemorySpace<device_space> && MemorySpace<pinned_space>);

}  // namespace semoe
