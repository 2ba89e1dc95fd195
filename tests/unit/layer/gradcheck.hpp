// Shared by the layer tests: random fills and the finite-difference check of
// a Module's backward against its forward.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/core/tensor.hpp"

namespace semoe::test {

template <class T>
void fill_uniform(std::span<T> v, std::uint64_t seed, double lo = -1, double hi = 1) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  for (auto& x : v) x = static_cast<T>(dist(gen));
}

/// |a - b| relative to max(1, |a|, |b|).
inline double rel_err(double a, double b) { return std::abs(a - b) / std::max({1.0, std::abs(a), std::abs(b)}); }

/// Largest rel_err between two spans.
template <class A, class B>
double max_rel_err(std::span<A> a, std::span<B> b) {
  REQUIRE(a.size() == b.size());
  double e = 0;
  for (std::size_t k = 0; k < a.size(); ++k) e = std::max(e, rel_err(double(a[k]), double(b[k])));
  return e;
}

/// Central difference (h = 1e-6) of f() with respect to v.
template <class F>
double central_difference(double& v, F&& f, double h = 1e-6) {
  const double v0 = v;
  v = v0 + h;
  const double up = f();
  v = v0 - h;
  const double down = f();
  v = v0;
  return (up - down) / (2 * h);
}

/// For a double Module m on a random x [n, in]: L = <r, m(x)> for a random r,
/// and backward(r) must match central differences of L with respect to every
/// input element and every parameter. Also checks that backward overwrites
/// dx, accumulates parameter gradients, and skips dx when it has 0 rows.
template <class M>
void check_gradients(M& m, index_t n, index_t in, std::uint64_t seed, double tol = 1e-6) {
  const index_t out = m.output_cols(in);
  matrix<double> x(n, in), y(n, out), r(n, out), dx(n, in);
  fill_uniform(x.span(), seed);
  fill_uniform(r.span(), seed + 1);
  const auto loss = [&] {
    m.forward(x.view(), y.view());
    double s = 0;
    for (index_t k = 0; k < n * out; ++k) s += r.span()[k] * y.span()[k];
    return s;
  };

  loss();
  m.zero_grad();
  dx.fill(std::numeric_limits<double>::quiet_NaN());  // backward must overwrite it
  m.backward(r.view(), dx.view());
  std::vector<std::vector<double>> grads;
  auto params = m.parameters();
  for (auto& p : params) grads.emplace_back(p.grad.begin(), p.grad.end());

  std::vector<double> fd(static_cast<std::size_t>(n * in));
  for (index_t k = 0; k < n * in; ++k) fd[k] = central_difference(x.span()[k], loss);
  INFO("gradient w.r.t. the input");
  CHECK(max_rel_err(dx.span(), std::span<double>(fd)) < tol);

  for (std::size_t q = 0; q < params.size(); ++q) {
    auto& p = params[q];
    std::vector<double> fdp(p.value.size());
    for (std::size_t k = 0; k < p.value.size(); ++k) fdp[k] = central_difference(p.value[k], loss);
    INFO("gradient w.r.t. parameter ", p.name);
    CHECK(max_rel_err(std::span<double>(grads[q]), std::span<double>(fdp)) < tol);
  }

  // A second backward without zero_grad and without dx doubles the gradients.
  loss();
  m.backward(r.view(), matrix_view<double>{});
  for (std::size_t q = 0; q < params.size(); ++q) {
    std::vector<double> twice(grads[q]);
    for (auto& g : twice) g *= 2;
    INFO("accumulation into parameter ", params[q].name);
    CHECK(max_rel_err(params[q].grad, std::span<double>(twice)) < 1e-12);
  }

  // An empty batch runs and leaves the gradients alone.
  matrix<double> x0(0, in), y0(0, out), dx0(0, in);
  m.forward(x0.view(), y0.view());
  m.backward(y0.view(), dx0.view());
  for (std::size_t q = 0; q < params.size(); ++q) {
    std::vector<double> twice(grads[q]);
    for (auto& g : twice) g *= 2;
    CHECK(max_rel_err(params[q].grad, std::span<double>(twice)) < 1e-12);
  }
}

}  // namespace semoe::test
