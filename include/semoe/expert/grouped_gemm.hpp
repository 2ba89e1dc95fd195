// semoe/expert/grouped_gemm.hpp: many independent GEMMs as one call, the
// shape of expert computation (one problem per local expert). On CPU the
// problems run back to back, each using every BLAS thread; on CUDA builds the
// same list maps onto cuBLAS's grouped GEMM.
#pragma once

#include <span>

#include "semoe/core/blas.hpp"

namespace semoe::expert {

/// C = alpha * op(A) op(B) + beta * C, row-major with leading dimensions.
template <class T>
struct gemm_problem {
  blas::op ta = blas::op::n, tb = blas::op::n;
  index_t m = 0, n = 0, k = 0;
  T alpha = 1;
  const T* a = nullptr;
  index_t lda = 0;
  const T* b = nullptr;
  index_t ldb = 0;
  T beta = 0;
  T* c = nullptr;
  index_t ldc = 0;

  double flops() const { return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k); }
};

template <class T>
void grouped_gemm(std::span<const gemm_problem<T>> problems) {
  for (const auto& p : problems)
    blas::gemm(p.ta, p.tb, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta, p.c, p.ldc);
}

}  // namespace semoe::expert
