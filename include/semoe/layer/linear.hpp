// semoe/layer/linear.hpp: y = x W^T + b, the dense projection.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>

#include "semoe/core/blas.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/backend.hpp"
#include "semoe/core/parameter.hpp"
#include "semoe/core/random.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/layer/concepts.hpp"

namespace semoe::layer {

namespace detail {

/// y[i, :] += b, a row and a range of its columns per call.
template <class T>
struct add_row_bias_kernel {
  matrix_view<T> y;
  const T* b;
  SEMOE_HD void operator()(index_t i, index_t j0, index_t j1) const {
    T* yi = y.row(i);
    for (index_t j = j0; j < j1; ++j) yi[j] += b[j];
  }
};

/// db[j] += sum over rows of dy[:, j], one column per index: each sum is
/// serial, so the result does not depend on the thread count.
template <class T>
struct add_column_sums_kernel {
  matrix_view<const T> dy;
  T* db;
  SEMOE_HD void operator()(index_t j) const {
    T s = 0;
    for (index_t i = 0; i < dy.rows(); ++i) s += dy(i, j);
    db[j] += s;
  }
};

/// PyTorch's init: U(-bound, bound), element k drawn from counter k / 4,
/// lane k % 4 of the stream, a pure function of the seed.
template <class T>
struct uniform_init_kernel {
  T* w;
  philox rng;
  T bound;
  SEMOE_HD void operator()(index_t k) const {
    w[k] = bound * (T(2) * static_cast<T>(rng.uniform(static_cast<std::uint64_t>(k) / 4, int(k % 4))) - T(1));
  }
};

}  // namespace detail

/// A fully connected layer. W is [out, in] (PyTorch's layout, so checkpoints
/// map one to one); W and b start uniform in ±1/sqrt(in), as in PyTorch.
template <class T, Backend B = cpu>
class linear {
 public:
  using backend = B;
  using policy_kind = module_tag;
  using value_type = T;

  struct options {
    index_t in = 0;
    index_t out = 0;
    bool bias = true;
  };

  static void validate(const options& o) {
    SEMOE_CHECK(o.in > 0, "semoe::layer::linear: options.in = ", o.in, "; expected a positive number of input features");
    SEMOE_CHECK(o.out > 0, "semoe::layer::linear: options.out = ", o.out,
                "; expected a positive number of output features");
  }

  linear(typename B::executor& ex, const options& o, std::uint64_t seed) : ex_(&ex), opt_(o) {
    validate(o);
    w_.resize_discard(o.in * o.out);
    gw_.resize_discard(o.in * o.out);
    gw_.zero();
    if (o.bias) {
      b_.resize_discard(o.out);
      gb_.resize_discard(o.out);
      gb_.zero();
    }
    // Stream 0 draws W, stream 1 draws b: each a pure function of the seed.
    const T bound = T(1) / std::sqrt(static_cast<T>(o.in));
    ex.parallel_for(w_.size(), detail::uniform_init_kernel<T>{w_.data(), philox(seed, 0), bound});
    ex.parallel_for(b_.size(), detail::uniform_init_kernel<T>{b_.data(), philox(seed, 1), bound});
  }

  const options& opts() const { return opt_; }

  index_t output_cols(index_t input_cols) const {
    SEMOE_CHECK(input_cols == opt_.in, "semoe::layer::linear: input has ", input_cols,
                " columns; expected options.in = ", opt_.in);
    return opt_.out;
  }

  void forward(matrix_view<const T> x, matrix_view<T> y) {
    check_shape(x, x.rows(), opt_.in, "semoe::layer::linear::forward: x");
    check_shape(y, x.rows(), opt_.out, "semoe::layer::linear::forward: y");
    blas::gemm(*ex_, blas::op::n, blas::op::t, T(1), x, matrix_view<const T>(weight()), T(0), y);
    if (opt_.bias) ex_->parallel_rows(x.rows(), opt_.out, detail::add_row_bias_kernel<T>{y, b_.data()}, rows_grain());
    x_ = x;
    has_input_ = true;
  }

  void backward(matrix_view<const T> dy, matrix_view<T> dx) {
    SEMOE_CHECK(has_input_, "semoe::layer::linear::backward: called before forward");
    const index_t n = x_.rows();
    check_shape(dy, n, opt_.out, "semoe::layer::linear::backward: dy");
    if (dx.rows() != 0) check_shape(dx, n, opt_.in, "semoe::layer::linear::backward: dx");
    // dW += dy^T x
    blas::gemm(*ex_, blas::op::t, blas::op::n, T(1), dy, x_, T(1), weight_grad());
    if (opt_.bias)
      ex_->parallel_for(opt_.out, detail::add_column_sums_kernel<T>{dy, gb_.data()},
                        std::max<index_t>(1, 16384 / std::max<index_t>(n, 1)));
    if (dx.rows() != 0) blas::gemm(*ex_, blas::op::n, blas::op::n, T(1), dy, matrix_view<const T>(weight()), T(0), dx);
  }

  param_list<T> parameters() {
    param_list<T> p{{"weight", w_.span(), gw_.span(), param_kind::dense}};
    if (opt_.bias) p.push_back({"bias", b_.span(), gb_.span(), param_kind::dense});
    return p;
  }

  void zero_grad() {
    gw_.zero();
    gb_.zero();
  }

  matrix_view<T> weight() { return w_.matrix(opt_.out, opt_.in); }
  matrix_view<const T> weight() const { return w_.matrix(opt_.out, opt_.in); }
  matrix_view<T> weight_grad() { return gw_.matrix(opt_.out, opt_.in); }
  std::span<T> bias() { return b_.span(); }  ///< empty without bias
  std::span<T> bias_grad() { return gb_.span(); }

 private:
  index_t rows_grain() const { return std::max<index_t>(1, 16384 / opt_.out); }

  typename B::executor* ex_;
  options opt_;
  buffer<T, typename B::memory_space> w_, gw_, b_, gb_;
  matrix_view<const T> x_{};
  bool has_input_ = false;
};

}  // namespace semoe::layer
