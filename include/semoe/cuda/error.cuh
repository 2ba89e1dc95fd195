// semoe/cuda/error.cuh: CUDA and cuBLAS failures as semoe::error, naming the
// file, the line, the call and the library's own message.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "semoe/core/error.hpp"

/// A failing CUDA runtime call: file, line, the call and CUDA's own message.
#define SEMOE_CUDA_TRY(expr)                                                                           \
  do {                                                                                                 \
    const cudaError_t semoe_err_ = (expr);                                                             \
    if (semoe_err_ != cudaSuccess)                                                                     \
      ::semoe::detail::fail(__FILE__, ":", __LINE__, ": ", #expr, ": ", cudaGetErrorName(semoe_err_), \
                            ": ", cudaGetErrorString(semoe_err_));                                     \
  } while (0)

/// A failing cuBLAS call: file, line, the call and cuBLAS's status.
#define SEMOE_CUBLAS_TRY(expr)                                                                          \
  do {                                                                                                  \
    const cublasStatus_t semoe_st_ = (expr);                                                            \
    if (semoe_st_ != CUBLAS_STATUS_SUCCESS)                                                             \
      ::semoe::detail::fail(__FILE__, ":", __LINE__, ": ", #expr, ": ", cublasGetStatusName(semoe_st_), \
                            ": ", cublasGetStatusString(semoe_st_));                                    \
  } while (0)

namespace semoe::detail {

/// For destructors and other places that must not throw: report, go on.
inline void cuda_warn(cudaError_t e, const char* what) noexcept {
  if (e != cudaSuccess) std::fprintf(stderr, "semoe: %s: %s\n", what, cudaGetErrorString(e));
}

}  // namespace semoe::detail
