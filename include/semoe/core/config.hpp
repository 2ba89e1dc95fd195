// semoe/core/config.hpp: the one place that knows whether we are compiled by nvcc.
#pragma once

#include <cstddef>
#include <cstdint>

#define SEMOE_VERSION_MAJOR 0
#define SEMOE_VERSION_MINOR 1
#define SEMOE_VERSION_PATCH 0

#if defined(__CUDACC__)
#  define SEMOE_HD __host__ __device__
#  define SEMOE_DEVICE __device__
#  define SEMOE_KERNEL __global__
#else
#  define SEMOE_HD
#  define SEMOE_DEVICE
#  define SEMOE_KERNEL
#endif

#if defined(__CUDA_ARCH__)
#  define SEMOE_DEVICE_PASS 1
#else
#  define SEMOE_DEVICE_PASS 0
#endif

#define SEMOE_RESTRICT __restrict__

namespace semoe {

/// Signed index type of every extent and stride: sizes subtract, and a
/// negative slot means "dropped" in the routing plan.
using index_t = std::int64_t;

inline constexpr std::size_t cache_line = 64;

}  // namespace semoe
