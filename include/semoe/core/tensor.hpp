// semoe/core/tensor.hpp: non-owning views with extents and strides.
#pragma once

#include <array>
#include <span>
#include <type_traits>

#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"

namespace semoe {

/// A strided view of Rank dimensions over memory it does not own. Strides are
/// in elements; the default layout is row-major and contiguous.
template <class T, int Rank>
class tensor_view {
  static_assert(Rank >= 1, "semoe::tensor_view: Rank must be at least 1");

 public:
  using value_type = T;
  using extents_type = std::array<index_t, Rank>;

  constexpr tensor_view() = default;

  SEMOE_HD tensor_view(T* data, const extents_type& extents) : data_(data), extents_(extents) {
    index_t s = 1;
    for (int r = Rank - 1; r >= 0; --r) {
      strides_[r] = s;
      s *= extents_[r];
    }
  }

  SEMOE_HD tensor_view(T* data, const extents_type& extents, const extents_type& strides)
      : data_(data), extents_(extents), strides_(strides) {}

  /// A view of const elements converts implicitly from a mutable one.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  SEMOE_HD tensor_view(const tensor_view<U, Rank>& other)
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  SEMOE_HD T* data() const { return data_; }
  SEMOE_HD const extents_type& extents() const { return extents_; }
  SEMOE_HD const extents_type& strides() const { return strides_; }
  SEMOE_HD index_t extent(int r) const { return extents_[r]; }
  SEMOE_HD index_t stride(int r) const { return strides_[r]; }

  SEMOE_HD index_t size() const {
    index_t n = 1;
    for (int r = 0; r < Rank; ++r) n *= extents_[r];
    return n;
  }
  SEMOE_HD bool empty() const { return size() == 0; }

  SEMOE_HD bool contiguous() const {
    index_t s = 1;
    for (int r = Rank - 1; r >= 0; --r) {
      if (extents_[r] != 1 && strides_[r] != s) return false;
      s *= extents_[r];
    }
    return true;
  }

  template <class... I>
    requires(sizeof...(I) == Rank)
  SEMOE_HD T& operator()(I... idx) const {
    const index_t i[] = {static_cast<index_t>(idx)...};
    index_t off = 0;
    for (int r = 0; r < Rank; ++r) off += i[r] * strides_[r];
    return data_[off];
  }

  // Matrix conveniences (Rank 2): rows, columns, leading dimension, row pointer.
  SEMOE_HD index_t rows() const requires(Rank == 2) { return extents_[0]; }
  SEMOE_HD index_t cols() const requires(Rank == 2) { return extents_[1]; }
  SEMOE_HD index_t ld() const requires(Rank == 2) { return strides_[0]; }
  SEMOE_HD T* row(index_t i) const requires(Rank == 2) { return data_ + i * strides_[0]; }

  /// Rows [begin, end) of a matrix, sharing its strides.
  SEMOE_HD tensor_view row_slice(index_t begin, index_t end) const requires(Rank == 2) {
    return tensor_view(data_ + begin * strides_[0], {end - begin, extents_[1]}, strides_);
  }

  /// The elements as one contiguous span; only valid on contiguous views.
  std::span<T> span() const {
    SEMOE_CHECK(contiguous(), "semoe::tensor_view::span: the view is strided; copy it first");
    return {data_, static_cast<std::size_t>(size())};
  }

 private:
  T* data_ = nullptr;
  extents_type extents_{};
  extents_type strides_{};
};

template <class T>
using matrix_view = tensor_view<T, 2>;
template <class T>
using vector_view = tensor_view<T, 1>;

/// A const matrix view in a non-deduced context: in `f(matrix_view<T> out,
/// in_view<T> in)` T comes from `out`, and a mutable view converts for `in`.
template <class T>
using in_view = std::type_identity_t<matrix_view<const T>>;

/// A row-major [rows, cols] view of contiguous memory.
template <class T>
SEMOE_HD matrix_view<T> as_matrix(T* data, index_t rows, index_t cols) {
  return matrix_view<T>(data, {rows, cols});
}

/// Throws semoe::error naming `what` unless the matrix is [rows, cols].
template <class T>
void check_shape(const matrix_view<T>& m, index_t rows, index_t cols, const char* what) {
  SEMOE_CHECK(m.rows() == rows && m.cols() == cols, what, ": expected shape [", rows, ", ", cols,
              "], got [", m.rows(), ", ", m.cols(), "]");
}

}  // namespace semoe
