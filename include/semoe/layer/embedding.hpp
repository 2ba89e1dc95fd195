// semoe/layer/embedding.hpp: the token embedding, ids -> rows of a [vocab, dim]
// table. (The column-partitioned form of SE-MoE §4.3 builds on this one.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>

#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/executor.hpp"
#include "semoe/core/parameter.hpp"
#include "semoe/core/random.hpp"
#include "semoe/core/tensor.hpp"

namespace semoe::layer {

/// y[i] = table[ids[i]]. Not a Module (its input is ids, not rows of T): it
/// sits in front of a sequential. The table starts N(0, 1), as in PyTorch.
template <class T>
class embedding {
 public:
  using value_type = T;

  struct options {
    index_t vocab = 0;
    index_t dim = 0;
  };

  static void validate(const options& o) {
    SEMOE_CHECK(o.vocab > 0 && o.vocab <= index_t{1} << 31, "semoe::layer::embedding: options.vocab = ", o.vocab,
                "; expected 1 to 2^31 (ids are int32)");
    SEMOE_CHECK(o.dim > 0, "semoe::layer::embedding: options.dim = ", o.dim, "; expected a positive width");
  }

  embedding(cpu_executor& ex, const options& o, std::uint64_t seed) : ex_(&ex), opt_(o) {
    validate(o);
    table_.resize_discard(o.vocab * o.dim);
    grad_.assign(o.vocab * o.dim, T(0));
    const philox rng(seed, 0);
    T* t = table_.data();
    ex.parallel_for(table_.size(), [=](index_t k) { t[k] = static_cast<T>(rng.normal(static_cast<std::uint64_t>(k))); });
  }

  const options& opts() const { return opt_; }
  index_t dim() const { return opt_.dim; }

  /// ids stay valid (the caller keeps them) until backward.
  void forward(std::span<const std::int32_t> ids, matrix_view<T> y) {
    const auto n = static_cast<index_t>(ids.size());
    check_shape(y, n, opt_.dim, "semoe::layer::embedding::forward: y");
    // Check every id before touching y: a bad id never becomes an out-of-bounds read.
    for (index_t i = 0; i < n; ++i)
      SEMOE_CHECK(ids[i] >= 0 && ids[i] < opt_.vocab, "semoe::layer::embedding::forward: ids[", i, "] = ", ids[i],
                  " is out of range; expected 0 <= id < vocab = ", opt_.vocab);
    const T* t = table_.data();
    const index_t d = opt_.dim;
    const std::int32_t* id = ids.data();
    ex_->parallel_for(n, [=](index_t i) { std::copy_n(t + id[i] * d, d, y.row(i)); },
                      std::max<index_t>(1, 16384 / d));
    ids_ = ids;
    has_input_ = true;
  }

  /// grad[ids[i]] += dy[i]; repeated ids accumulate.
  void backward(matrix_view<const T> dy) {
    SEMOE_CHECK(has_input_, "semoe::layer::embedding::backward: called before forward");
    const auto n = static_cast<index_t>(ids_.size());
    check_shape(dy, n, opt_.dim, "semoe::layer::embedding::backward: dy");
    // Threads own disjoint column blocks, so repeated ids never race and each
    // element sums its rows in order: deterministic for any thread count.
    T* g = grad_.data();
    const index_t d = opt_.dim;
    const std::int32_t* id = ids_.data();
    ex_->parallel_chunks(d, 64, [=](index_t b, index_t e) {
      for (index_t i = 0; i < n; ++i) {
        T* gr = g + id[i] * d;
        const T* dyi = dy.row(i);
        for (index_t j = b; j < e; ++j) gr[j] += dyi[j];
      }
    });
  }

  param_list<T> parameters() { return {{"weight", table_.span(), grad_.span(), param_kind::dense}}; }
  void zero_grad() { grad_.zero(); }

  matrix_view<T> weight() { return table_.matrix(opt_.vocab, opt_.dim); }
  matrix_view<T> weight_grad() { return grad_.matrix(opt_.vocab, opt_.dim); }

 private:
  cpu_executor* ex_;
  options opt_;
  buffer<T> table_, grad_;
  std::span<const std::int32_t> ids_{};
  bool has_input_ = false;
};

}  // namespace semoe::layer
