// cuBLAS as the cuda executor's BLAS engine, against CBLAS on the same
// problems: every transpose combination, a group of ragged problems (empty
// ones included), and bf16 / fp16 grouped GEMMs within their mantissa's
// tolerance. GPU only (skipped without a device).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "compare.hpp"
#include "gpu_main.cuh"
#include "semoe/core/buffer.hpp"
#include "semoe/cuda/backend.cuh"

using namespace semoe;
using test::random_vec;
using test::scaled_error;
using blas::op;

namespace {

template <class T>
buffer<T, device_space> upload(cuda_executor& ex, const std::vector<T>& h) {
  buffer<T, device_space> d(static_cast<index_t>(h.size()));
  ex.copy(d.data(), h.data(), d.bytes());
  return d;
}

template <class T>
std::vector<T> download(cuda_executor& ex, const buffer<T, device_space>& d) {
  std::vector<T> h(static_cast<std::size_t>(d.size()));
  ex.copy(h.data(), d.data(), d.bytes());
  return h;
}

}  // namespace

TEST_CASE("gemm: every transpose combination equals CBLAS within fp32 rounding") {
  cuda_executor ex;
  const index_t m = 67, n = 45, k = 129;
  for (op ta : {op::n, op::t})
    for (op tb : {op::n, op::t}) {
      CAPTURE(int(ta));
      CAPTURE(int(tb));
      const index_t lda = ta == op::n ? k : m, ldb = tb == op::n ? n : k;
      auto a = random_vec(m * k, 1), b = random_vec(k * n, 2), c = random_vec(m * n, 3);
      auto da = upload(ex, a), db = upload(ex, b), dc = upload(ex, c);
      blas::gemm(ex, ta, tb, m, n, k, 0.5f, da.data(), lda, db.data(), ldb, 2.0f, dc.data(), n);
      blas::gemm(ta, tb, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 2.0f, c.data(), n);
      CHECK(scaled_error(download(ex, dc), c) < 1e-5);
    }
}

TEST_CASE("grouped_gemm: ragged problems, empty ones among them, equal CBLAS") {
  cuda_executor ex;
  const index_t H = 96, F = 160;
  const std::vector<index_t> rows = {37, 0, 5, 128, 1, 64};
  index_t R = 0;
  for (auto r : rows) R += r;
  auto x = random_vec(R * H, 4), w = random_vec(rows.size() * H * F, 5);
  std::vector<float> y(R * F, 0.0f);
  auto dx = upload(ex, x), dw = upload(ex, w), dy = upload(ex, y);
  std::vector<blas::gemm_problem<float>> host, dev;
  index_t r0 = 0;
  for (std::size_t e = 0; e < rows.size(); ++e) {
    host.push_back({op::n, op::n, rows[e], F, H, 1.0f, x.data() + r0 * H, H, w.data() + e * H * F, F, 0.0f,
                    y.data() + r0 * F, F});
    dev.push_back({op::n, op::n, rows[e], F, H, 1.0f, dx.data() + r0 * H, H, dw.data() + e * H * F, F, 0.0f,
                   dy.data() + r0 * F, F});
    r0 += rows[e];
  }
  blas::grouped_gemm<cuda_executor, float>(ex, dev);
  for (const auto& p : host) blas::gemm(p.ta, p.tb, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta, p.c, p.ldc);
  CHECK(scaled_error(download(ex, dy), y) < 1e-5);
}

template <class H>
void low_precision_grouped(double mantissa_bits) {
  cuda_executor ex;
  const index_t m = 48, n = 80, k = 256;
  const int groups = 3;
  auto a = random_vec(groups * m * k, 6), b = random_vec(groups * k * n, 7);
  // The reference multiplies the values the device sees (inputs rounded to H).
  std::vector<H> ah(a.size()), bh(b.size());
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = float(ah[i] = H(a[i]));
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = float(bh[i] = H(b[i]));
  std::vector<float> ref(groups * m * n, 0.0f);
  std::vector<H> zero(ref.size(), H(0.0f));
  auto da = upload(ex, ah), db = upload(ex, bh), dc = upload(ex, zero);
  std::vector<blas::gemm_problem<H>> probs;
  for (int g = 0; g < groups; ++g) {
    probs.push_back({op::n, op::n, m, n, k, H(1.0f), da.data() + g * m * k, k, db.data() + g * k * n, n, H(0.0f),
                     dc.data() + g * m * n, n});
    blas::gemm(op::n, op::n, m, n, k, 1.0f, a.data() + g * m * k, k, b.data() + g * k * n, n, 0.0f,
               ref.data() + g * m * n, n);
  }
  blas::grouped_gemm<cuda_executor, H>(ex, probs);
  auto got_h = download(ex, dc);
  std::vector<float> got(got_h.size());
  for (std::size_t i = 0; i < got.size(); ++i) got[i] = float(got_h[i]);
  // fp32 accumulation of exact products: the error is the output's rounding
  // to H, half an ulp = 2^-(mantissa bits + 1) of the value, well inside one ulp.
  CHECK(scaled_error(got, ref) < std::ldexp(1.0, -static_cast<int>(mantissa_bits)));
}

TEST_CASE("grouped_gemm in bf16 (8-bit mantissa) and fp16 (11-bit): within one ulp of the result") {
  low_precision_grouped<__nv_bfloat16>(8);
  low_precision_grouped<__half>(11);
}

TEST_CASE("grouped_gemm with bf16 inputs on float memory: the host engine's products, summed in another order") {
  // Both engines multiply the same bf16 roundings exactly (8 x 8 significant
  // bits fit fp32) and sum k products in fp32: they differ by summation order
  // only, at most k * 2^-24 of sum |a||b| per element.
  cuda_executor ex;
  const index_t H = 96, F = 160;
  const std::vector<index_t> rows = {37, 0, 5, 128, 1, 64};
  index_t R = 0;
  for (auto r : rows) R += r;
  auto x = random_vec(R * H, 14), w = random_vec(rows.size() * H * F, 15);
  std::vector<float> y(R * F, 0.0f);
  auto dx = upload(ex, x), dw = upload(ex, w), dy = upload(ex, y);
  std::vector<blas::gemm_problem<float>> host, dev;
  index_t r0 = 0;
  for (std::size_t e = 0; e < rows.size(); ++e) {
    host.push_back({op::n, op::t, rows[e], F, H, 1.0f, x.data() + r0 * H, H, w.data() + e * H * F, H, 0.0f,
                    y.data() + r0 * F, F});
    dev.push_back({op::n, op::t, rows[e], F, H, 1.0f, dx.data() + r0 * H, H, dw.data() + e * H * F, H, 0.0f,
                   dy.data() + r0 * F, F});
    host.back().inputs = dev.back().inputs = blas::precision::bf16;
    r0 += rows[e];
  }
  blas::grouped_gemm<cuda_executor, float>(ex, dev);
  sequential_executor seq;
  blas::grouped_gemm<sequential_executor, float>(seq, host);
  const auto got = download(ex, dy);
  double worst = 0;
  r0 = 0;
  for (std::size_t e = 0; e < rows.size(); ++e) {
    for (index_t r = r0; r < r0 + rows[e]; ++r)
      for (index_t j = 0; j < F; ++j) {
        double mag = 0;
        for (index_t h = 0; h < H; ++h)
          mag += std::abs(double(blas::round_to_bf16(x[r * H + h])) * blas::round_to_bf16(w[e * H * F + j * H + h]));
        worst = std::max(worst, std::abs(double(got[r * F + j]) - y[r * F + j]) / (H * std::ldexp(mag, -24) + 1e-30));
      }
    r0 += rows[e];
  }
  CHECK(worst <= 1.0);
}
