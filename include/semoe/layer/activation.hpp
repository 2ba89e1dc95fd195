// semoe/layer/activation.hpp: the elementwise layers: an activation function
// as a module, and dropout.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "semoe/core/error.hpp"
#include "semoe/core/backend.hpp"
#include "semoe/core/parameter.hpp"
#include "semoe/core/random.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/expert/activation.hpp"
#include "semoe/layer/concepts.hpp"

namespace semoe::layer {

namespace detail {
/// Rows per task for a loop that touches `cols` elements per row.
inline index_t rows_grain(index_t cols) { return std::max<index_t>(1, 16384 / std::max<index_t>(cols, 1)); }

/// y = Act(x), a row and a range of its columns per call.
template <class T, class Act>
struct activation_forward_rows {
  matrix_view<const T> x;
  matrix_view<T> y;
  SEMOE_HD void operator()(index_t i, index_t j0, index_t j1) const {
    const T* xi = x.row(i);
    T* yi = y.row(i);
    for (index_t j = j0; j < j1; ++j) yi[j] = Act::f(xi[j]);
  }
};

/// dx = dy * Act'(x), a row and a range of its columns per call.
template <class T, class Act>
struct activation_backward_rows {
  matrix_view<const T> x, dy;
  matrix_view<T> dx;
  SEMOE_HD void operator()(index_t i, index_t j0, index_t j1) const {
    const T* xi = x.row(i);
    const T* dyi = dy.row(i);
    T* dxi = dx.row(i);
    for (index_t j = j0; j < j1; ++j) dxi[j] = dyi[j] * Act::df(xi[j]);
  }
};

/// out = in with each element zeroed with probability p (philox counter =
/// element index) and the rest times scale; a copy when not masked.
template <class T>
struct dropout_rows {
  matrix_view<const T> in;
  matrix_view<T> out;
  philox rng;
  float p;
  T scale;
  bool masked;
  SEMOE_HD void operator()(index_t i, index_t j0, index_t j1) const {
    const index_t c = in.cols();
    const T* a = in.row(i);
    T* b = out.row(i);
    for (index_t j = j0; j < j1; ++j) {
      if (!masked) {
        b[j] = a[j];
        continue;
      }
      const auto k = static_cast<std::uint64_t>(i * c + j);
      b[j] = rng.uniform(k / 4, int(k % 4)) < p ? T(0) : a[j] * scale;
    }
  }
};
}  // namespace detail

/// y = Act(x) elementwise; Act is relu, gelu or silu from expert/activation.hpp.
template <class T, class Act, Backend B = cpu>
class activation {
  static_assert(act::Activation<Act>, "semoe::layer::activation: Act must be an activation of "
                                      "expert/activation.hpp (relu, gelu, silu)");
  static_assert(!Act::gated, "semoe::layer::activation: gated activations (swiglu) need two inputs; "
                             "use them inside expert::ffn");

 public:
  using backend = B;
  using policy_kind = module_tag;
  using value_type = T;
  using function = Act;

  explicit activation(typename B::executor& ex) : ex_(&ex) {}

  index_t output_cols(index_t input_cols) const {
    SEMOE_CHECK(input_cols > 0, "semoe::layer::activation: input has ", input_cols,
                " columns; expected at least 1");
    return input_cols;
  }

  void forward(matrix_view<const T> x, matrix_view<T> y) {
    check_shape(y, x.rows(), x.cols(), "semoe::layer::activation::forward: y");
    ex_->parallel_rows(x.rows(), x.cols(), detail::activation_forward_rows<T, Act>{x, y}, detail::rows_grain(x.cols()));
    x_ = x;
    has_input_ = true;
  }

  void backward(matrix_view<const T> dy, matrix_view<T> dx) {
    SEMOE_CHECK(has_input_, "semoe::layer::activation::backward: called before forward");
    check_shape(dy, x_.rows(), x_.cols(), "semoe::layer::activation::backward: dy");
    if (dx.rows() == 0) return;  // no parameters: nothing else to do
    check_shape(dx, x_.rows(), x_.cols(), "semoe::layer::activation::backward: dx");
    ex_->parallel_rows(x_.rows(), x_.cols(), detail::activation_backward_rows<T, Act>{x_, dy, dx},
                      detail::rows_grain(x_.cols()));
  }

  param_list<T> parameters() { return {}; }
  void zero_grad() {}

 private:
  typename B::executor* ex_;
  matrix_view<const T> x_{};
  bool has_input_ = false;
};

/// Inverted dropout: in training, each element is zeroed with probability p
/// and the rest scaled by 1/(1-p); in evaluation it is the identity. The mask
/// is philox(seed, stream = step)(element index), so backward recomputes it
/// instead of storing it, and a rerun with the same seed is bit-identical.
/// The step advances in end_step().
template <class T, Backend B = cpu>
class dropout {
 public:
  using backend = B;
  using policy_kind = module_tag;
  using value_type = T;

  struct options {
    double p = 0.1;
  };

  static void validate(const options& o) {
    SEMOE_CHECK(o.p >= 0 && o.p < 1, "semoe::layer::dropout: options.p = ", o.p, "; expected 0 <= p < 1");
  }

  dropout(typename B::executor& ex, const options& o, std::uint64_t seed) : ex_(&ex), opt_(o), seed_(seed) {
    validate(o);
  }

  index_t output_cols(index_t input_cols) const {
    SEMOE_CHECK(input_cols > 0, "semoe::layer::dropout: input has ", input_cols, " columns; expected at least 1");
    return input_cols;
  }

  void train(bool on) { training_ = on; }
  bool training() const { return training_; }
  void end_step() { ++step_; }
  std::uint64_t step() const { return step_; }
  /// A restored run puts the mask stream back where it was saved.
  void set_step(std::uint64_t s) { step_ = s; }

  void forward(matrix_view<const T> x, matrix_view<T> y) {
    check_shape(y, x.rows(), x.cols(), "semoe::layer::dropout::forward: y");
    rows_ = x.rows();
    cols_ = x.cols();
    masked_ = training_ && opt_.p > 0;
    mask_step_ = step_;  // backward uses this step's mask even after end_step()
    has_input_ = true;
    apply(x, y);
  }

  void backward(matrix_view<const T> dy, matrix_view<T> dx) {
    SEMOE_CHECK(has_input_, "semoe::layer::dropout::backward: called before forward");
    check_shape(dy, rows_, cols_, "semoe::layer::dropout::backward: dy");
    if (dx.rows() == 0) return;
    check_shape(dx, rows_, cols_, "semoe::layer::dropout::backward: dx");
    apply(dy, dx);  // the same mask and scale: the map is linear and diagonal
  }

  param_list<T> parameters() { return {}; }
  void zero_grad() {}

 private:
  void apply(matrix_view<const T> in, matrix_view<T> out) const {
    ex_->parallel_rows(rows_, cols_,
                      detail::dropout_rows<T>{in, out, philox(seed_, mask_step_), static_cast<float>(opt_.p),
                                              T(1) / (T(1) - static_cast<T>(opt_.p)), masked_},
                      detail::rows_grain(cols_));
  }

  typename B::executor* ex_;
  options opt_;
  std::uint64_t seed_;
  std::uint64_t step_ = 0, mask_step_ = 0;
  bool training_ = true;
  bool masked_ = false;
  bool has_input_ = false;
  index_t rows_ = 0, cols_ = 0;
};

}  // namespace semoe::layer
