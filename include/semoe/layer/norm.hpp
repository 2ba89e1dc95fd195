// semoe/layer/norm.hpp: layer normalization over the columns of each row
// (Ba et al. 2016), with an optional affine gamma/beta.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>

#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/backend.hpp"
#include "semoe/core/parameter.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/layer/concepts.hpp"

namespace semoe::layer {

namespace detail {

/// y = (x - mean) * rstd [* gamma + beta] of one row; saves mean and rstd.
/// Two passes: the one-pass E[x^2] - m^2 cancels badly for large means.
template <class T>
struct layer_norm_forward_kernel {
  matrix_view<const T> x;
  matrix_view<T> y;
  const T *gamma, *beta;  // null without affine
  T eps;
  T *mean, *rstd;
  SEMOE_HD void operator()(index_t i) const {
    const index_t d = x.cols();
    const T* xi = x.row(i);
    T* yi = y.row(i);
    T s = 0;
    for (index_t j = 0; j < d; ++j) s += xi[j];
    const T m = s / T(d);
    T v = 0;
    for (index_t j = 0; j < d; ++j) v += (xi[j] - m) * (xi[j] - m);
    const T r = T(1) / std::sqrt(v / T(d) + eps);
    mean[i] = m;
    rstd[i] = r;
    for (index_t j = 0; j < d; ++j) {
      const T xh = (xi[j] - m) * r;
      yi[j] = gamma ? xh * gamma[j] + beta[j] : xh;
    }
  }
};

/// dgamma[j], dbeta[j] += sums over rows, one column per index (serial sums:
/// the result does not depend on the thread count).
template <class T>
struct layer_norm_param_grad_kernel {
  matrix_view<const T> x, dy;
  const T *mean, *rstd;
  T *dgamma, *dbeta;
  SEMOE_HD void operator()(index_t j) const {
    T sg = 0, sb = 0;
    for (index_t i = 0; i < x.rows(); ++i) {
      sg += dy(i, j) * (x(i, j) - mean[i]) * rstd[i];
      sb += dy(i, j);
    }
    dgamma[j] += sg;
    dbeta[j] += sb;
  }
};

/// dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat)), gh = dy [* gamma].
template <class T>
struct layer_norm_input_grad_kernel {
  matrix_view<const T> x, dy;
  matrix_view<T> dx;
  const T* gamma;  // null without affine
  const T *mean, *rstd;
  SEMOE_HD void operator()(index_t i) const {
    const index_t d = x.cols();
    const T* xi = x.row(i);
    const T* dyi = dy.row(i);
    T* dxi = dx.row(i);
    const T m = mean[i], r = rstd[i];
    T a = 0, c = 0;
    for (index_t j = 0; j < d; ++j) {
      const T gh = gamma ? dyi[j] * gamma[j] : dyi[j];
      a += gh;
      c += gh * (xi[j] - m) * r;
    }
    a /= T(d);
    c /= T(d);
    for (index_t j = 0; j < d; ++j) {
      const T gh = gamma ? dyi[j] * gamma[j] : dyi[j];
      dxi[j] = r * (gh - a - (xi[j] - m) * r * c);
    }
  }
};

}  // namespace detail

/// y = (x - mean) / sqrt(var + eps) * gamma + beta, statistics per row with
/// the biased variance (as PyTorch). gamma starts at 1, beta at 0.
template <class T, Backend B = cpu>
class layer_norm {
 public:
  using backend = B;
  using policy_kind = module_tag;
  using value_type = T;

  struct options {
    index_t dim = 0;
    double eps = 1e-5;
    bool affine = true;
  };

  static void validate(const options& o) {
    SEMOE_CHECK(o.dim > 0, "semoe::layer::layer_norm: options.dim = ", o.dim, "; expected a positive width");
    SEMOE_CHECK(o.eps > 0 && std::isfinite(o.eps), "semoe::layer::layer_norm: options.eps = ", o.eps,
                "; expected a finite positive number");
  }

  layer_norm(typename B::executor& ex, const options& o) : ex_(&ex), opt_(o) {
    validate(o);
    if (o.affine) {
      const buffer<T> ones(o.dim, T(1));
      gamma_.resize_discard(o.dim);
      ex.copy(gamma_.data(), ones.data(), ones.bytes());
      for (auto* b : {&beta_, &ggamma_, &gbeta_}) {
        b->resize_discard(o.dim);
        b->zero();
      }
    }
  }

  const options& opts() const { return opt_; }

  index_t output_cols(index_t input_cols) const {
    SEMOE_CHECK(input_cols == opt_.dim, "semoe::layer::layer_norm: input has ", input_cols,
                " columns; expected options.dim = ", opt_.dim);
    return opt_.dim;
  }

  void forward(matrix_view<const T> x, matrix_view<T> y) {
    const index_t n = x.rows(), d = opt_.dim;
    check_shape(x, n, d, "semoe::layer::layer_norm::forward: x");
    check_shape(y, n, d, "semoe::layer::layer_norm::forward: y");
    mean_.resize_discard(n);
    rstd_.resize_discard(n);
    ex_->parallel_for(n,
                      detail::layer_norm_forward_kernel<T>{x, y, opt_.affine ? gamma_.data() : nullptr, beta_.data(),
                                                           static_cast<T>(opt_.eps), mean_.data(), rstd_.data()},
                      rows_grain());
    x_ = x;
    has_input_ = true;
  }

  void backward(matrix_view<const T> dy, matrix_view<T> dx) {
    SEMOE_CHECK(has_input_, "semoe::layer::layer_norm::backward: called before forward");
    const index_t n = x_.rows(), d = opt_.dim;
    check_shape(dy, n, d, "semoe::layer::layer_norm::backward: dy");
    if (dx.rows() != 0) check_shape(dx, n, d, "semoe::layer::layer_norm::backward: dx");
    if (opt_.affine)
      ex_->parallel_for(d,
                        detail::layer_norm_param_grad_kernel<T>{x_, dy, mean_.data(), rstd_.data(), ggamma_.data(),
                                                                gbeta_.data()},
                        std::max<index_t>(1, 16384 / std::max<index_t>(n, 1)));
    if (dx.rows() == 0) return;
    ex_->parallel_for(n,
                      detail::layer_norm_input_grad_kernel<T>{x_, dy, dx, opt_.affine ? gamma_.data() : nullptr,
                                                              mean_.data(), rstd_.data()},
                      rows_grain());
  }

  param_list<T> parameters() {
    if (!opt_.affine) return {};
    return {{"weight", gamma_.span(), ggamma_.span(), param_kind::dense},
            {"bias", beta_.span(), gbeta_.span(), param_kind::dense}};
  }

  void zero_grad() {
    ggamma_.zero();
    gbeta_.zero();
  }

  std::span<T> gamma() { return gamma_.span(); }  ///< empty without affine
  std::span<T> beta() { return beta_.span(); }

 private:
  index_t rows_grain() const { return std::max<index_t>(1, 8192 / opt_.dim); }

  typename B::executor* ex_;
  options opt_;
  buffer<T, typename B::memory_space> gamma_, beta_, ggamma_, gbeta_, mean_, rstd_;
  matrix_view<const T> x_{};
  bool has_input_ = false;
};

}  // namespace semoe::layer
