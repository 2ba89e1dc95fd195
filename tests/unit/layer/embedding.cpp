#include "semoe/layer/embedding.hpp"

#include <doctest/doctest.h>

#include <vector>

#include "gradcheck.hpp"

using semoe::index_t;
using semoe::matrix;
using semoe::layer::embedding;

TEST_CASE_TEMPLATE("embedding: lookup and scatter-add with repeated ids match a reference", T, float, double) {
  semoe::cpu_executor ex({.threads = 2});
  const index_t vocab = 50, dim = 200, n = 300;  // dim > 64: columns split across threads
  embedding<T> e(ex, {.vocab = vocab, .dim = dim}, 5);
  std::vector<std::int32_t> ids(n);
  for (index_t i = 0; i < n; ++i) ids[i] = static_cast<std::int32_t>((i * 7) % 13);  // many repeats
  matrix<T> y(n, dim), dy(n, dim);
  semoe::test::fill_uniform(dy.span(), 3);
  e.forward(ids, y.view());
  auto table = e.weight();
  index_t mismatches = 0;
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < dim; ++j) mismatches += y(i, j) != table(ids[i], j);
  CHECK(mismatches == 0);

  e.backward(dy.view());
  e.backward(dy.view());  // accumulates
  std::vector<double> ref(static_cast<std::size_t>(vocab * dim), 0.0);
  for (int rep = 0; rep < 2; ++rep)
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < dim; ++j) ref[ids[i] * dim + j] += dy(i, j);
  auto g = e.weight_grad();
  double err = 0;
  for (index_t v = 0; v < vocab; ++v)
    for (index_t j = 0; j < dim; ++j) err = std::max(err, semoe::test::rel_err(g(v, j), ref[v * dim + j]));
  CHECK(err < (std::is_same_v<T, float> ? 1e-5 : 1e-13));
  e.zero_grad();
  CHECK(e.weight_grad()(12, 3) == 0);
}

TEST_CASE("embedding: gradient of <r, table[ids]> matches finite differences (double)") {
  semoe::cpu_executor ex({.threads = 1});
  embedding<double> e(ex, {.vocab = 6, .dim = 3}, 9);
  const std::vector<std::int32_t> ids{4, 1, 4, 0, 4};
  matrix<double> y(5, 3), r(5, 3);
  semoe::test::fill_uniform(r.span(), 8);
  const auto loss = [&] {
    e.forward(ids, y.view());
    double s = 0;
    for (index_t k = 0; k < 15; ++k) s += r.span()[k] * y.span()[k];
    return s;
  };
  loss();
  e.backward(r.view());
  auto p = e.parameters();
  REQUIRE(p.size() == 1);
  CHECK(p[0].name == "weight");
  std::vector<double> fd(p[0].value.size());
  for (std::size_t k = 0; k < fd.size(); ++k) fd[k] = semoe::test::central_difference(p[0].value[k], loss);
  CHECK(semoe::test::max_rel_err(p[0].grad, std::span<double>(fd)) < 1e-6);
}

TEST_CASE("embedding: out-of-range ids and bad shapes are errors naming the id and position") {
  semoe::cpu_executor ex({.threads = 1});
  CHECK_THROWS_WITH_AS(embedding<float>(ex, {.vocab = 0, .dim = 4}, 1), doctest::Contains("options.vocab = 0"),
                       semoe::error);
  embedding<float> e(ex, {.vocab = 10, .dim = 4}, 1);
  matrix<float> y(3, 4), y5(3, 5);
  const std::vector<std::int32_t> high{1, 2, 10}, neg{-1, 0, 0}, ok{1, 2, 3};
  CHECK_THROWS_WITH_AS(e.forward(high, y.view()), doctest::Contains("ids[2] = 10 is out of range"), semoe::error);
  CHECK_THROWS_WITH_AS(e.forward(neg, y.view()), doctest::Contains("ids[0] = -1 is out of range"), semoe::error);
  CHECK_THROWS_WITH_AS(e.forward(ok, y5.view()), doctest::Contains("embedding::forward: y"), semoe::error);
  CHECK_THROWS_WITH_AS(e.backward(y.view()), doctest::Contains("called before forward"), semoe::error);
  e.forward(ok, y.view());
  CHECK_THROWS_WITH_AS(e.backward(y5.view()), doctest::Contains("embedding::backward: dy"), semoe::error);
}
