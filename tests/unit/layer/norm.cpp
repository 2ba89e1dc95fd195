#include "semoe/layer/norm.hpp"

#include <doctest/doctest.h>

#include <cmath>

#include "gradcheck.hpp"

using semoe::index_t;
using semoe::matrix;
using semoe::layer::layer_norm;

static_assert(semoe::layer::Module<layer_norm<float>>);

TEST_CASE("layer_norm: gradients match finite differences (double)") {
  semoe::cpu_executor ex({.threads = 2});
  SUBCASE("affine, with gamma and beta away from 1 and 0") {
    layer_norm<double> ln(ex, {.dim = 6});
    semoe::test::fill_uniform(ln.gamma(), 5, 0.5, 1.5);
    semoe::test::fill_uniform(ln.beta(), 6);
    semoe::test::check_gradients(ln, 4, 6, 21);
  }
  SUBCASE("plain") {
    layer_norm<double> ln(ex, {.dim = 5, .eps = 1e-3, .affine = false});
    CHECK(ln.parameters().empty());
    semoe::test::check_gradients(ln, 3, 5, 22);
  }
}

TEST_CASE_TEMPLATE("layer_norm: forward matches a loop reference", T, float, double) {
  semoe::cpu_executor ex({.threads = 2});
  const index_t n = 500, d = 48;
  layer_norm<T> ln(ex, {.dim = d, .eps = 1e-5});
  semoe::test::fill_uniform(ln.gamma(), 1, 0.5, 1.5);
  semoe::test::fill_uniform(ln.beta(), 2);
  matrix<T> x(n, d), y(n, d);
  semoe::test::fill_uniform(x.span(), 3, 5, 7);  // a large mean: the variance must not cancel
  ln.forward(x.view(), y.view());
  double err = 0;
  for (index_t i = 0; i < n; ++i) {
    double m = 0, v = 0;
    for (index_t j = 0; j < d; ++j) m += x(i, j);
    m /= d;
    for (index_t j = 0; j < d; ++j) v += (x(i, j) - m) * (x(i, j) - m);
    v /= d;
    for (index_t j = 0; j < d; ++j) {
      const double ref = (x(i, j) - m) / std::sqrt(v + 1e-5) * ln.gamma()[j] + ln.beta()[j];
      err = std::max(err, semoe::test::rel_err(y(i, j), ref));
    }
  }
  CHECK(err < (std::is_same_v<T, float> ? 1e-4 : 1e-12));
}

TEST_CASE("layer_norm: bad options and shapes") {
  semoe::cpu_executor ex({.threads = 1});
  CHECK_THROWS_WITH_AS(layer_norm<float>(ex, {.dim = 0}), doctest::Contains("options.dim = 0"), semoe::error);
  CHECK_THROWS_WITH_AS(layer_norm<float>(ex, {.dim = 4, .eps = -1}), doctest::Contains("options.eps = -1"),
                       semoe::error);
  layer_norm<float> ln(ex, {.dim = 4});
  CHECK_THROWS_WITH_AS(ln.output_cols(3), doctest::Contains("expected options.dim = 4"), semoe::error);
  matrix<float> x(2, 3), y(2, 4), x4(2, 4);
  CHECK_THROWS_WITH_AS(ln.forward(x.view(), y.view()), doctest::Contains("layer_norm::forward: x"), semoe::error);
  ln.forward(x4.view(), y.view());
  CHECK_THROWS_WITH_AS(ln.backward(x.view(), y.view()), doctest::Contains("layer_norm::backward: dy"), semoe::error);
}
