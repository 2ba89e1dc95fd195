#include "semoe/layer/linear.hpp"

#include <doctest/doctest.h>

#include <cmath>

#include "gradcheck.hpp"
#include "semoe/layer/concepts.hpp"

using semoe::index_t;
using semoe::matrix;
using semoe::layer::linear;

static_assert(semoe::layer::Module<linear<float>>);
static_assert(semoe::layer::Module<linear<double>>);

TEST_CASE("linear: gradients match finite differences (double)") {
  semoe::cpu_executor ex({.threads = 2});
  SUBCASE("with bias") {
    linear<double> l(ex, {.in = 5, .out = 4, .bias = true}, 7);
    semoe::test::check_gradients(l, 3, 5, 11);
  }
  SUBCASE("without bias") {
    linear<double> l(ex, {.in = 3, .out = 6, .bias = false}, 7);
    CHECK(l.parameters().size() == 1);
    semoe::test::check_gradients(l, 4, 3, 12);
  }
}

TEST_CASE_TEMPLATE("linear: forward and backward match a loop reference", T, float, double) {
  // Big enough that the bias and db loops are split across threads.
  semoe::cpu_executor ex({.threads = 2});
  const index_t n = 300, in = 37, out = 70;
  linear<T> l(ex, {.in = in, .out = out}, 3);
  matrix<T> x(n, in), y(n, out), dy(n, out), dx(n, in);
  semoe::test::fill_uniform(x.span(), 1);
  semoe::test::fill_uniform(dy.span(), 2);
  l.forward(x.view(), y.view());
  l.zero_grad();
  l.backward(dy.view(), dx.view());

  auto w = l.weight();
  auto b = l.bias();
  auto gw = l.weight_grad();
  auto gb = l.bias_grad();
  const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-12;
  double ey = 0, edx = 0, ew = 0, eb = 0;
  for (index_t i = 0; i < n; ++i)
    for (index_t o = 0; o < out; ++o) {
      double s = b[o];
      for (index_t k = 0; k < in; ++k) s += double(x(i, k)) * w(o, k);
      ey = std::max(ey, semoe::test::rel_err(y(i, o), s));
    }
  for (index_t i = 0; i < n; ++i)
    for (index_t k = 0; k < in; ++k) {
      double s = 0;
      for (index_t o = 0; o < out; ++o) s += double(dy(i, o)) * w(o, k);
      edx = std::max(edx, semoe::test::rel_err(dx(i, k), s));
    }
  for (index_t o = 0; o < out; ++o) {
    double sb = 0;
    for (index_t i = 0; i < n; ++i) sb += dy(i, o);
    eb = std::max(eb, semoe::test::rel_err(gb[o], sb));
    for (index_t k = 0; k < in; ++k) {
      double s = 0;
      for (index_t i = 0; i < n; ++i) s += double(dy(i, o)) * x(i, k);
      ew = std::max(ew, semoe::test::rel_err(gw(o, k), s));
    }
  }
  CHECK(ey < tol);
  CHECK(edx < tol);
  CHECK(ew < tol);
  CHECK(eb < tol);
}

TEST_CASE("linear: init is deterministic, uniform in +-1/sqrt(in)") {
  semoe::cpu_executor ex1({.threads = 1}), ex2({.threads = 2});
  linear<float> a(ex1, {.in = 64, .out = 40}, 99), b(ex2, {.in = 64, .out = 40}, 99), c(ex1, {.in = 64, .out = 40}, 100);
  const auto pa = a.parameters(), pb = b.parameters(), pc = c.parameters();
  REQUIRE(pa.size() == 2);
  CHECK(pa[0].name == "weight");
  CHECK(pa[1].name == "bias");
  CHECK(std::equal(pa[0].value.begin(), pa[0].value.end(), pb[0].value.begin()));
  CHECK(std::equal(pa[1].value.begin(), pa[1].value.end(), pb[1].value.begin()));
  CHECK_FALSE(std::equal(pa[0].value.begin(), pa[0].value.end(), pc[0].value.begin()));
  float lo = 1, hi = -1;
  for (float v : pa[0].value) lo = std::min(lo, v), hi = std::max(hi, v);
  CHECK(lo >= -0.125f);
  CHECK(hi <= 0.125f);
  CHECK(lo < -0.1f);  // the range is used, not a constant
  CHECK(hi > 0.1f);
}

TEST_CASE("linear: bad options and shapes are errors that name the argument") {
  semoe::cpu_executor ex({.threads = 1});
  CHECK_THROWS_WITH_AS(linear<float>(ex, {.in = 0, .out = 3}, 1), doctest::Contains("options.in = 0"), semoe::error);
  CHECK_THROWS_WITH_AS(linear<float>(ex, {.in = 3, .out = -1}, 1), doctest::Contains("options.out = -1"),
                       semoe::error);
  linear<float> l(ex, {.in = 4, .out = 3}, 1);
  CHECK(l.output_cols(4) == 3);
  CHECK_THROWS_WITH_AS(l.output_cols(5), doctest::Contains("expected options.in = 4"), semoe::error);
  matrix<float> x(2, 5), y(2, 3), x4(2, 4), y4(2, 4), dx(3, 4);
  CHECK_THROWS_WITH_AS(l.forward(x.view(), y.view()), doctest::Contains("linear::forward: x: expected shape [2, 4], got [2, 5]"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(l.forward(x4.view(), y4.view()), doctest::Contains("linear::forward: y"), semoe::error);
  CHECK_THROWS_WITH_AS(l.backward(y.view(), dx.view()), doctest::Contains("called before forward"), semoe::error);
  l.forward(x4.view(), y.view());
  CHECK_THROWS_WITH_AS(l.backward(y4.view(), x4.view()), doctest::Contains("linear::backward: dy"), semoe::error);
  CHECK_THROWS_WITH_AS(l.backward(y.view(), dx.view()), doctest::Contains("linear::backward: dx"), semoe::error);
}
