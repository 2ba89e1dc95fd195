// semoe/cuda/algorithm.cuh: algo::engine<cuda_executor>, the routing
// primitives as CUB device-wide calls on the executor's compute stream.
// Temporary storage comes from the stream-ordered pool (device_space) and
// goes back to it on the same stream, so nothing here synchronizes.
#pragma once

#include <cub/device/device_histogram.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "semoe/core/algorithm.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/cuda/error.cuh"
#include "semoe/cuda/executor.cuh"

namespace semoe::algo {

template <>
struct engine<cuda_executor> {
  /// CUB's two-phase call: ask for the temporary bytes, then run with them.
  template <class Call>
  static void with_temp(Call call) {
    std::size_t bytes = 0;
    SEMOE_CUDA_TRY(call(nullptr, bytes));
    buffer<std::byte, device_space> temp(static_cast<index_t>(std::max<std::size_t>(bytes, 1)));
    SEMOE_CUDA_TRY(call(temp.data(), bytes));
  }

  static void histogram(cuda_executor& ex, const std::uint32_t* values, index_t n, std::int32_t* counts, int bins) {
    if (n == 0) {
      SEMOE_CUDA_TRY(cudaMemsetAsync(counts, 0, sizeof(std::int32_t) * static_cast<std::size_t>(bins), ex.stream()));
      return;
    }
    // bins + 1 evenly spaced levels over [0, bins): one bin per value.
    with_temp([&](void* temp, std::size_t& bytes) {
      return cub::DeviceHistogram::HistogramEven(temp, bytes, values, counts, bins + 1, std::uint32_t{0},
                                                 static_cast<std::uint32_t>(bins), n, ex.stream());
    });
  }

  template <class I>
  static void exclusive_sum(cuda_executor& ex, const I* in, I* out, index_t n) {
    with_temp([&](void* temp, std::size_t& bytes) {
      return cub::DeviceScan::ExclusiveSum(temp, bytes, in, out, n, ex.stream());
    });
  }

  /// CUB's radix sort is stable: equal keys keep their input order.
  static void sort_pairs(cuda_executor& ex, const std::uint32_t* keys_in, std::uint32_t* keys_out,
                         const std::int32_t* values_in, std::int32_t* values_out, index_t n, int end_bit) {
    with_temp([&](void* temp, std::size_t& bytes) {
      return cub::DeviceRadixSort::SortPairs(temp, bytes, keys_in, keys_out, values_in, values_out, n, 0, end_bit,
                                             ex.stream());
    });
  }
};

}  // namespace semoe::algo
