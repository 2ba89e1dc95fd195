#include "semoe/core/tensor.hpp"

#include <doctest/doctest.h>

#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

using semoe::index_t;
using semoe::matrix_view;
using semoe::tensor_view;

TEST_CASE("tensor_view: default layout is row-major and contiguous") {
  std::vector<int> v(2 * 3 * 4);
  std::iota(v.begin(), v.end(), 0);
  tensor_view<int, 3> t(v.data(), {2, 3, 4});
  CHECK(t.extent(0) == 2);
  CHECK(t.extent(1) == 3);
  CHECK(t.extent(2) == 4);
  CHECK(t.strides() == std::array<index_t, 3>{12, 4, 1});
  CHECK(t.size() == 24);
  CHECK_FALSE(t.empty());
  CHECK(t.contiguous());
  CHECK(t(1, 2, 3) == 1 * 12 + 2 * 4 + 3);
  CHECK(&t(0, 1, 0) == v.data() + 4);
  CHECK(t.span().data() == v.data());
  CHECK(t.span().size() == 24);
}

TEST_CASE("tensor_view: explicit strides, empty views and the contiguity test") {
  std::vector<float> v(6 * 5);
  std::iota(v.begin(), v.end(), 0.0f);

  SUBCASE("a transposed view is strided") {
    matrix_view<float> t(v.data(), {5, 6}, {1, 6});
    CHECK_FALSE(t.contiguous());
    CHECK(t(2, 3) == v[3 * 6 + 2]);
    CHECK_THROWS_AS((void)t.span(), semoe::error);
  }
  SUBCASE("padding between rows is strided") {
    matrix_view<float> p(v.data(), {6, 4}, {5, 1});
    CHECK(p.ld() == 5);
    CHECK_FALSE(p.contiguous());
    CHECK(p(1, 0) == 5.0f);
  }
  SUBCASE("extents of 1 ignore their stride") {
    matrix_view<float> r(v.data(), {1, 6}, {1000, 1});
    CHECK(r.contiguous());
    matrix_view<float> c(v.data(), {6, 1}, {1, 77});
    CHECK(c.contiguous());
  }
  SUBCASE("empty") {
    matrix_view<float> e(v.data(), {0, 6});
    CHECK(e.empty());
    CHECK(e.size() == 0);
    CHECK(matrix_view<float>{}.data() == nullptr);
    CHECK(matrix_view<float>{}.empty());
  }
}

TEST_CASE("matrix_view: rows, cols, ld, row and row_slice") {
  std::vector<double> v(7 * 5);
  std::iota(v.begin(), v.end(), 0.0);
  auto m = semoe::as_matrix(v.data(), 7, 5);
  static_assert(std::is_same_v<decltype(m), matrix_view<double>>);
  CHECK(m.rows() == 7);
  CHECK(m.cols() == 5);
  CHECK(m.ld() == 5);
  CHECK(m.row(3) == v.data() + 15);

  auto s = m.row_slice(2, 6);
  CHECK(s.rows() == 4);
  CHECK(s.cols() == 5);
  CHECK(s.ld() == 5);
  CHECK(s.data() == v.data() + 10);
  CHECK(s(0, 0) == 10.0);
  CHECK(s(3, 4) == m(5, 4));
  CHECK(s.contiguous());

  // A slice of a padded matrix keeps the padding.
  matrix_view<double> padded(v.data(), {5, 4}, {7, 1});
  auto ps = padded.row_slice(1, 3);
  CHECK(ps.ld() == 7);
  CHECK(ps(1, 2) == v[2 * 7 + 2]);
  CHECK_FALSE(ps.contiguous());
  CHECK(m.row_slice(4, 4).empty());
}

TEST_CASE("tensor_view: a mutable view converts to const, not the other way") {
  std::vector<int> v{1, 2, 3, 4, 5, 6};
  matrix_view<int> m(v.data(), {3, 2}, {2, 1});
  matrix_view<const int> c = m;
  CHECK(c.data() == m.data());
  CHECK(c.extents() == m.extents());
  CHECK(c.strides() == m.strides());
  CHECK(c(2, 1) == 6);
  static_assert(std::is_same_v<decltype(c.span()), std::span<const int>>);
  static_assert(std::is_convertible_v<matrix_view<int>, matrix_view<const int>>);
  static_assert(!std::is_convertible_v<matrix_view<const int>, matrix_view<int>>);
  static_assert(!std::is_convertible_v<matrix_view<int>, matrix_view<const float>>);
  static_assert(!std::is_convertible_v<tensor_view<int, 1>, matrix_view<const int>>);
}

TEST_CASE("check_shape: passes on a match, names the operand and both shapes otherwise") {
  std::vector<float> v(12);
  auto m = semoe::as_matrix(v.data(), 3, 4);
  CHECK_NOTHROW(semoe::check_shape(m, 3, 4, "x"));
  try {
    semoe::check_shape(m, 4, 3, "linear::forward: input");
    FAIL("check_shape did not throw");
  } catch (const semoe::error& e) {
    CHECK(std::string(e.what()) == "linear::forward: input: expected shape [4, 3], got [3, 4]");
  }
  CHECK_THROWS_AS(semoe::check_shape(m, 3, 5, "x"), semoe::error);
}
