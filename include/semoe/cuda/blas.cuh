// semoe/cuda/blas.cuh: cuBLAS as the BLAS engine of the cuda executor. Row-
// major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, so every call
// swaps the operands. float runs in exact fp32 (CUBLAS_COMPUTE_32F, no TF32);
// __half and __nv_bfloat16 accumulate in fp32. A group of problems is one
// cublasGemmGroupedBatchedEx call (each problem its own group of one).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "semoe/core/blas.hpp"
#include "semoe/cuda/error.cuh"
#include "semoe/cuda/executor.cuh"

namespace semoe::blas {

namespace detail {

template <class T>
struct cublas_type;
template <>
struct cublas_type<float> {
  static constexpr cudaDataType_t data = CUDA_R_32F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  using scale = float;
};
template <>
struct cublas_type<double> {
  static constexpr cudaDataType_t data = CUDA_R_64F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_64F;
  using scale = double;
};
template <>
struct cublas_type<__half> {
  static constexpr cudaDataType_t data = CUDA_R_16F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  using scale = float;
};
template <>
struct cublas_type<__nv_bfloat16> {
  static constexpr cudaDataType_t data = CUDA_R_16BF;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  using scale = float;
};

inline cublasOperation_t to_cublas(op o) { return o == op::n ? CUBLAS_OP_N : CUBLAS_OP_T; }

inline int to_int(index_t v, const char* what) {
  SEMOE_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "semoe::blas (cuBLAS): ", what, " = ", v,
              " does not fit cuBLAS's 32-bit int");
  return static_cast<int>(v);
}

}  // namespace detail

template <>
struct engine<cuda_executor> {
  template <class T>
  static void gemm(cuda_executor& ex, op ta, op tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                   index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    using ct = detail::cublas_type<T>;
    if (m == 0 || n == 0) return;
    const typename ct::scale al = static_cast<typename ct::scale>(alpha), be = static_cast<typename ct::scale>(beta);
    SEMOE_CUBLAS_TRY(cublasGemmEx(ex.blas_handle(), detail::to_cublas(tb), detail::to_cublas(ta),
                                  detail::to_int(n, "n"), detail::to_int(m, "m"), detail::to_int(k, "k"), &al, b,
                                  ct::data, detail::to_int(ldb, "ldb"), a, ct::data, detail::to_int(lda, "lda"), &be,
                                  c, ct::data, detail::to_int(ldc, "ldc"), ct::compute, CUBLAS_GEMM_DEFAULT));
  }

  template <class T>
  static void grouped_gemm(cuda_executor& ex, std::span<const gemm_problem<T>> problems) {
    using ct = detail::cublas_type<T>;
    using scale = typename ct::scale;
    std::vector<const gemm_problem<T>*> live;
    live.reserve(problems.size());
    for (const auto& p : problems)
      if (p.m > 0 && p.n > 0) live.push_back(&p);
    if (live.empty()) return;
    if (live.size() == 1 || std::is_same_v<T, double>) {  // grouped Ex is for 32-bit and 16-bit types
      for (const auto* p : live)
        gemm<T>(ex, p->ta, p->tb, p->m, p->n, p->k, p->alpha, p->a, p->lda, p->b, p->ldb, p->beta, p->c, p->ldc);
      return;
    }
    const std::size_t g = live.size();
    std::vector<cublasOperation_t> ta(g), tb(g);
    std::vector<int> m(g), n(g), k(g), lda(g), ldb(g), ldc(g), size(g, 1);
    std::vector<scale> alpha(g), beta(g);
    std::vector<const void*> ptrs(3 * g);  // A (here: op(B)), B, C of each group, in that order
    for (std::size_t i = 0; i < g; ++i) {
      const auto& p = *live[i];
      ta[i] = detail::to_cublas(p.tb);
      tb[i] = detail::to_cublas(p.ta);
      m[i] = detail::to_int(p.n, "n");
      n[i] = detail::to_int(p.m, "m");
      k[i] = detail::to_int(p.k, "k");
      lda[i] = detail::to_int(p.ldb, "ldb");
      ldb[i] = detail::to_int(p.lda, "lda");
      ldc[i] = detail::to_int(p.ldc, "ldc");
      alpha[i] = static_cast<scale>(p.alpha);
      beta[i] = static_cast<scale>(p.beta);
      ptrs[i] = p.b;
      ptrs[g + i] = p.a;
      ptrs[2 * g + i] = p.c;
    }
    // cuBLAS reads the pointer arrays from device memory. A copy from
    // pageable memory returns once the source is staged, so `ptrs` may die.
    void* dev = ex.scratch(ptrs.size() * sizeof(void*));
    SEMOE_CUDA_TRY(cudaMemcpyAsync(dev, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice,
                                   ex.stream()));
    auto* const* A = reinterpret_cast<const void* const*>(dev);
    SEMOE_CUBLAS_TRY(cublasGemmGroupedBatchedEx(ex.blas_handle(), ta.data(), tb.data(), m.data(), n.data(), k.data(),
                                                alpha.data(), A, ct::data, lda.data(), A + g, ct::data, ldb.data(),
                                                beta.data(), const_cast<void* const*>(A + 2 * g), ct::data,
                                                ldc.data(), static_cast<int>(g), size.data(), ct::compute));
  }

};

}  // namespace semoe::blas
