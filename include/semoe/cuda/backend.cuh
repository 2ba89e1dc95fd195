// semoe/cuda/backend.cuh: the cuda backend. Kernels, CUB and cuBLAS run on
// the executor's compute stream over device memory; host-side staging
// (host_tier, a host-routed plan) is pinned so copies overlap compute.
#pragma once

#include "semoe/core/backend.hpp"
#include "semoe/cuda/algorithm.cuh"
#include "semoe/cuda/blas.cuh"
#include "semoe/cuda/event.cuh"
#include "semoe/cuda/executor.cuh"
#include "semoe/cuda/memory.cuh"

namespace semoe {

struct cuda {
  using policy_kind = backend_tag;
  using memory_space = device_space;
  using host_memory_space = pinned_space;
  using executor = cuda_executor;
  using event = cuda_event;
  static constexpr const char* name = "cuda";
};

static_assert(Backend<cuda>);

}  // namespace semoe
