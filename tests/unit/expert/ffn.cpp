// The FFN expert on its own: activations and their derivatives, the grouped
// forward against a loop reference (including an expert with no rows), and
// finite differences of the grouped backward for every activation, and eval
// mode's forward against training's.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <numbers>
#include <random>
#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/expert/ffn.hpp"

using namespace semoe;

namespace {

template <class T>
void fill(std::span<T> v, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> d(-1, 1);
  for (auto& x : v) x = static_cast<T>(d(g));
}

// A grouped problem over `rows` per expert, with parameters and buffers.
template <class T, class Act>
struct problem {
  expert::ffn<Act> f;
  std::vector<index_t> offsets;
  std::vector<buffer<T>> params, grads;
  std::vector<T*> pp, gp;
  matrix<T> x, saved, work, y;

  problem(index_t H, index_t F, bool bias, std::vector<index_t> rows) : f({.hidden = H, .ffn = F, .bias = bias}) {
    offsets.push_back(0);
    for (auto r : rows) offsets.push_back(offsets.back() + r);
    const index_t R = offsets.back();
    for (std::size_t e = 0; e < rows.size(); ++e) {
      params.emplace_back(f.block_elems());
      grads.emplace_back(f.block_elems(), T(0));
      f.init(params.back().span(), philox(9), static_cast<index_t>(e));
      fill(params.back().span(), 100 + e);  // random weights and non-zero biases
    }
    for (auto& b : params) pp.push_back(b.data());
    for (auto& b : grads) gp.push_back(b.data());
    x.resize(R, H);
    saved.resize(R, f.saved_cols());
    work.resize(R, f.work_cols());
    y.resize(R, H);
    fill(x.span(), 7);
  }
  expert::expert_batch<T> batch() {
    return {offsets, std::span<T* const>(pp), std::span<T* const>(gp), x.view(), saved.view(), work.view()};
  }
};

}  // namespace

TEST_CASE_TEMPLATE("activation derivatives match finite differences", Act, act::relu, act::gelu, act::silu) {
  for (double x = -6.1; x < 6; x += 0.37) {
    const double h = 1e-6, fd = (Act::template f<double>(x + h) - Act::template f<double>(x - h)) / (2 * h);
    CHECK(Act::template df<double>(x) == doctest::Approx(fd).epsilon(1e-7));
    CHECK(Act::template f<float>(static_cast<float>(x)) ==
          doctest::Approx(Act::template f<double>(x)).epsilon(1e-5));
  }
}

TEST_CASE("activations equal their textbook definitions") {
  for (double x = -12.05; x < 12; x += 0.1) {
    CAPTURE(x);
    const double u = std::sqrt(2 / std::numbers::pi) * (x + 0.044715 * x * x * x);
    const double gelu = 0.5 * x * (1 + std::tanh(u)), silu = x / (1 + std::exp(-x));
    // (0.5 x (1 + tanh u) cancels to 0 in the far negative tail, where x sigmoid(2u)
    // keeps its tiny value: compare with an absolute floor.)
    CHECK(std::abs(act::gelu::f<double>(x) - gelu) <= 1e-13 * std::max(1.0, std::abs(gelu)));
    CHECK(std::abs(act::silu::f<double>(x) - silu) <= 1e-13 * std::max(1.0, std::abs(silu)));
    CHECK(std::abs(act::gelu::f<float>(static_cast<float>(x)) - gelu) <= 1e-6 * std::max(1.0, std::abs(gelu)));
    CHECK(std::abs(act::silu::f<float>(static_cast<float>(x)) - silu) <= 1e-6 * std::max(1.0, std::abs(silu)));
    // f_df gives the bits of f and df apart.
    float v, d;
    act::gelu::f_df(static_cast<float>(x), v, d);
    CHECK(v == act::gelu::f<float>(static_cast<float>(x)));
    CHECK(d == act::gelu::df<float>(static_cast<float>(x)));
  }
}

TEST_CASE("the vectorizable float exp stays within 1e-6 relative of std::exp") {
  double worst = 0;
  for (float x = -87.0f; x < 88.0f; x += 0.01f) {
    const double r = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(act::detail::exp_f32(x) - r) / r);
  }
  CHECK(worst < 1e-6);
}

TEST_CASE_TEMPLATE("grouped ffn forward equals a per-row reference", Act, act::relu, act::gelu, act::swiglu) {
  const index_t H = 5, F = 6;
  problem<double, Act> p(H, F, true, {3, 0, 4});
  cpu_executor ex({.threads = 2});
  p.f.forward(ex, p.batch(), p.y.view());
  const index_t F1 = Act::gated ? 2 * F : F;
  for (std::size_t e = 0; e < 3; ++e) {
    const double* W1 = p.params[e].data();
    const double* W2 = W1 + H * F1;
    const double* b1 = W2 + F * H;
    const double* b2 = b1 + F1;
    for (index_t r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
      std::vector<double> pre(F1);
      for (index_t j = 0; j < F1; ++j) {
        pre[j] = b1[j];
        for (index_t h = 0; h < H; ++h) pre[j] += p.x(r, h) * W1[h * F1 + j];
      }
      for (index_t o = 0; o < H; ++o) {
        double acc = b2[o];
        for (index_t j = 0; j < F; ++j) {
          const double a = Act::gated ? Act::template f<double>(pre[j]) * pre[F + j] : Act::template f<double>(pre[j]);
          acc += a * W2[j * H + o];
        }
        CHECK(p.y(r, o) == doctest::Approx(acc).epsilon(1e-12));
      }
    }
  }
}

TEST_CASE_TEMPLATE("eval-mode forward (backward_follows false) gives the training forward's bits", Act, act::relu,
                   act::gelu, act::swiglu) {
  // Training forward keeps act'(pre) (gated: [u f'(g) | f(g)]) for
  // backward; eval mode evaluates the activation alone. Both must give the
  // same outputs.
  problem<float, Act> p(8, 12, true, {5, 0, 7});
  cpu_executor ex({.threads = 2});
  matrix<float> y_eval(p.y.rows(), p.y.cols());
  p.f.forward(ex, p.batch(), p.y.view());
  auto b = p.batch();
  b.backward_follows = false;
  p.f.forward(ex, b, y_eval.view());
  CHECK(std::memcmp(p.y.data(), y_eval.data(), p.y.span().size_bytes()) == 0);
  double norm = 0;
  for (float v : y_eval.span()) norm += std::abs(v);
  CHECK(norm > 0);
}

TEST_CASE_TEMPLATE("grouped ffn backward matches finite differences", Act, act::relu, act::gelu, act::swiglu) {
  const index_t H = 4, F = 5;
  problem<double, Act> p(H, F, true, {2, 3, 0, 2});
  cpu_executor ex({.threads = 2});
  const index_t R = p.offsets.back();
  matrix<double> r(R, H), dx(R, H);
  fill(r.span(), 3);
  auto loss = [&] {
    p.f.forward(ex, p.batch(), p.y.view());
    double l = 0;
    for (index_t i = 0; i < R * H; ++i) l += r.data()[i] * p.y.data()[i];
    return l;
  };
  loss();
  matrix<double> dy = r;  // backward may overwrite dy with dx; keep r intact
  p.f.backward(ex, p.batch(), dy.view(), dx.view());
  auto fd = [&](double& v) {
    const double v0 = v, h = 1e-6;
    v = v0 + h;
    const double up = loss();
    v = v0 - h;
    const double dn = loss();
    v = v0;
    return (up - dn) / (2 * h);
  };
  for (index_t i = 0; i < R * H; ++i) CHECK(dx.data()[i] == doctest::Approx(fd(p.x.data()[i])).epsilon(1e-6));
  for (std::size_t e = 0; e < p.params.size(); ++e)
    for (index_t i = 0; i < p.f.block_elems(); ++i)
      CHECK(p.grads[e][i] == doctest::Approx(fd(p.params[e][i])).epsilon(1e-6));
}

TEST_CASE("backward lets dx share dy's memory") {
  const index_t H = 6, F = 7;
  problem<float, act::gelu> a(H, F, false, {5, 4}), b(H, F, false, {5, 4});
  cpu_executor ex({.threads = 1});
  a.f.forward(ex, a.batch(), a.y.view());
  b.f.forward(ex, b.batch(), b.y.view());
  matrix<float> dy(9, H), dx(9, H), shared(9, H);
  fill(dy.span(), 4);
  std::copy(dy.span().begin(), dy.span().end(), shared.span().begin());
  a.f.backward(ex, a.batch(), dy.view(), dx.view());
  b.f.backward(ex, b.batch(), shared.view(), shared.view());
  for (index_t i = 0; i < 9 * H; ++i) CHECK(shared.data()[i] == dx.data()[i]);
}

TEST_CASE_TEMPLATE("saved and work rows wider than needed, each with its own stride, give the same bits", Act,
                   act::relu, act::gelu, act::swiglu) {
  // The Expert contract lets saved and work have more columns than
  // saved_cols()/work_cols(); each buffer is read with its own leading
  // dimension. Both schedules: grouped passes (OpenBLAS threads its GEMMs),
  // and row tiles where the executor runs the GEMMs (OpenBLAS on 1 thread).
  const index_t H = 6, F = 7;
  const int blas_threads = blas::num_threads();
  for (int one_blas_thread : {0, 1}) {
    CAPTURE(one_blas_thread);
    if (one_blas_thread) blas::set_num_threads(1);
    problem<float, Act> tight(H, F, true, {5, 0, 7}), wide(H, F, true, {5, 0, 7});
    const index_t R = tight.offsets.back();
    wide.saved.resize(R, wide.f.saved_cols() + 3);
    wide.work.resize(R, wide.f.work_cols() + 1);
    cpu_executor ex({.threads = 1});
    matrix<float> dy(R, H), dx_tight(R, H), dx_wide(R, H);
    fill(dy.span(), 5);
    tight.f.forward(ex, tight.batch(), tight.y.view());
    wide.f.forward(ex, wide.batch(), wide.y.view());
    tight.f.backward(ex, tight.batch(), dy.view(), dx_tight.view());
    wide.f.backward(ex, wide.batch(), dy.view(), dx_wide.view());
    CHECK(std::memcmp(tight.y.data(), wide.y.data(), tight.y.span().size_bytes()) == 0);
    CHECK(std::memcmp(dx_tight.data(), dx_wide.data(), dx_tight.span().size_bytes()) == 0);
    for (std::size_t e = 0; e < tight.grads.size(); ++e)
      CHECK(std::memcmp(tight.grads[e].data(), wide.grads[e].data(), tight.grads[e].bytes()) == 0);
    blas::set_num_threads(blas_threads);
  }
}

TEST_CASE("ffn validates its options and buffers") {
  CHECK_THROWS_WITH_AS(expert::ffn<act::gelu>({.hidden = 0, .ffn = 4}), doctest::Contains("options.hidden"),
                       semoe::error);
  problem<float, act::relu> p(4, 4, false, {2});
  cpu_executor ex({.threads = 1});
  matrix<float> y(2, 3);
  CHECK_THROWS_WITH_AS(p.f.forward(ex, p.batch(), y.view()), doctest::Contains("hidden = 4"), semoe::error);
}

TEST_CASE("the per-column bias-gradient body (a device executor's path) equals the host's chunked sums") {
  const index_t rows = 37, cols = 150, ld = 160;
  std::vector<float> d(rows * ld), db1(cols, 0.5f), db2 = db1;
  std::mt19937 g(3);
  std::uniform_real_distribution<float> u(-1, 1);
  for (auto& v : d) v = u(g);
  cpu_executor ex({.threads = 2});
  expert::detail::add_column_sums(ex, d.data(), rows, ld, cols, db1.data());
  ex.parallel_for(cols, expert::detail::column_sum_kernel<float>{d.data(), rows, ld, db2.data()});
  CHECK(db1 == db2);  // both add the rows in order
  float expect = 0.5f;
  float acc = 0;
  for (index_t r = 0; r < rows; ++r) acc += d[r * ld + 149];
  CHECK(db2[149] == expect + acc);
}

TEST_CASE_TEMPLATE("an ffn with bf16 GEMM inputs stays within bf16's rounding of the fp32 expert", Act, act::gelu,
                   act::swiglu) {
  // u = 2^-8, bf16's unit roundoff: each product of two rounded operands is
  // off by at most 2u relative, so a GEMM by at most 2u of sum |a||b|, and
  // the two chained GEMMs of the forward and the backward's by a few u of
  // each tensor's scale. The test allows 8u = 2^-5, and asks for more than
  // fp32 roundoff, so that rounding is known to have happened.
  const index_t H = 24, F = 40;
  problem<float, Act> ref(H, F, true, {9, 0, 13}), bf(H, F, true, {9, 0, 13});
  bf.f = expert::ffn<Act>({.hidden = H, .ffn = F, .bias = true, .gemm_inputs = blas::precision::bf16});
  cpu_executor ex({.threads = 2});
  ref.f.forward(ex, ref.batch(), ref.y.view());
  bf.f.forward(ex, bf.batch(), bf.y.view());
  auto scaled = [](std::span<const float> got, std::span<const float> want) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      num = std::max(num, std::abs(double(got[i]) - double(want[i])));
      den = std::max(den, std::abs(double(want[i])));
    }
    return num / den;
  };
  const double u = std::ldexp(1.0, -8);
  const double fwd = scaled(bf.y.span(), ref.y.span());
  CHECK(fwd < 8 * u);
  CHECK(fwd > 1e-6);
  matrix<float> dy(ref.y.rows(), H), dxr(ref.y.rows(), H), dxb(ref.y.rows(), H);
  fill(dy.span(), 11);
  ref.f.backward(ex, ref.batch(), dy.view(), dxr.view());
  bf.f.backward(ex, bf.batch(), dy.view(), dxb.view());
  CHECK(scaled(dxb.span(), dxr.span()) < 8 * u);
  for (std::size_t e = 0; e < 3; ++e) {
    CAPTURE(e);
    if (e == 1) continue;  // no rows: no gradient
    CHECK(scaled(bf.grads[e].span(), ref.grads[e].span()) < 8 * u);
  }
  MESSAGE("bf16 GEMM inputs, scaled error against fp32: forward " << fwd << ", dx "
                                                                  << scaled(dxb.span(), dxr.span()) << " (u = " << u
                                                                  << ")");
}
