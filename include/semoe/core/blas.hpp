// semoe/core/blas.hpp: GEMM dispatch. Row-major everywhere. The forms that
// take an executor go through blas::engine<Executor>: CBLAS (OpenBLAS) for
// host executors here, cuBLAS on the executor's stream for the cuda executor
// (cuda/blas.cuh specializes the engine). The forms without an executor are
// host CBLAS calls.
#pragma once

#include <cblas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/executor.hpp"
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

namespace detail {
struct gemm_shape {
  index_t m, n, k;
};
/// m, n, k of C = op(A) op(B) on views, or semoe::error naming the mismatch.
template <class T>
gemm_shape check_gemm(op ta, op tb, const matrix_view<const T>& a, const matrix_view<const T>& b,
                      const matrix_view<T>& c) {
  const index_t m = ta == op::n ? a.rows() : a.cols();
  const index_t k = ta == op::n ? a.cols() : a.rows();
  const index_t kb = tb == op::n ? b.rows() : b.cols();
  const index_t n = tb == op::n ? b.cols() : b.rows();
  SEMOE_CHECK(k == kb && c.rows() == m && c.cols() == n, "semoe::blas::gemm: shapes do not agree: op(A) is [",
              m, ", ", k, "], op(B) is [", kb, ", ", n, "], C is [", c.rows(), ", ", c.cols(), "]");
  SEMOE_CHECK(a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1,
              "semoe::blas::gemm: matrices must have unit column stride");
  return {m, n, k};
}
}  // namespace detail

/// C = alpha * op(A) * op(B) + beta * C on matrix views; shapes are checked.
template <class T>
void gemm(op ta, op tb, T alpha, matrix_view<const T> a, matrix_view<const T> b, T beta,
          matrix_view<T> c) {
  const auto s = detail::check_gemm(ta, tb, a, b, c);
  gemm(ta, tb, s.m, s.n, s.k, alpha, a.data(), a.ld(), b.data(), b.ld(), beta, c.data(), c.ld());
}

/// What the multipliers of a float GEMM read. `native`: the operands as they
/// are (exact fp32 on every engine). `bf16`: each operand rounded to
/// bfloat16 (round to nearest even), products summed in fp32: tensor cores'
/// bf16 mode, with the fp32 values in memory (master weights, activations)
/// untouched. The host engine rounds copies and runs sgemm, so both backends
/// multiply the same bf16 values.
enum class precision { native, bf16 };

/// x rounded to the nearest bfloat16 (ties to even), kept as a float: the
/// value a bf16 tensor core multiplies. NaN stays NaN; values past bf16's
/// largest finite round to infinity, as __float2bfloat16_rn does.
SEMOE_HD inline float round_to_bf16(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return x;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  float r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

/// One GEMM of a group: C = alpha * op(A) op(B) + beta * C, row-major with
/// leading dimensions. Expert computation is a list of these, one or more
/// per local expert.
template <class T>
struct gemm_problem {
  op ta = op::n, tb = op::n;
  index_t m = 0, n = 0, k = 0;
  T alpha = 1;
  const T* a = nullptr;
  index_t lda = 0;
  const T* b = nullptr;
  index_t ldb = 0;
  T beta = 0;
  T* c = nullptr;
  index_t ldc = 0;
  precision inputs = precision::native;  ///< bf16: float operands rounded to bfloat16

  /// Rows and columns of A and B as stored (before op).
  index_t a_rows() const { return ta == op::n ? m : k; }
  index_t a_cols() const { return ta == op::n ? k : m; }
  index_t b_rows() const { return tb == op::n ? k : n; }
  index_t b_cols() const { return tb == op::n ? n : k; }

  double flops() const { return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k); }
};

namespace detail {
/// dst = the [rows, cols] matrix at src (leading dimension ld), each value
/// rounded to bf16, packed with leading dimension cols.
template <class T>
void round_copy(const T* src, index_t rows, index_t cols, index_t ld, std::vector<T>& dst) {
  dst.resize(static_cast<std::size_t>(rows * cols));
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < cols; ++j)
      dst[static_cast<std::size_t>(r * cols + j)] = static_cast<T>(round_to_bf16(static_cast<float>(src[r * ld + j])));
}
}  // namespace detail

/// Number of threads OpenBLAS uses for one call.
inline void set_num_threads(int n) { openblas_set_num_threads(n); }
inline int num_threads() { return openblas_get_num_threads(); }

namespace detail {
/// How a host GEMM is cut into pieces for executor threads: the larger of
/// C's dimensions in `count` blocks of `block` rows (or columns). The cut
/// depends on the shape alone, never on the thread count, so every thread
/// count computes the same pieces and the same bits. A piece keeps at least
/// 256 rows or columns and 2^27 multiply-adds (about a millisecond on one
/// core; each piece packs the other operand again, and small pieces would
/// take OpenBLAS's small-matrix kernels, which round differently), and a
/// GEMM has at most 4: a grouped call spreads the pieces of all its
/// problems over the threads. (On the 2-core development machine 8 pieces
/// of 2^26 made the default bench_moe_layer shape 2 % slower.)
struct gemm_cut {
  bool by_rows = true;
  index_t block = 0, count = 1;
};
inline gemm_cut cut_of(index_t m, index_t n, index_t k) {
  const bool rows = m >= n;
  const index_t dim = rows ? m : n;
  const double macs = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const auto by_work = static_cast<index_t>(macs / double(1 << 27));
  const index_t want = std::max<index_t>(1, std::min<index_t>({4, dim / 256, by_work}));
  const index_t block = ((dim + want - 1) / want + 15) / 16 * 16;
  return {rows, block, (dim + block - 1) / block};
}
/// Piece i of problem p under cut c: a GEMM over a block of C's rows (A's
/// rows) or columns (B's columns).
template <class T>
gemm_problem<T> piece(gemm_problem<T> p, const gemm_cut& c, index_t i) {
  const index_t first = i * c.block;
  if (c.by_rows) {
    p.m = std::min(p.m - first, c.block);
    p.a += p.ta == op::n ? first * p.lda : first;
    p.c += first * p.ldc;
  } else {
    p.n = std::min(p.n - first, c.block);
    p.b += p.tb == op::n ? first : first * p.ldb;
    p.c += first;
  }
  return p;
}
template <class T>
void run_native(const gemm_problem<T>& p) {
  blas::gemm(p.ta, p.tb, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta, p.c, p.ldc);
}
}  // namespace detail

/// Whether host executor ex runs GEMMs on its own threads: when OpenBLAS has
/// one thread (set_num_threads(1)) and ex can run chunks of work. Then one
/// pool, ex's, owns the cores: OpenBLAS's threads do not spin beside it, and
/// many small GEMMs run side by side instead of one after another.
template <class Exec>
bool gemms_on_executor(Exec&) {
  if constexpr (ChunkedExecutor<Exec> && !Exec::on_device)
    return num_threads() == 1;
  else
    return false;
}

/// The BLAS of an executor's memory. This primary engine serves host
/// executors with CBLAS: each call uses every OpenBLAS thread, or, where
/// gemms_on_executor(ex), the GEMMs are cut into pieces (detail::cut_of) run
/// on the executor's threads with single-threaded OpenBLAS. A device backend
/// specializes it (cuda/blas.cuh: cuBLAS on the executor's stream).
template <class Exec>
struct engine {
  static_assert(!Exec::on_device,
                "semoe::blas::engine: this device executor has no BLAS engine; include its backend's BLAS header "
                "(cuda/blas.cuh for the cuda executor)");
  template <class T>
  static void gemm(Exec& ex, op ta, op tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                   const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    const gemm_problem<T> p{ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc};
    if (gemms_on_executor(ex))
      run_pieces(ex, std::span<const gemm_problem<T>>(&p, 1));
    else
      detail::run_native(p);
  }
  /// bf16 inputs: rounded copies of A and B (packed, leading dimension =
  /// columns) go to sgemm, so the products are those of the bf16 values,
  /// summed in fp32.
  template <class T>
  static void grouped_gemm(Exec& ex, std::span<const gemm_problem<T>> problems) {
    const bool pieces = gemms_on_executor(ex);
    std::vector<gemm_problem<T>> native;
    std::vector<T> ra, rb;
    for (const auto& p : problems) {
      if (p.inputs == precision::native) {
        if (pieces)
          native.push_back(p);
        else
          detail::run_native(p);
        continue;
      }
      static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
      SEMOE_CHECK((std::is_same_v<T, float>), "semoe::blas::grouped_gemm: precision::bf16 takes float operands");
      if (p.m == 0 || p.n == 0) continue;
      detail::round_copy(p.a, p.a_rows(), p.a_cols(), p.lda, ra);
      detail::round_copy(p.b, p.b_rows(), p.b_cols(), p.ldb, rb);
      gemm_problem<T> r = p;
      r.a = ra.data();
      r.lda = p.a_cols();
      r.b = rb.data();
      r.ldb = p.b_cols();
      r.inputs = precision::native;
      if (pieces)
        run_pieces(ex, std::span<const gemm_problem<T>>(&r, 1));
      else
        detail::run_native(r);
    }
    if (!native.empty()) run_pieces(ex, std::span<const gemm_problem<T>>(native));
  }

 private:
  /// Every piece of every problem, largest first, handed to the executor's
  /// threads as they come free. Pieces write disjoint blocks of C.
  template <class T>
  static void run_pieces(Exec& ex, std::span<const gemm_problem<T>> problems) {
    struct task {
      std::size_t problem;
      index_t piece;
      double flops;
    };
    std::vector<detail::gemm_cut> cuts(problems.size());
    std::vector<task> tasks;
    for (std::size_t i = 0; i < problems.size(); ++i) {
      const auto& p = problems[i];
      if (p.m == 0 || p.n == 0) continue;
      cuts[i] = detail::cut_of(p.m, p.n, p.k);
      for (index_t j = 0; j < cuts[i].count; ++j)
        tasks.push_back({i, j, detail::piece(p, cuts[i], j).flops()});
    }
    std::stable_sort(tasks.begin(), tasks.end(), [](const task& x, const task& y) { return x.flops > y.flops; });
    ex.parallel_chunks(static_cast<index_t>(tasks.size()), 1, [&](index_t b, index_t e) {
      for (index_t t = b; t < e; ++t) {
        const auto& tk = tasks[static_cast<std::size_t>(t)];
        detail::run_native(detail::piece(problems[tk.problem], cuts[tk.problem], tk.piece));
      }
    });
  }
};

/// C = alpha * op(A) * op(B) + beta * C on memory of the executor's space.
template <Executor Exec, class T>
void gemm(Exec& ex, op ta, op tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b,
          index_t ldb, T beta, T* c, index_t ldc) {
  engine<Exec>::template gemm<T>(ex, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/// The same on matrix views; shapes are checked.
template <Executor Exec, class T>
void gemm(Exec& ex, op ta, op tb, T alpha, matrix_view<const T> a, matrix_view<const T> b, T beta,
          matrix_view<T> c) {
  const auto s = detail::check_gemm(ta, tb, a, b, c);
  engine<Exec>::template gemm<T>(ex, ta, tb, s.m, s.n, s.k, alpha, a.data(), a.ld(), b.data(), b.ld(), beta,
                                 c.data(), c.ld());
}

/// Many independent GEMMs as one call (one problem per expert and pass).
template <Executor Exec, class T>
void grouped_gemm(Exec& ex, std::span<const gemm_problem<T>> problems) {
  engine<Exec>::template grouped_gemm<T>(ex, problems);
}

/// The kernels OpenBLAS chose for this CPU ("SkylakeX", "Zen", "Haswell").
inline std::string kernel_name() { return openblas_get_corename(); }

/// A sentence when OpenBLAS runs kernels far older than the CPU: a release
/// that does not know a CPU model falls back to its SSE3 "Prescott" kernels,
/// several times slower on an AVX2 or AVX-512 machine. Empty otherwise.
/// Programs that time GEMMs print it.
inline std::string kernel_warning() {
  const std::string k = kernel_name();
  if (k != "Prescott" && k != "Core2" && k != "Nehalem" && k != "Penryn" && k != "Dunnington") return {};
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const char* better = __builtin_cpu_supports("avx512f") ? "SkylakeX" : __builtin_cpu_supports("avx2") ? "Haswell" : nullptr;
  if (better)
    return semoe::detail::concat("OpenBLAS (", openblas_get_config(), ") does not know this CPU and runs its ", k,
                                 " kernels; OPENBLAS_CORETYPE=", better, " selects the ones this CPU can run");
#endif
  return {};
}

}  // namespace semoe::blas
