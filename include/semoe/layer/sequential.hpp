// semoe/layer/sequential.hpp: a chain of modules that owns the activations
// between them, and the residual block y = x + chain(x). Both are modules
// themselves, so they nest.
#pragma once

#include <algorithm>
#include <array>
#include <functional>
#include <cstddef>
#include <string>
#include <tuple>
#include <utility>

#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/backend.hpp"
#include "semoe/core/parameter.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/layer/concepts.hpp"

namespace semoe::layer {

/// Layers run in order; layer i's output lives in a buffer owned here until
/// the next forward (layer i+1 keeps a view of it for its backward). Buffers
/// are resized only when the batch shape changes, so steady steps allocate
/// nothing.
template <class T, class... Layers>
class sequential {
  static_assert(sizeof...(Layers) >= 1, "semoe::sequential: needs at least one layer");
  static_assert((check_module<Layers, T>() && ...));

  static constexpr std::size_t count = sizeof...(Layers);

 public:
  using policy_kind = module_tag;
  using value_type = T;
  using backend = module_backend_t<std::tuple_element_t<0, std::tuple<Layers...>>>;

  explicit sequential(Layers... layers) : layers_(std::move(layers)...) {}

  static constexpr std::size_t size() { return count; }

  template <std::size_t I>
  auto& get() { return std::get<I>(layers_); }
  template <std::size_t I>
  const auto& get() const { return std::get<I>(layers_); }

  /// f(layer) for every layer in order.
  template <class F>
  void for_each_layer(F&& f) {
    std::apply([&](auto&... l) { (f(l), ...); }, layers_);
  }
  template <class F>
  void for_each_layer(F&& f) const {
    std::apply([&](const auto&... l) { (f(l), ...); }, layers_);
  }

  index_t output_cols(index_t input_cols) const {
    std::array<index_t, count + 1> cols;
    widths(input_cols, cols);
    return cols[count];
  }

  /// Runs every layer; the result stays valid until the next forward.
  matrix_view<const T> forward(matrix_view<const T> x) {
    prepare(x);
    acts_[count - 1].resize(x.rows(), cols_[count]);
    forward_from<0>(x, acts_[count - 1].view());
    has_input_ = true;
    return acts_[count - 1].view();
  }

  /// Module form: the last layer writes straight into y.
  void forward(matrix_view<const T> x, matrix_view<T> y) {
    prepare(x);
    check_shape(y, x.rows(), cols_[count], "semoe::sequential::forward: y");
    forward_from<0>(x, y);
    has_input_ = true;
  }

  /// dy is [n, output cols]; dx [n, input cols] or 0 rows when not needed.
  void backward(matrix_view<const T> dy, matrix_view<T> dx = {}) {
    SEMOE_CHECK(has_input_, "semoe::sequential::backward: called before forward");
    check_shape(dy, rows_, cols_[count], "semoe::sequential::backward: dy");
    if (dx.rows() != 0) check_shape(dx, rows_, cols_[0], "semoe::sequential::backward: dx");
    backward_from<count - 1>(dy, dx);
  }

  /// Called with layer i once layer i's backward has finished, i.e. once its
  /// parameter gradients are final: a trainer launches the reduction of the
  /// gradient buckets they fill while earlier layers still run backward.
  void set_backward_hook(std::function<void(std::size_t)> hook) { hook_ = std::move(hook); }
  /// Called with layer i just before layer i's forward: a trainer that keeps
  /// dense parameters sharded makes layer i's whole and starts gathering the
  /// next one's while layer i computes (SE-MoE's horizontal prefetch).
  void set_forward_hook(std::function<void(std::size_t)> hook) { fwd_hook_ = std::move(hook); }

  /// Every layer's parameters, named "<index>.<name>" ("0.weight", "2.1.bias").
  param_list<T> parameters() {
    param_list<T> all;
    std::size_t i = 0;
    for_each_layer([&](auto& l) {
      for (auto& p : l.parameters()) {
        p.name = std::to_string(i) + "." + p.name;
        all.push_back(std::move(p));
      }
      ++i;
    });
    return all;
  }

  void zero_grad() {
    for_each_layer([](auto& l) { l.zero_grad(); });
  }
  void train(bool on) {
    for_each_layer([on](auto& l) { train_mode(l, on); });
  }
  void end_step() {
    for_each_layer([](auto& l) { end_step_of(l); });
  }
  /// The sum of the aux losses of the layers that have one (MoE balance losses).
  T aux_loss() const {
    return std::apply([](const auto&... l) { return (T(0) + ... + aux_loss_of(l)); }, layers_);
  }

 private:
  /// cols[i] = input width of layer i; cols[count] = the output width.
  void widths(index_t input_cols, std::array<index_t, count + 1>& cols) const {
    cols[0] = input_cols;
    std::size_t i = 0;
    try {
      std::apply([&](const auto&... l) { ((cols[i + 1] = l.output_cols(cols[i]), ++i), ...); }, layers_);
    } catch (const error& e) {
      ::semoe::detail::fail("semoe::sequential: layer ", i, ": ", e.what());  // say which layer
    }
  }

  void prepare(matrix_view<const T> x) {
    std::array<index_t, count + 1> cols;
    widths(x.cols(), cols);  // every width is checked before any layer runs
    cols_ = cols;
    rows_ = x.rows();
    has_input_ = false;  // until every layer has run: a throw leaves no half-done forward to differentiate
  }

  template <std::size_t I>
  void forward_from(matrix_view<const T> in, matrix_view<T> last) {
    if (fwd_hook_) fwd_hook_(I);
    if constexpr (I + 1 == count) {
      std::get<I>(layers_).forward(in, last);
    } else {
      acts_[I].resize(rows_, cols_[I + 1]);
      std::get<I>(layers_).forward(in, acts_[I].view());
      forward_from<I + 1>(acts_[I].view(), last);
    }
  }

  template <std::size_t I>
  void backward_from(matrix_view<const T> dy, matrix_view<T> dx_first) {
    if constexpr (I == 0) {
      std::get<0>(layers_).backward(dy, dx_first);
      if (hook_) hook_(0);
    } else {
      // Two buffers in turn: layer I writes one while reading the other.
      auto& g = grads_[I % 2];
      const index_t need = rows_ * cols_[I];
      if (g.size() < need) g.resize_discard(need);
      const matrix_view<T> dx = as_matrix(g.data(), rows_, cols_[I]);
      std::get<I>(layers_).backward(dy, dx);
      if (hook_) hook_(I);
      backward_from<I - 1>(dx, dx_first);
    }
  }

  std::tuple<Layers...> layers_;
  using space = typename backend::memory_space;
  std::array<matrix<T, space>, count> acts_{};  // [count - 1] only for forward(x)
  std::array<buffer<T, space>, 2> grads_{};
  std::array<index_t, count + 1> cols_{};
  index_t rows_ = 0;
  bool has_input_ = false;
  std::function<void(std::size_t)> hook_, fwd_hook_;
};

template <class L0, class... Ls>
sequential(L0, Ls...) -> sequential<typename L0::value_type, L0, Ls...>;

namespace detail {
/// b[i, :] += a[i, :], a row and a range of its columns per call.
template <class T>
struct add_rows_kernel {
  matrix_view<const T> a;
  matrix_view<T> b;
  SEMOE_HD void operator()(index_t i, index_t j0, index_t j1) const {
    const T* ai = a.row(i);
    T* bi = b.row(i);
    for (index_t j = j0; j < j1; ++j) bi[j] += ai[j];
  }
};
}  // namespace detail

/// y = x + body(x): a pre-norm transformer block is
/// residual<T, layer_norm<T>, moe_layer<...>>. The body must keep the width.
template <class T, class... Layers>
class residual {
 public:
  using policy_kind = module_tag;
  using value_type = T;
  using body_type = sequential<T, Layers...>;
  /// The backend of the first layer of the body; the skip path runs there.
  using backend = module_backend_t<std::tuple_element_t<0, std::tuple<Layers...>>>;

  explicit residual(typename backend::executor& ex, Layers... layers) : ex_(&ex), body_(std::move(layers)...) {}

  body_type& body() { return body_; }
  const body_type& body() const { return body_; }
  template <std::size_t I>
  auto& get() { return body_.template get<I>(); }
  template <class F>
  void for_each_layer(F&& f) { body_.for_each_layer(std::forward<F>(f)); }

  index_t output_cols(index_t input_cols) const {
    const index_t out = body_.output_cols(input_cols);
    SEMOE_CHECK(out == input_cols, "semoe::residual: the body maps ", input_cols, " columns to ", out,
                "; a residual block needs them equal");
    return out;
  }

  /// y must not alias x.
  void forward(matrix_view<const T> x, matrix_view<T> y) {
    const index_t c = output_cols(x.cols());
    check_shape(y, x.rows(), c, "semoe::residual::forward: y");
    body_.forward(x, y);
    add_into(x, y);
  }

  void backward(matrix_view<const T> dy, matrix_view<T> dx = {}) {
    body_.backward(dy, dx);
    if (dx.rows() != 0) add_into(dy, dx);  // the skip path passes dy through
  }

  param_list<T> parameters() { return body_.parameters(); }
  void zero_grad() { body_.zero_grad(); }
  void train(bool on) { body_.train(on); }
  void end_step() { body_.end_step(); }
  T aux_loss() const { return body_.aux_loss(); }

 private:
  void add_into(matrix_view<const T> a, matrix_view<T> b) {
    ex_->parallel_rows(a.rows(), a.cols(), detail::add_rows_kernel<T>{a, b},
                      std::max<index_t>(1, 16384 / std::max<index_t>(a.cols(), 1)));
  }

  typename backend::executor* ex_;
  body_type body_;
};

template <class L0, class... Ls>
residual(typename module_backend_t<L0>::executor&, L0, Ls...) -> residual<typename L0::value_type, L0, Ls...>;

}  // namespace semoe::layer
