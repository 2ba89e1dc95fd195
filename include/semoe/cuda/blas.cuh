// semoe/cuda/blas.cuh: cuBLAS as the BLAS engine of the cuda executor. Row-
// major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, so every call
// swaps the operands. float runs in exact fp32 (CUBLAS_COMPUTE_32F, no TF32);
// __half and __nv_bfloat16 accumulate in fp32; float problems with
// precision::bf16 inputs run on bf16 copies of A and B into fp32 C. A group
// of problems is one cublasGemmGroupedBatchedEx call (each problem its own
// group of one).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "semoe/core/blas.hpp"
#include "semoe/core/buffer.hpp"
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

namespace detail {

/// The [rows, cols] float matrix at src (leading dimension ld) as packed
/// bfloat16, round to nearest even (the value round_to_bf16 gives).
struct to_bf16_kernel {
  const float* src;
  index_t ld;
  __nv_bfloat16* dst;
  index_t cols;
  SEMOE_HD void operator()(index_t r, index_t j0, index_t j1) const {
    for (index_t j = j0; j < j1; ++j) dst[r * cols + j] = __float2bfloat16_rn(src[r * ld + j]);
  }
};

/// One cublasGemmGroupedBatchedEx over row-major problems (fields ta, tb, m,
/// n, k, alpha, a, lda, b, ldb, beta, c, ldc), each its own group of one.
template <class Scale, class P>
cublasStatus_t grouped_call(cuda_executor& ex, std::span<const P* const> live, cudaDataType_t ab, cudaDataType_t c,
                            cublasComputeType_t compute) {
  const std::size_t g = live.size();
  std::vector<cublasOperation_t> ta(g), tb(g);
  std::vector<int> m(g), n(g), k(g), lda(g), ldb(g), ldc(g), size(g, 1);
  std::vector<Scale> alpha(g), beta(g);
  std::vector<const void*> ptrs(3 * g);  // A (here: op(B)), B, C of each group, in that order
  for (std::size_t i = 0; i < g; ++i) {
    const auto& p = *live[i];
    ta[i] = to_cublas(p.tb);
    tb[i] = to_cublas(p.ta);
    m[i] = to_int(p.n, "n");
    n[i] = to_int(p.m, "m");
    k[i] = to_int(p.k, "k");
    lda[i] = to_int(p.ldb, "ldb");
    ldb[i] = to_int(p.lda, "lda");
    ldc[i] = to_int(p.ldc, "ldc");
    alpha[i] = static_cast<Scale>(p.alpha);
    beta[i] = static_cast<Scale>(p.beta);
    ptrs[i] = p.b;
    ptrs[g + i] = p.a;
    ptrs[2 * g + i] = p.c;
  }
  // cuBLAS reads the pointer arrays from device memory. A copy from
  // pageable memory returns once the source is staged, so `ptrs` may die.
  void* dev = ex.scratch(ptrs.size() * sizeof(void*));
  SEMOE_CUDA_TRY(cudaMemcpyAsync(dev, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice, ex.stream()));
  auto* const* A = reinterpret_cast<const void* const*>(dev);
  return cublasGemmGroupedBatchedEx(ex.blas_handle(), ta.data(), tb.data(), m.data(), n.data(), k.data(),
                                    alpha.data(), A, ab, lda.data(), A + g, ab, ldb.data(), beta.data(),
                                    const_cast<void* const*>(A + 2 * g), c, ldc.data(), static_cast<int>(g),
                                    size.data(), compute);
}

}  // namespace detail

/// C (fp32) = alpha * op(A) op(B) + beta * C with A and B in bfloat16,
/// products summed in fp32: the floor a bf16 expert GEMM is measured against.
struct bf16_problem {
  op ta = op::n, tb = op::n;
  index_t m = 0, n = 0, k = 0;
  float alpha = 1;
  const __nv_bfloat16* a = nullptr;
  index_t lda = 0;
  const __nv_bfloat16* b = nullptr;
  index_t ldb = 0;
  float beta = 0;
  float* c = nullptr;
  index_t ldc = 0;
};

/// One grouped cuBLAS call (A, B CUDA_R_16BF, C CUDA_R_32F, CUBLAS_COMPUTE_32F);
/// per-problem cublasGemmEx where cuBLAS does not take that mix grouped.
inline void grouped_gemm_bf16(cuda_executor& ex, std::span<const bf16_problem> problems) {
  std::vector<const bf16_problem*> live;
  for (const auto& p : problems)
    if (p.m > 0 && p.n > 0) live.push_back(&p);
  if (live.empty()) return;
  if (live.size() > 1) {
    const cublasStatus_t st = detail::grouped_call<float>(ex, std::span<const bf16_problem* const>(live), CUDA_R_16BF,
                                                          CUDA_R_32F, CUBLAS_COMPUTE_32F);
    if (st != CUBLAS_STATUS_NOT_SUPPORTED) {
      SEMOE_CUBLAS_TRY(st);
      return;
    }
  }
  for (const auto* p : live)
    SEMOE_CUBLAS_TRY(cublasGemmEx(ex.blas_handle(), detail::to_cublas(p->tb), detail::to_cublas(p->ta),
                                  detail::to_int(p->n, "n"), detail::to_int(p->m, "m"), detail::to_int(p->k, "k"),
                                  &p->alpha, p->b, CUDA_R_16BF, detail::to_int(p->ldb, "ldb"), p->a, CUDA_R_16BF,
                                  detail::to_int(p->lda, "lda"), &p->beta, p->c, CUDA_R_32F,
                                  detail::to_int(p->ldc, "ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

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

  /// Float problems with precision::bf16 inputs have their A and B converted
  /// to bfloat16 first (one kernel per operand, into pool memory), then run
  /// with fp32 C; the rest run in their own type.
  template <class T>
  static void grouped_gemm(cuda_executor& ex, std::span<const gemm_problem<T>> problems) {
    using ct = detail::cublas_type<T>;
    std::vector<const gemm_problem<T>*> live, rounded;
    live.reserve(problems.size());
    for (const auto& p : problems)
      if (p.m > 0 && p.n > 0) (p.inputs == precision::bf16 ? rounded : live).push_back(&p);
    if (!rounded.empty()) {
      if constexpr (std::is_same_v<T, float>)
        run_bf16_inputs(ex, rounded);
      else
        SEMOE_CHECK(false, "semoe::blas::grouped_gemm (cuBLAS): precision::bf16 takes float operands");
    }
    if (live.empty()) return;
    if (live.size() == 1 || std::is_same_v<T, double>) {  // grouped Ex is for 32-bit and 16-bit types
      for (const auto* p : live)
        gemm<T>(ex, p->ta, p->tb, p->m, p->n, p->k, p->alpha, p->a, p->lda, p->b, p->ldb, p->beta, p->c, p->ldc);
      return;
    }
    SEMOE_CUBLAS_TRY(detail::grouped_call<typename ct::scale>(ex, std::span<const gemm_problem<T>* const>(live),
                                                              ct::data, ct::data, ct::compute));
  }

 private:
  static void run_bf16_inputs(cuda_executor& ex, const std::vector<const gemm_problem<float>*>& problems) {
    std::size_t elems = 0;
    for (const auto* p : problems)
      elems += static_cast<std::size_t>(p->a_rows() * p->a_cols() + p->b_rows() * p->b_cols());
    buffer<__nv_bfloat16, device_space> converted(static_cast<index_t>(elems));  // freed in stream order
    std::vector<bf16_problem> mixed;
    mixed.reserve(problems.size());
    __nv_bfloat16* next = converted.data();
    auto convert = [&](const float* src, index_t rows, index_t cols, index_t ld) {
      __nv_bfloat16* dst = next;
      ex.parallel_rows(rows, cols, detail::to_bf16_kernel{src, ld, dst, cols});
      next += rows * cols;
      return dst;
    };
    for (const auto* p : problems) {
      const __nv_bfloat16* a = convert(p->a, p->a_rows(), p->a_cols(), p->lda);
      const __nv_bfloat16* b = convert(p->b, p->b_rows(), p->b_cols(), p->ldb);
      mixed.push_back({p->ta, p->tb, p->m, p->n, p->k, p->alpha, a, p->a_cols(), b, p->b_cols(), p->beta, p->c,
                       p->ldc});
    }
    grouped_gemm_bf16(ex, mixed);
  }
};

}  // namespace semoe::blas
