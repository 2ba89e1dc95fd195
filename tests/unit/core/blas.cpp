#include "semoe/core/blas.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <vector>

using semoe::index_t;
using semoe::matrix_view;
using semoe::blas::op;

namespace {

template <class T>
std::vector<T> random_values(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> d(-1, 1);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(d(rng));
  return v;
}

/// The element (i, j) of op(M) for a row-major M with leading dimension ld.
template <class T>
T at(op o, const T* m, index_t ld, index_t i, index_t j) {
  return o == op::n ? m[i * ld + j] : m[j * ld + i];
}

/// Checks C = alpha op(A) op(B) + beta C0 against a double-precision loop,
/// with every leading dimension padded past its row so ld handling shows.
template <class T>
void check_gemm(op ta, op tb, index_t m, index_t n, index_t k, T alpha, T beta) {
  const index_t ar = ta == op::n ? m : k, ac = ta == op::n ? k : m;
  const index_t br = tb == op::n ? k : n, bc = tb == op::n ? n : k;
  const index_t lda = ac + 3, ldb = bc + 2, ldc = n + 5;
  const auto a = random_values<T>(static_cast<std::size_t>(ar * lda), 1);
  const auto b = random_values<T>(static_cast<std::size_t>(br * ldb), 2);
  const auto c0 = random_values<T>(static_cast<std::size_t>(m * ldc), 3);
  auto c = c0;
  semoe::blas::gemm<T>(ta, tb, alpha, matrix_view<const T>(a.data(), {ar, ac}, {lda, 1}),
                       matrix_view<const T>(b.data(), {br, bc}, {ldb, 1}), beta,
                       matrix_view<T>(c.data(), {m, n}, {ldc, 1}));
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-13;
  for (index_t i = 0; i < m; ++i) {
    for (index_t j = 0; j < ldc; ++j) {
      const std::size_t ij = static_cast<std::size_t>(i * ldc + j);
      if (j >= n) {  // the padding is not touched
        CHECK(c[ij] == c0[ij]);
        continue;
      }
      double s = 0;
      for (index_t p = 0; p < k; ++p) s += double(at(ta, a.data(), lda, i, p)) * at(tb, b.data(), ldb, p, j);
      const double want = double(alpha) * s + double(beta) * c0[ij];
      CHECK(std::abs(c[ij] - want) <= tol * (1 + std::abs(want)) * std::sqrt(double(k + 1)));
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("blas::gemm: all four transpose combinations match a loop reference", T, float, double) {
  for (op ta : {op::n, op::t})
    for (op tb : {op::n, op::t}) {
      CAPTURE(int(ta));
      CAPTURE(int(tb));
      check_gemm<T>(ta, tb, 7, 5, 3, T(1), T(0));
      check_gemm<T>(ta, tb, 13, 17, 29, T(0.5), T(-1.5));
      check_gemm<T>(ta, tb, 1, 64, 65, T(-2), T(1));
      check_gemm<T>(ta, tb, 33, 1, 8, T(1), T(0.25));
    }
}

TEST_CASE_TEMPLATE("blas::gemm: k == 0 gives beta * C exactly, even over NaN when beta is 0", T, float, double) {
  std::vector<T> a(1), b(1);
  std::vector<T> c{1, 2, 3, 4, 5, 6, 7, 8};  // [2, 3] with ld 4
  matrix_view<const T> a0(a.data(), {2, 0}), b0(b.data(), {0, 3});

  SUBCASE("beta 2") {
    semoe::blas::gemm<T>(op::n, op::n, T(1), a0, b0, T(2), matrix_view<T>(c.data(), {2, 3}, {4, 1}));
    CHECK(c == std::vector<T>{2, 4, 6, 4, 10, 12, 14, 8});
  }
  SUBCASE("beta 0 overwrites NaN") {
    c[1] = std::nan("");
    semoe::blas::gemm<T>(op::n, op::n, T(1), a0, b0, T(0), matrix_view<T>(c.data(), {2, 3}, {4, 1}));
    CHECK(c == std::vector<T>{0, 0, 0, 4, 0, 0, 0, 8});
  }
  SUBCASE("the raw form") {
    semoe::blas::gemm<T>(op::t, op::t, 2, 3, 0, T(1), a.data(), 1, b.data(), 1, T(-1), c.data(), 4);
    CHECK(c == std::vector<T>{-1, -2, -3, 4, -5, -6, -7, 8});
  }
}

TEST_CASE("blas::gemm: an empty output is a no-op") {
  std::vector<float> a(6, 1.0f), b(6, 1.0f), c(1, 42.0f);
  semoe::blas::gemm<float>(op::n, op::n, 1.0f, semoe::as_matrix<const float>(a.data(), 0, 3),
                           semoe::as_matrix<const float>(b.data(), 3, 2), 0.0f, semoe::as_matrix(c.data(), 0, 2));
  CHECK(c[0] == 42.0f);
}

TEST_CASE("blas::gemm: shape mismatches and strided columns raise semoe::error") {
  std::vector<double> a(64), b(64), c(64);
  auto A = semoe::as_matrix<const double>(a.data(), 3, 4);
  auto B = semoe::as_matrix<const double>(b.data(), 5, 2);
  auto C = semoe::as_matrix(c.data(), 3, 2);
  CHECK_THROWS_WITH_AS(semoe::blas::gemm<double>(op::n, op::n, 1.0, A, B, 0.0, C),
                       "semoe::blas::gemm: shapes do not agree: op(A) is [3, 4], op(B) is [5, 2], C is [3, 2]",
                       semoe::error);
  // op(A) [4, 3] x B [3, 2] is fine, but C must then be [4, 2].
  auto B3 = semoe::as_matrix<const double>(b.data(), 3, 2);
  CHECK_THROWS_AS(semoe::blas::gemm<double>(op::t, op::n, 1.0, A, B3, 0.0, C), semoe::error);
  CHECK_NOTHROW(semoe::blas::gemm<double>(op::t, op::n, 1.0, A, B3, 0.0, semoe::as_matrix(c.data(), 4, 2)));
  // A column-strided (transposed) view is rejected rather than misread.
  matrix_view<const double> At(a.data(), {4, 3}, {1, 4});
  CHECK_THROWS_WITH_AS(semoe::blas::gemm<double>(op::n, op::n, 1.0, At, B3, 0.0, semoe::as_matrix(c.data(), 4, 2)),
                       "semoe::blas::gemm: matrices must have unit column stride", semoe::error);
}

TEST_CASE("the executor forms run the executor's engine: the same bits as the raw CBLAS calls") {
  semoe::cpu_executor ex({.threads = 2});
  const index_t m = 17, n = 23, k = 31;
  auto a = random_values<float>(m * k, 11), b = random_values<float>(k * n, 12);
  std::vector<float> c1(m * n, 1.0f), c2 = c1, c3 = c1;
  semoe::blas::gemm(op::n, op::n, m, n, k, 1.5f, a.data(), k, b.data(), n, 0.5f, c1.data(), n);
  semoe::blas::gemm(ex, op::n, op::n, m, n, k, 1.5f, a.data(), k, b.data(), n, 0.5f, c2.data(), n);
  CHECK(c1 == c2);
  std::vector<semoe::blas::gemm_problem<float>> probs = {
      {op::n, op::n, 7, n, k, 1.5f, a.data(), k, b.data(), n, 0.5f, c3.data(), n},
      {op::n, op::n, m - 7, n, k, 1.5f, a.data() + 7 * k, k, b.data(), n, 0.5f, c3.data() + 7 * n, n}};
  semoe::blas::grouped_gemm<semoe::cpu_executor, float>(ex, probs);
  std::vector<float> c4(m * n, 1.0f);  // the same two problems as raw calls
  semoe::blas::gemm(op::n, op::n, 7, n, k, 1.5f, a.data(), k, b.data(), n, 0.5f, c4.data(), n);
  semoe::blas::gemm(op::n, op::n, m - 7, n, k, 1.5f, a.data() + 7 * k, k, b.data(), n, 0.5f, c4.data() + 7 * n, n);
  CHECK(c3 == c4);
  CHECK_THROWS_WITH_AS(semoe::blas::gemm(ex, op::n, op::n, 1.0f, semoe::as_matrix<const float>(a.data(), m, k),
                                         semoe::as_matrix<const float>(b.data(), n, k), 0.0f,
                                         semoe::as_matrix(c1.data(), m, n)),
                       doctest::Contains("shapes do not agree"), semoe::error);
}

/// OpenBLAS's thread count for the scope, restored after.
struct blas_threads {
  int before = semoe::blas::num_threads();
  explicit blas_threads(int n) { semoe::blas::set_num_threads(n); }
  ~blas_threads() { semoe::blas::set_num_threads(before); }
};

TEST_CASE("blas::detail::cut_of: blocks that cover C's larger side, sized by the shape alone") {
  using semoe::blas::detail::cut_of;
  for (index_t m : {1, 100, 255, 256, 700, 1280, 4096, 10000})
    for (index_t n : {1, 64, 300, 1024, 4096})
      for (index_t k : {1, 64, 1024}) {
        CAPTURE(m);
        CAPTURE(n);
        CAPTURE(k);
        const auto c = cut_of(m, n, k);
        const index_t dim = c.by_rows ? m : n;
        CHECK(c.by_rows == (m >= n));
        CHECK(c.count >= 1);
        CHECK(c.count <= 4);
        CHECK((c.count - 1) * c.block < dim);  // no empty piece
        CHECK(c.count * c.block >= dim);       // every row or column in one
        if (c.count > 1) {
          CHECK(c.block >= 256);
          CHECK(static_cast<double>(c.block) * static_cast<double>(c.by_rows ? n : m) * static_cast<double>(k) >=
                double(1 << 27) * 0.5);  // pieces keep work enough to be worth a thread
        }
      }
  CHECK(cut_of(4096, 1024, 1024).count == 4);  // a large GEMM is cut ...
  CHECK(cut_of(256, 1024, 256).count == 1);    // ... a small expert's is not
}

TEST_CASE("with single-threaded OpenBLAS a cpu_executor runs GEMMs in pieces on its threads: the bits of one call") {
  using semoe::blas::gemm_problem;
  const blas_threads one(1);
  semoe::cpu_executor probe({.threads = 2});
  CHECK(semoe::blas::gemms_on_executor(probe));
  for (const op ta : {op::n, op::t})
    for (const op tb : {op::n, op::t})
      for (auto [m, n, k] : {std::tuple<index_t, index_t, index_t>{2000, 520, 300}, {300, 1900, 600}, {40, 30, 20}}) {
        CAPTURE(static_cast<int>(ta));
        CAPTURE(static_cast<int>(tb));
        CAPTURE(m);
        CAPTURE(n);
        CHECK(semoe::blas::detail::cut_of(m, n, k).count == (m == 40 ? 1 : 2));
        const index_t lda = (ta == op::n ? k : m) + 1, ldb = (tb == op::n ? n : k) + 3, ldc = n + 2;
        auto a = random_values<float>(static_cast<std::size_t>((ta == op::n ? m : k) * lda), 4);
        auto b = random_values<float>(static_cast<std::size_t>((tb == op::n ? k : n) * ldb), 5);
        const auto c0 = random_values<float>(static_cast<std::size_t>(m * ldc), 6);
        std::vector<float> want(c0);
        semoe::blas::gemm(ta, tb, m, n, k, 0.75f, a.data(), lda, b.data(), ldb, 1.0f, want.data(), ldc);
        for (int threads : {1, 2, 4}) {
          CAPTURE(threads);
          semoe::cpu_executor ex({.threads = threads});
          std::vector<float> got(c0), grouped(c0);
          semoe::blas::gemm(ex, ta, tb, m, n, k, 0.75f, a.data(), lda, b.data(), ldb, 1.0f, got.data(), ldc);
          CHECK(got == want);  // every element, the padding between rows included
          // Two problems in one grouped call: their pieces share the threads.
          const index_t half = m / 2;
          const gemm_problem<float> probs[2] = {
              {ta, tb, half, n, k, 0.75f, a.data(), lda, b.data(), ldb, 1.0f, grouped.data(), ldc},
              {ta, tb, m - half, n, k, 0.75f, ta == op::n ? a.data() + half * lda : a.data() + half, lda, b.data(),
               ldb, 1.0f, grouped.data() + half * ldc, ldc}};
          semoe::blas::grouped_gemm(ex, std::span<const gemm_problem<float>>(probs));
          std::vector<float> two(c0);
          for (const auto& p : probs)
            semoe::blas::gemm(p.ta, p.tb, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta,
                              two.data() + (p.c - grouped.data()), p.ldc);
          CHECK(grouped == two);
        }
      }
  const blas_threads two(2);
  CHECK_FALSE(semoe::blas::gemms_on_executor(probe));  // OpenBLAS threads its own calls
}

TEST_CASE("round_to_bf16: nearest bfloat16, ties to even, NaN kept, overflow to infinity") {
  using semoe::blas::round_to_bf16;
  auto bits = [](float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
  };
  auto from = [](std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  };
  CHECK(round_to_bf16(1.0f) == 1.0f);
  CHECK(round_to_bf16(from(0x3F808000u)) == 1.0f);                 // 1 + 2^-8: the tie goes to the even 1
  CHECK(bits(round_to_bf16(from(0x3F818000u))) == 0x3F820000u);    // 1 + 3 * 2^-8: to the even 1 + 2^-6
  CHECK(bits(round_to_bf16(from(0x3F808001u))) == 0x3F810000u);    // past the tie: up
  CHECK(bits(round_to_bf16(from(0xBF808001u))) == 0xBF810000u);    // the same below zero
  CHECK(std::isnan(round_to_bf16(std::nanf(""))));
  CHECK(std::isinf(round_to_bf16(3.4e38f)));
  CHECK(round_to_bf16(-0.0f) == 0.0f);
  // Every result has 8 significant bits: the low 16 bits are zero.
  for (float x : random_values<float>(1000, 3)) CHECK((bits(round_to_bf16(x)) & 0xffffu) == 0);
}

TEST_CASE("grouped GEMM with bf16 inputs multiplies the bf16 roundings of A and B, summed in fp32") {
  using semoe::blas::gemm_problem;
  using semoe::blas::precision;
  const index_t m = 37, n = 29, k = 53;
  for (const op ta : {op::n, op::t})
    for (const op tb : {op::n, op::t}) {
      CAPTURE(static_cast<int>(ta));
      CAPTURE(static_cast<int>(tb));
      const index_t lda = (ta == op::n ? k : m) + 3, ldb = (tb == op::n ? n : k) + 2;  // padded rows
      auto a = random_values<float>(static_cast<std::size_t>((ta == op::n ? m : k) * lda), 1);
      auto b = random_values<float>(static_cast<std::size_t>((tb == op::n ? k : n) * ldb), 2);
      auto c0 = random_values<float>(static_cast<std::size_t>(m * n), 3);
      std::vector<float> ra(a), rb(b), want(c0), got(c0), native(c0);
      for (auto& v : ra) v = semoe::blas::round_to_bf16(v);
      for (auto& v : rb) v = semoe::blas::round_to_bf16(v);
      semoe::blas::gemm(ta, tb, m, n, k, 0.5f, ra.data(), lda, rb.data(), ldb, 1.0f, want.data(), n);
      gemm_problem<float> p{ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 1.0f, got.data(), n};
      p.inputs = precision::bf16;
      semoe::cpu_executor ex({.threads = 2});
      semoe::blas::grouped_gemm(ex, std::span<const gemm_problem<float>>(&p, 1));
      CHECK(got == want);  // the same products of the same bf16 values, in the same order
      p.inputs = precision::native;
      p.c = native.data();
      semoe::blas::grouped_gemm(ex, std::span<const gemm_problem<float>>(&p, 1));
      CHECK(got != native);  // and not the fp32 product: rounding happened
    }
}

TEST_CASE("blas::kernel_warning: speaks only when OpenBLAS fell back to kernels older than the CPU") {
  const std::string k = semoe::blas::kernel_name();
  REQUIRE_FALSE(k.empty());
  const std::string w = semoe::blas::kernel_warning();
  MESSAGE("OpenBLAS kernels: ", k, w.empty() ? "" : "; " + w);
  if (k == "Prescott" && __builtin_cpu_supports("avx2")) {  // OpenBLAS did not know this CPU
    CHECK(w.find("OPENBLAS_CORETYPE=") != std::string::npos);
    CHECK(w.find(k) != std::string::npos);
  } else if (k == "SkylakeX" || k == "Haswell" || k.starts_with("Zen") || k.starts_with("Cooperlake") ||
             k.starts_with("SapphireRapids")) {  // kernels of this decade: nothing to say
    CHECK(w.empty());
  }
}
