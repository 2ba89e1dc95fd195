// semoe/cuda/executor.cuh: the cuda executor. It launches the same SEMOE_HD
// kernel bodies the cpu executor loops over: one generic kernel maps a
// grid-stride loop onto body(i), so a body never reads threadIdx. It owns a
// compute stream (kernels, cuBLAS, stream-ordered allocation), a copy stream
// (tier moves, which events order against compute) and a cuBLAS handle.
#pragma once

#include <algorithm>
#include <cstddef>
#include <utility>

#include "semoe/core/config.hpp"
#include "semoe/core/executor.hpp"
#include "semoe/cuda/error.cuh"
#include "semoe/cuda/event.cuh"
#include "semoe/cuda/memory.cuh"

namespace semoe {

namespace detail {
template <class F>
SEMOE_KERNEL void for_each_index_kernel(F body, index_t n) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) body(i);
}

/// Rows over grid.y, columns over the threads of grid.x: one column per
/// thread, so a warp reads 32 neighbouring elements of a row.
template <class F>
SEMOE_KERNEL void for_each_row_kernel(F body, index_t rows, index_t cols) {
  const index_t col_stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t r = blockIdx.y; r < rows; r += gridDim.y)
    for (index_t j = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols; j += col_stride)
      body(r, j, j + 1);
}
}  // namespace detail

/// True when this process can see at least one CUDA device. Tests and
/// examples ask before making an executor, to skip or to say why not.
inline bool cuda_device_available() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  return n > 0;
}

/// Kernel launches and cuBLAS calls on one compute stream of one device.
/// parallel_for is asynchronous; synchronize() or an event orders the host
/// after it. While alive, it is the allocation stream of device_space on the
/// thread that made it (see cuda/memory.cuh).
class cuda_executor {
 public:
  using memory_space = device_space;
  using event = cuda_event;
  static constexpr bool on_device = true;

  struct options {
    int device = 0;
    int block = 256;  ///< threads per block of parallel_for
  };

  cuda_executor() : cuda_executor(options{}) {}
  explicit cuda_executor(options o) : opt_(o) {
    SEMOE_CHECK(o.block > 0 && o.block <= 1024 && o.block % 32 == 0, "semoe::cuda_executor: options.block = ",
                o.block, ": expected a multiple of 32 in [32, 1024]");
    int devices = 0;
    SEMOE_CUDA_TRY(cudaGetDeviceCount(&devices));
    SEMOE_CHECK(o.device >= 0 && o.device < devices, "semoe::cuda_executor: options.device = ", o.device,
                ": this process sees ", devices, " CUDA device(s)");
    SEMOE_CUDA_TRY(cudaSetDevice(o.device));
    SEMOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    SEMOE_CUDA_TRY(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
    SEMOE_CUDA_TRY(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, o.device));
    SEMOE_CUBLAS_TRY(cublasCreate(&blas_));
    SEMOE_CUBLAS_TRY(cublasSetStream(blas_, stream_));
    previous_ = std::exchange(detail::allocation_stream_slot(), stream_);
  }
  cuda_executor(const cuda_executor&) = delete;
  cuda_executor& operator=(const cuda_executor&) = delete;
  ~cuda_executor() {
    // Buffers that outlive this executor are freed on the previous stream:
    // everything ordered on ours must be done first.
    detail::cuda_warn(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    detail::cuda_warn(cudaStreamSynchronize(copy_stream_), "cudaStreamSynchronize");
    device_space::deallocate(scratch_, scratch_bytes_);
    detail::cuda_warn(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    if (detail::allocation_stream_slot() == stream_) detail::allocation_stream_slot() = previous_;
    cublasDestroy(blas_);
    cudaStreamDestroy(copy_stream_);
    cudaStreamDestroy(stream_);
  }

  int device() const { return opt_.device; }
  int concurrency() const { return sms_; }
  cudaStream_t stream() const { return stream_; }
  cudaStream_t copy_stream() const { return copy_stream_; }
  cublasHandle_t blas_handle() const { return blas_; }

  /// body(i) for i in [0, n) on the device, ordered on the compute stream;
  /// `grain` is the cpu executor's scheduling hint and means nothing here.
  template <class F>
  void parallel_for(index_t n, const F& body, index_t /*grain*/ = 0) {
    if (n <= 0) return;
    const index_t blocks =
        std::min<index_t>((n + opt_.block - 1) / opt_.block, static_cast<index_t>(sms_) * 32);
    detail::for_each_index_kernel<<<static_cast<unsigned>(blocks), opt_.block, 0, stream_>>>(body, n);
    SEMOE_CUDA_TRY(cudaGetLastError());
  }

  /// body(r, j, j + 1) for every row r and column j, one column per thread.
  template <class F>
  void parallel_rows(index_t rows, index_t cols, const F& body, index_t /*grain*/ = 0) {
    if (rows <= 0 || cols <= 0) return;
    const index_t col_blocks = std::min<index_t>((cols + opt_.block - 1) / opt_.block, 64);
    const index_t row_blocks = std::min<index_t>(rows, std::max<index_t>(1, static_cast<index_t>(sms_) * 32 / col_blocks));
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(std::min<index_t>(row_blocks, 65535)));
    detail::for_each_row_kernel<<<grid, opt_.block, 0, stream_>>>(body, rows, cols);
    SEMOE_CUDA_TRY(cudaGetLastError());
  }

  void synchronize() { SEMOE_CUDA_TRY(cudaStreamSynchronize(stream_)); }

  /// Bytes between device and host (or within either), ordered after the
  /// compute stream's work; returns when they have landed.
  void copy(void* dst, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    SEMOE_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
    SEMOE_CUDA_TRY(cudaStreamSynchronize(stream_));
  }

  /// Events on the compute stream.
  void record(cuda_event& ev) { ev.record(stream_); }
  void wait(cuda_event& ev) { ev.wait(stream_); }

  /// An asynchronous copy on the copy stream (pinned or device memory on
  /// both sides, so it truly overlaps compute); record an event after it and
  /// wait() on that event before compute reads dst.
  void copy_async(void* dst, const void* src, std::size_t bytes) {
    if (bytes) SEMOE_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, copy_stream_));
  }
  void record_copy(cuda_event& ev) { ev.record(copy_stream_); }

  /// Device memory of at least `bytes` for one call's small tables (cuBLAS's
  /// pointer arrays): valid until the next scratch() call; reuse is safe
  /// because writers and readers are ordered on the compute stream.
  void* scratch(std::size_t bytes) {
    if (bytes > scratch_bytes_) {
      device_space::deallocate(scratch_, scratch_bytes_);
      scratch_bytes_ = std::max<std::size_t>(bytes, 4096);
      scratch_ = device_space::allocate(scratch_bytes_);
    }
    return scratch_;
  }

 private:
  options opt_;
  cudaStream_t stream_ = nullptr, copy_stream_ = nullptr, previous_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  int sms_ = 1;
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
};

static_assert(Executor<cuda_executor>);

}  // namespace semoe
