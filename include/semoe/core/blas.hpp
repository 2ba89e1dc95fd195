// semoe/core/blas.hpp: GEMM dispatch. Row-major everywhere; CPU builds call
// CBLAS (OpenBLAS), CUDA builds route device memory to cuBLAS in cuda/.
#pragma once

#include <cblas.h>

#include <type_traits>

#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/tensor.hpp"

namespace semoe::blas {

enum class op { n, t };

namespace detail {
inline CBLAS_TRANSPOSE to_cblas(op o) { return o == op::n ? CblasNoTrans : CblasTrans; }
}  // namespace detail

/// C = alpha * op(A) * op(B) + beta * C, row-major, with explicit leading
/// dimensions. The raw form the grouped GEMM loops over.
template <class T>
void gemm(op ta, op tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
          const T* b, index_t ldb, T beta, T* c, index_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "semoe::blas::gemm: only float and double are supported");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    // BLAS leaves C untouched for k == 0 only when beta == 1; make it exact.
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  const auto M = static_cast<blasint>(m), N = static_cast<blasint>(n), K = static_cast<blasint>(k);
  if constexpr (std::is_same_v<T, float>)
    cblas_sgemm(CblasRowMajor, detail::to_cblas(ta), detail::to_cblas(tb), M, N, K, alpha, a,
                static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
                static_cast<blasint>(ldc));
  else
    cblas_dgemm(CblasRowMajor, detail::to_cblas(ta), detail::to_cblas(tb), M, N, K, alpha, a,
                static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
                static_cast<blasint>(ldc));
}

/// C = alpha * op(A) * op(B) + beta * C on matrix views; shapes are checked.
template <class T>
void gemm(op ta, op tb, T alpha, matrix_view<const T> a, matrix_view<const T> b, T beta,
          matrix_view<T> c) {
  const index_t m = ta == op::n ? a.rows() : a.cols();
  const index_t k = ta == op::n ? a.cols() : a.rows();
  const index_t kb = tb == op::n ? b.rows() : b.cols();
  const index_t n = tb == op::n ? b.cols() : b.rows();
  SEMOE_CHECK(k == kb && c.rows() == m && c.cols() == n, "semoe::blas::gemm: shapes do not agree: op(A) is [",
              m, ", ", k, "], op(B) is [", kb, ", ", n, "], C is [", c.rows(), ", ", c.cols(), "]");
  SEMOE_CHECK(a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1,
              "semoe::blas::gemm: matrices must have unit column stride");
  gemm(ta, tb, m, n, k, alpha, a.data(), a.ld(), b.data(), b.ld(), beta, c.data(), c.ld());
}

/// Number of threads OpenBLAS uses for one call.
inline void set_num_threads(int n) { openblas_set_num_threads(n); }
inline int num_threads() { return openblas_get_num_threads(); }

}  // namespace semoe::blas
