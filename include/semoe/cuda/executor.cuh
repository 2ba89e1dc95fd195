// semoe/cuda/executor.cuh: the cuda executor. It launches the same SEMOE_HD
// kernel bodies the cpu executor loops over (DESIGN.md §6): one generic
// kernel maps a grid-stride loop onto body(i), so a body never reads threadIdx.
#pragma once

#include <cuda_runtime.h>

#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"

/// A failing CUDA runtime call: file, line, the call and CUDA's own message.
#define SEMOE_CUDA_TRY(expr)                                                                   \
  do {                                                                                         \
    const cudaError_t semoe_err_ = (expr);                                                     \
    if (semoe_err_ != cudaSuccess)                                                             \
      ::semoe::detail::fail(__FILE__, ":", __LINE__, ": ", #expr, ": ", cudaGetErrorName(semoe_err_), \
                            ": ", cudaGetErrorString(semoe_err_));                             \
  } while (0)

namespace semoe {

namespace detail {
template <class F>
SEMOE_KERNEL void for_each_index_kernel(F body, index_t n) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) body(i);
}
}  // namespace detail

/// Kernel launches on one stream. parallel_for is asynchronous; synchronize()
/// (or an event) orders the host after it.
class cuda_executor {
 public:
  struct options {
    int device = 0;
    int block = 256;
  };
  cuda_executor() : cuda_executor(options{}) {}
  explicit cuda_executor(options o) : opt_(o) {
    SEMOE_CUDA_TRY(cudaSetDevice(o.device));
    SEMOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    SEMOE_CUDA_TRY(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, o.device));
  }
  cuda_executor(const cuda_executor&) = delete;
  cuda_executor& operator=(const cuda_executor&) = delete;
  ~cuda_executor() { cudaStreamDestroy(stream_); }

  cudaStream_t stream() const { return stream_; }

  /// body(i) for i in [0, n) on the device; `grain` is accepted for
  /// signature parity with cpu_executor and ignored.
  template <class F>
  void parallel_for(index_t n, const F& body, index_t /*grain*/ = 0) {
    if (n <= 0) return;
    const index_t blocks = std::min<index_t>((n + opt_.block - 1) / opt_.block, static_cast<index_t>(sms_) * 32);
    detail::for_each_index_kernel<<<static_cast<unsigned>(blocks), opt_.block, 0, stream_>>>(body, n);
    SEMOE_CUDA_TRY(cudaGetLastError());
  }

  void synchronize() { SEMOE_CUDA_TRY(cudaStreamSynchronize(stream_)); }

 private:
  options opt_;
  cudaStream_t stream_ = nullptr;
  int sms_ = 1;
};

}  // namespace semoe
