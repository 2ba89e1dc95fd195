// semoe/layer/repeated.hpp: N layers of one type run in order, the deep stack
// of identical blocks a transformer is. Made from a factory so each layer gets
// its own seed (and its own layer id in a shared expert store, in order: the
// vertical prefetcher takes layer id order for execution order).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/layer/concepts.hpp"
#include "semoe/layer/sequential.hpp"

namespace semoe::layer {

template <class T, class Layer>
class repeated {
  static_assert(check_module<Layer, T>());

 public:
  using policy_kind = module_tag;
  using value_type = T;
  using backend = module_backend_t<Layer>;

  /// make(i) builds layer i, for i = 0 .. n-1.
  template <class Make>
  repeated(index_t n, Make&& make) {
    SEMOE_CHECK(n >= 1, "semoe::repeated: n = ", n, ": expected at least one layer");
    layers_.reserve(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) layers_.push_back(make(i));
    acts_.resize(layers_.size());
  }

  index_t size() const { return static_cast<index_t>(layers_.size()); }
  Layer& operator[](index_t i) { return layers_[static_cast<std::size_t>(i)]; }

  template <class F>
  void for_each_layer(F&& f) {
    for (auto& l : layers_) f(l);
  }

  /// Called with layer i just before its forward / just after its backward
  /// (as layer::sequential does): a trainer prefetches and reduces layer by layer.
  void set_forward_hook(std::function<void(std::size_t)> hook) { fwd_hook_ = std::move(hook); }
  void set_backward_hook(std::function<void(std::size_t)> hook) { bwd_hook_ = std::move(hook); }

  index_t output_cols(index_t input_cols) const {
    index_t c = input_cols;
    for (const auto& l : layers_) c = l.output_cols(c);
    return c;
  }

  void forward(matrix_view<const T> x, matrix_view<T> y) {
    check_shape(y, x.rows(), output_cols(x.cols()), "semoe::repeated::forward: y");
    cols_.assign(1, x.cols());
    for (const auto& l : layers_) cols_.push_back(l.output_cols(cols_.back()));
    rows_ = x.rows();
    matrix_view<const T> in = x;
    const std::size_t n = layers_.size();
    for (std::size_t i = 0; i < n; ++i) {
      if (fwd_hook_) fwd_hook_(i);
      if (i + 1 == n) {
        layers_[i].forward(in, y);
      } else {
        acts_[i].resize(rows_, cols_[i + 1]);
        layers_[i].forward(in, acts_[i].view());
        in = acts_[i].view();
      }
    }
  }

  void backward(matrix_view<const T> dy, matrix_view<T> dx = {}) {
    SEMOE_CHECK(!cols_.empty(), "semoe::repeated::backward: called before forward");
    matrix_view<const T> g = dy;
    for (std::size_t i = layers_.size(); i-- > 0;) {
      if (i == 0) {
        layers_[0].backward(g, dx);
        if (bwd_hook_) bwd_hook_(0);
      } else {
        auto& out = grads_[i % 2];  // layer i writes one while reading the other
        const index_t need = rows_ * cols_[i];
        if (out.size() < need) out.resize_discard(need);
        const matrix_view<T> d = as_matrix(out.data(), rows_, cols_[i]);
        layers_[i].backward(g, d);
        if (bwd_hook_) bwd_hook_(i);
        g = d;
      }
    }
  }

  param_list<T> parameters() {
    param_list<T> all;
    for (std::size_t i = 0; i < layers_.size(); ++i)
      for (auto& p : layers_[i].parameters()) {
        p.name = std::to_string(i) + "." + p.name;
        all.push_back(std::move(p));
      }
    return all;
  }
  void zero_grad() {
    for (auto& l : layers_) l.zero_grad();
  }
  void train(bool on) {
    for (auto& l : layers_) train_mode(l, on);
  }
  void end_step() {
    for (auto& l : layers_) end_step_of(l);
  }
  T aux_loss() const {
    T s(0);
    for (const auto& l : layers_) s += aux_loss_of(l);
    return s;
  }

 private:
  std::vector<Layer> layers_;
  std::vector<matrix<T, typename backend::memory_space>> acts_;
  std::array<buffer<T, typename backend::memory_space>, 2> grads_{};
  std::vector<index_t> cols_;
  index_t rows_ = 0;
  std::function<void(std::size_t)> fwd_hook_, bwd_hook_;
};

template <class Make>
repeated(index_t, Make&&) -> repeated<typename std::invoke_result_t<Make, index_t>::value_type,
                                      std::invoke_result_t<Make, index_t>>;

}  // namespace semoe::layer
