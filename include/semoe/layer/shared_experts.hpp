// semoe/layer/shared_experts.hpp: a MoE layer with always-on shared experts
// beside the routed ones (DeepSeekMoE, Qwen-MoE):
//
//   y = moe(x) + s(x) * shared(x),   s(x) = sigmoid(x . w_s) when gated, else 1
//
// `shared` is one expert of the MoE layer's expert type over every token,
// with its own width (DeepSeek-V3's n_shared_experts experts of width f are
// one expert of width n * f: their outputs add up). Its block and w_s are
// dense parameters, replicated on every rank like the router.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>

#include "semoe/core/blas.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/parameter.hpp"
#include "semoe/core/random.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/expert/concepts.hpp"
#include "semoe/layer/concepts.hpp"

namespace semoe::layer {

namespace detail {

/// gate[t] = sigmoid(gate[t]) (the logits x . w_s, in place), evaluated in double.
template <class T>
struct sigmoid_in_place_kernel {
  T* gate;
  SEMOE_HD void operator()(index_t t) const {
    gate[t] = static_cast<T>(1.0 / (1.0 + ::exp(-static_cast<double>(gate[t]))));
  }
};

/// y[t, :] += gate[t] * s[t, :] (gate null: 1).
template <class T>
struct add_shared_kernel {
  matrix_view<T> y;
  matrix_view<const T> s;
  const T* gate;
  SEMOE_HD void operator()(index_t t, index_t j0, index_t j1) const {
    const T g = gate ? gate[t] : T(1);
    for (index_t j = j0; j < j1; ++j) y(t, j) += g * s(t, j);
  }
};

/// Backward of the gate, one token per index: ds[t, :] = g dy[t, :] and
/// dlogit[t] = (dy[t, :] . s[t, :]) g (1 - g), the dot in order, in double.
template <class T>
struct shared_gate_backward_kernel {
  matrix_view<const T> dy, s;
  const T* gate;
  matrix_view<T> ds;
  T* dlogit;
  SEMOE_HD void operator()(index_t t) const {
    const T g = gate[t];
    double dot = 0;
    for (index_t j = 0; j < dy.cols(); ++j) {
      dot += static_cast<double>(dy(t, j)) * static_cast<double>(s(t, j));
      ds(t, j) = g * dy(t, j);
    }
    dlogit[t] = static_cast<T>(dot * static_cast<double>(g) * (1.0 - static_cast<double>(g)));
  }
};

}  // namespace detail

/// `MoE` (a basic_moe_layer) plus shared experts. The MoE layer inside is
/// moe(); containers, trainers and checkpoints find it there.
template <class MoE>
class with_shared_experts {
 public:
  using T = typename MoE::value_type;
  using value_type = T;
  using policy_kind = module_tag;
  using backend = typename MoE::backend;
  using executor = typename backend::executor;
  using space = typename backend::memory_space;
  using expert_type = typename MoE::expert_type;

  struct options {
    typename MoE::options moe{};
    index_t shared_ffn = 0;  ///< width of the shared expert (all shared experts together)
    bool gated = false;      ///< scale it by sigmoid(x . w_s) per token (Qwen-MoE); DeepSeek's is ungated
  };

  static void validate(const options& o) {
    SEMOE_CHECK(o.shared_ffn > 0, "semoe::layer::with_shared_experts: options.shared_ffn = ", o.shared_ffn,
                ": expected > 0 (a MoE layer without shared experts needs no wrapper)");
  }

  /// Builds the MoE layer from o.moe (store: as the MoE layer's constructor)
  /// and the shared expert, initialized by its own init from o.moe.seed.
  template <class Comm, class... Store>
  with_shared_experts(executor& ex, Comm& comm, const options& o, Store&&... store)
      : ex_(&ex),
        moe_(ex, comm, o.moe, std::forward<Store>(store)...),
        gated_(o.gated),
        expert_((validate(o), expert::with_layer_sizes(o.moe.expert, o.moe.hidden, o.shared_ffn))) {
    const index_t H = o.moe.hidden;
    const index_t n = expert_.block_elems();
    buffer<T> host(n);
    expert_.init(host.span(), philox(o.moe.seed, 0x5a4ed), 0);
    block_.resize_discard(n);
    ex.copy(block_.data(), host.data(), host.bytes());
    block_grad_.resize_discard(n);
    block_grad_.zero();
    if (gated_) {
      host.resize_discard(H);
      const philox rng(o.moe.seed, 0x5a4e6);  // PyTorch's Linear init: U(+-1/sqrt(in))
      const T bound = T(1) / std::sqrt(static_cast<T>(H));
      for (index_t j = 0; j < H; ++j)
        host[j] = bound * (T(2) * static_cast<T>(rng.uniform(static_cast<std::uint64_t>(j))) - T(1));
      gate_w_.resize_discard(H);
      ex.copy(gate_w_.data(), host.data(), host.bytes());
      gate_grad_.resize_discard(H);
      gate_grad_.zero();
    }
  }

  MoE& moe() { return moe_; }
  const MoE& moe() const { return moe_; }
  const expert_type& shared_expert() const { return expert_; }
  /// The shared expert's parameter block, in the expert type's layout.
  std::span<T> shared_block() { return block_.span(); }
  /// w_s [hidden]; empty when not gated.
  std::span<T> shared_gate() { return gate_w_.span(); }
  bool gated() const { return gated_; }

  index_t output_cols(index_t input_cols) const { return moe_.output_cols(input_cols); }

  void forward(matrix_view<const T> x, matrix_view<T> y) {
    moe_.forward(x, y);
    const index_t n = x.rows(), H = x.cols();
    x_ = x;
    has_input_ = true;
    resize(n);
    const index_t offsets[2] = {0, n};
    T* params[1] = {block_.data()};
    T* grads[1] = {block_grad_.data()};
    const expert::expert_batch<T> b{
        offsets, params, grads, x, saved_.matrix(n, expert_.saved_cols()), work_.matrix(n, expert_.work_cols())};
    expert_.forward(*ex_, b, out_.matrix(n, H));
    const T* g = nullptr;
    if (gated_) {
      blas::gemm(*ex_, blas::op::n, blas::op::t, T(1), x, matrix_view<const T>(gate_w_.matrix(1, H)), T(0),
                 gate_.matrix(n, 1));
      ex_->parallel_for(n, detail::sigmoid_in_place_kernel<T>{gate_.data()});
      g = gate_.data();
    }
    ex_->parallel_rows(n, H, detail::add_shared_kernel<T>{y, matrix_view<const T>(out_.matrix(n, H)), g}, grain(H));
  }

  void backward(matrix_view<const T> dy, matrix_view<T> dx) {
    const index_t n = x_.rows(), H = x_.cols();
    SEMOE_CHECK(has_input_, "semoe::layer::with_shared_experts::backward: called before forward");
    SEMOE_CHECK(dy.rows() == n, "semoe::layer::with_shared_experts::backward: dy has ", dy.rows(),
                " rows; expected the ", n, " of the last forward");
    moe_.backward(dy, dx);
    matrix_view<const T> ds = dy;
    if (gated_) {
      detail::shared_gate_backward_kernel<T> k{dy, matrix_view<const T>(out_.matrix(n, H)), gate_.data(),
                                               dshared_.matrix(n, H), dgate_.data()};
      ex_->parallel_for(n, k);
      const auto dg = matrix_view<const T>(dgate_.matrix(n, 1));
      blas::gemm(*ex_, blas::op::t, blas::op::n, T(1), dg, x_, T(1), gate_grad_.matrix(1, H));
      if (dx.rows() != 0)
        blas::gemm(*ex_, blas::op::n, blas::op::n, T(1), dg, matrix_view<const T>(gate_w_.matrix(1, H)), T(1), dx);
      ds = dshared_.matrix(n, H);
    }
    const index_t offsets[2] = {0, n};
    T* params[1] = {block_.data()};
    T* grads[1] = {block_grad_.data()};
    const expert::expert_batch<T> b{
        offsets, params, grads, x_, saved_.matrix(n, expert_.saved_cols()), work_.matrix(n, expert_.work_cols())};
    expert_.backward(*ex_, b, ds, out_.matrix(n, H));  // out_ is free now: the shared dx
    if (dx.rows() != 0)
      ex_->parallel_rows(n, H, detail::add_shared_kernel<T>{dx, matrix_view<const T>(out_.matrix(n, H)), nullptr},
                         grain(H));
  }

  /// The MoE layer's ("router.weight"), then "shared_expert.block" and, when
  /// gated, "shared_expert_gate.weight".
  param_list<T> parameters() {
    auto p = moe_.parameters();
    p.push_back({"shared_expert.block", block_.span(), block_grad_.span(), param_kind::dense});
    if (gated_) p.push_back({"shared_expert_gate.weight", gate_w_.span(), gate_grad_.span(), param_kind::dense});
    return p;
  }

  void zero_grad() {
    moe_.zero_grad();
    block_grad_.zero();
    gate_grad_.zero();
  }
  void train(bool on) { moe_.train(on); }
  T aux_loss() const { return moe_.aux_loss(); }
  void end_step() { moe_.end_step(); }

 private:
  static index_t grain(index_t cols) { return std::max<index_t>(1, 16384 / std::max<index_t>(cols, 1)); }

  void resize(index_t n) {
    const index_t H = x_.cols();
    saved_.resize_discard(n * expert_.saved_cols());
    work_.resize_discard(n * expert_.work_cols());
    out_.resize_discard(n * H);
    if (gated_) {
      gate_.resize_discard(n);
      dgate_.resize_discard(n);
      dshared_.resize_discard(n * H);
    }
  }

  executor* ex_;
  MoE moe_;
  bool gated_;
  expert_type expert_;
  buffer<T, space> block_, block_grad_, gate_w_, gate_grad_;
  buffer<T, space> saved_, work_, out_, gate_, dgate_, dshared_;
  matrix_view<const T> x_{};
  bool has_input_ = false;
};

}  // namespace semoe::layer
