// semoe/expert/grouped_gemm.hpp: many independent GEMMs as one call, the
// shape of expert computation (one problem per local expert). On CPU the
// problems run back to back, each using every BLAS thread; the cuda executor
// maps the same list onto cuBLAS's grouped GEMM (cuda/blas.cuh).
#pragma once

#include <span>

#include "semoe/core/blas.hpp"

namespace semoe::expert {

using blas::gemm_problem;

/// Every problem, on the executor's BLAS engine.
template <class T, Executor Exec>
void grouped_gemm(Exec& ex, std::span<const gemm_problem<T>> problems) {
  blas::grouped_gemm<Exec, T>(ex, problems);
}

/// Every problem, on the host's CBLAS.
template <class T>
void grouped_gemm(std::span<const gemm_problem<T>> problems) {
  for (const auto& p : problems)
    blas::gemm(p.ta, p.tb, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta, p.c, p.ldc);
}

}  // namespace semoe::expert
