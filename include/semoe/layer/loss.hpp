// semoe/layer/loss.hpp: softmax cross-entropy with label smoothing, and
// argmax / accuracy helpers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>

#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/backend.hpp"
#include "semoe/core/tensor.hpp"

namespace semoe::layer {

namespace detail {

/// probs = softmax(z) of one row and its loss, logsumexp(z) - sum_j q_j z_j.
template <class T>
struct softmax_xent_forward_kernel {
  matrix_view<const T> logits;
  matrix_view<T> probs;
  const std::int32_t* labels;
  T smoothing;
  T* row_loss;
  SEMOE_HD void operator()(index_t i) const {
    const index_t c = logits.cols();
    const T* z = logits.row(i);
    T* pi = probs.row(i);
    T m = z[0];
    for (index_t j = 1; j < c; ++j) m = z[j] > m ? z[j] : m;
    T sum = 0, zsum = 0;
    for (index_t j = 0; j < c; ++j) {
      pi[j] = std::exp(z[j] - m);
      sum += pi[j];
      zsum += z[j];
    }
    const T inv = T(1) / sum;
    for (index_t j = 0; j < c; ++j) pi[j] *= inv;
    const T lse = m + std::log(sum);
    row_loss[i] = lse - (T(1) - smoothing) * z[labels[i]] - smoothing / T(c) * zsum;
  }
};

/// dlogits = (softmax - q) / global batch, one row per index.
template <class T>
struct softmax_xent_backward_kernel {
  matrix_view<const T> probs;
  matrix_view<T> dlogits;
  const std::int32_t* labels;
  T smoothing, inv_batch;
  SEMOE_HD void operator()(index_t i) const {
    const index_t c = probs.cols();
    const T* pi = probs.row(i);
    T* di = dlogits.row(i);
    for (index_t j = 0; j < c; ++j) di[j] = (pi[j] - smoothing / T(c)) * inv_batch;
    di[labels[i]] -= (T(1) - smoothing) * inv_batch;
  }
};

}  // namespace detail

/// loss = sum_i [logsumexp(z_i) - sum_j q_ij z_ij] / global_batch, with
/// q_i = (1 - s) onehot(label_i) + s / C. Dividing the local SUM by the global
/// batch makes the losses (and gradients) of data-parallel ranks add up to the
/// global mean, so gradient reduction is a plain sum.
template <class T, Backend B = cpu>
class softmax_cross_entropy {
 public:
  using backend = B;
  using value_type = T;

  struct options {
    double label_smoothing = 0.0;
  };

  static void validate(const options& o) {
    SEMOE_CHECK(o.label_smoothing >= 0 && o.label_smoothing <= 1, "semoe::layer::softmax_cross_entropy: ",
                "options.label_smoothing = ", o.label_smoothing, "; expected 0 <= label_smoothing <= 1");
  }

  explicit softmax_cross_entropy(typename B::executor& ex) : softmax_cross_entropy(ex, options{}) {}
  softmax_cross_entropy(typename B::executor& ex, const options& o) : ex_(&ex), opt_(o) { validate(o); }

  /// The loss of these rows divided by global_batch (the rows over all ranks
  /// and micro-batches that make up one step).
  T forward(matrix_view<const T> logits, std::span<const std::int32_t> labels, index_t global_batch) {
    const index_t n = logits.rows(), c = logits.cols();
    SEMOE_CHECK(c > 0, "semoe::layer::softmax_cross_entropy::forward: logits have 0 columns; expected at least 1 class");
    SEMOE_CHECK(static_cast<index_t>(labels.size()) == n, "semoe::layer::softmax_cross_entropy::forward: labels has ",
                labels.size(), " entries; expected one per row of logits = ", n);
    SEMOE_CHECK(global_batch > 0 && global_batch >= n, "semoe::layer::softmax_cross_entropy::forward: global_batch = ",
                global_batch, "; expected at least the local rows = ", n, " and at least 1");
    for (index_t i = 0; i < n; ++i)
      SEMOE_CHECK(labels[i] >= 0 && labels[i] < c, "semoe::layer::softmax_cross_entropy::forward: labels[", i,
                  "] = ", labels[i], " is out of range; expected 0 <= label < classes = ", c);
    rows_ = n;
    cols_ = c;
    global_batch_ = global_batch;
    probs_.resize(n, c);
    row_loss_.resize_discard(n);
    labels_.resize_discard(n);
    ex_->copy(labels_.data(), labels.data(), labels.size_bytes());
    ex_->parallel_for(n,
                      detail::softmax_xent_forward_kernel<T>{logits, probs_.view(), labels_.data(),
                                                             static_cast<T>(opt_.label_smoothing), row_loss_.data()},
                      std::max<index_t>(1, 4096 / c));
    // A serial sum in double on the host: the result does not depend on the
    // thread count or the backend's reduction order.
    row_loss_host_.resize_discard(n);
    ex_->copy(row_loss_host_.data(), row_loss_.data(), row_loss_.bytes());
    double total = 0;
    for (index_t i = 0; i < n; ++i) total += static_cast<double>(row_loss_host_[i]);
    has_input_ = true;
    return static_cast<T>(total / static_cast<double>(global_batch));
  }

  /// The gradient of the value forward returned: (softmax - q) / global_batch.
  void backward(matrix_view<T> dlogits) const {
    SEMOE_CHECK(has_input_, "semoe::layer::softmax_cross_entropy::backward: called before forward");
    check_shape(dlogits, rows_, cols_, "semoe::layer::softmax_cross_entropy::backward: dlogits");
    ex_->parallel_for(rows_,
                      detail::softmax_xent_backward_kernel<T>{probs_.view(), dlogits, labels_.data(),
                                                              static_cast<T>(opt_.label_smoothing),
                                                              T(1) / static_cast<T>(global_batch_)},
                      std::max<index_t>(1, 4096 / cols_));
  }

  /// The softmax of the last forward, [rows, classes].
  matrix_view<const T> probabilities() const { return probs_.view(); }

 private:
  typename B::executor* ex_;
  options opt_;
  matrix<T, typename B::memory_space> probs_;
  buffer<T, typename B::memory_space> row_loss_;
  buffer<std::int32_t, typename B::memory_space> labels_;
  buffer<T, typename B::host_memory_space> row_loss_host_;
  index_t rows_ = 0, cols_ = 0, global_batch_ = 1;
  bool has_input_ = false;
};

namespace detail {
/// The first column holding the maximum of row i; NaN never wins.
template <class T>
index_t row_argmax(const matrix_view<T>& x, index_t i) {
  index_t best = 0;
  for (index_t j = 1; j < x.cols(); ++j)
    if (x(i, j) > x(i, best) || (std::isnan(x(i, best)) && !std::isnan(x(i, j)))) best = j;
  return best;
}
}  // namespace detail

/// out[i] = argmax of row i of x.
template <class T>
void argmax_rows(matrix_view<T> x, std::span<std::int32_t> out) {
  SEMOE_CHECK(static_cast<index_t>(out.size()) == x.rows(), "semoe::layer::argmax_rows: out has ", out.size(),
              " entries; expected one per row = ", x.rows());
  SEMOE_CHECK(x.cols() > 0 || x.rows() == 0, "semoe::layer::argmax_rows: x has 0 columns");
  for (index_t i = 0; i < x.rows(); ++i) out[i] = static_cast<std::int32_t>(detail::row_argmax(x, i));
}

/// Rows whose argmax equals the label.
template <class T>
index_t count_correct(matrix_view<T> logits, std::span<const std::int32_t> labels) {
  SEMOE_CHECK(static_cast<index_t>(labels.size()) == logits.rows(), "semoe::layer::count_correct: labels has ",
              labels.size(), " entries; expected one per row of logits = ", logits.rows());
  SEMOE_CHECK(logits.cols() > 0 || logits.rows() == 0, "semoe::layer::count_correct: logits have 0 columns");
  index_t correct = 0;
  for (index_t i = 0; i < logits.rows(); ++i) correct += detail::row_argmax(logits, i) == labels[i];
  return correct;
}

/// The fraction of rows classified correctly; 0 for an empty batch.
template <class T>
double accuracy(matrix_view<T> logits, std::span<const std::int32_t> labels) {
  const index_t n = logits.rows();
  return n == 0 ? 0.0 : static_cast<double>(count_correct(logits, labels)) / static_cast<double>(n);
}

}  // namespace semoe::layer
