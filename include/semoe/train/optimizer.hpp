// semoe/train/optimizer.hpp: SGD and AdamW over a model's dense parameters and
// its experts' blocks, gradient reduction over data-parallel ranks, and
// clipping by the global norm (dense norm plus expert norms reduced over the
// expert-parallel ranks, so every rank scales by the same factor).
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <span>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/backend.hpp"
#include "semoe/core/parameter.hpp"
#include "semoe/storage/concepts.hpp"

namespace semoe::train {

namespace detail {
/// What for_each_moe_layer probes containers with (a named functor: nvcc
/// rejects lambdas inside requires-expressions).
struct probe_layer_visitor {
  template <class L>
  void operator()(L&) const {}
};
}  // namespace detail

/// f(layer) for every MoE layer inside model (sequential and residual nest;
/// a module that wraps one, as layer::with_shared_experts does, shows it as moe()).
template <class Model, class F>
void for_each_moe_layer(Model& m, F&& f) {
  if constexpr (requires { m.store(); m.layer_id(); m.local_experts(); }) {
    f(m);
  } else if constexpr (requires { m.moe(); }) {
    for_each_moe_layer(m.moe(), f);
  } else if constexpr (requires { m.for_each_layer(detail::probe_layer_visitor{}); }) {
    m.for_each_layer([&](auto& l) { for_each_moe_layer(l, f); });
  }
}

namespace detail {
/// Blocks the optimizer pass asks ahead for: the layer's prefetch policy says
/// (prefetch::on_demand: none).
template <class Layer>
constexpr index_t read_ahead_of() {
  if constexpr (requires { Layer::prefetch_type::read_ahead; })
    return Layer::prefetch_type::read_ahead;
  else
    return 0;
}
}  // namespace detail


/// Whether f of for_each_expert_block changes the blocks.
enum class block_access { read, write };

/// f(block_ref, store) for every local expert block of every MoE layer in
/// model, on the whole block where its optimizer state lives (host DRAM for
/// offloaded blocks, as ZeRO-Offload updates them). A store that can prefetch
/// is asked for the next blocks to host memory while f runs on this one.
template <class Layer, class F>
void for_each_layer_block(Layer& layer, F&& f, block_access access = block_access::write);

template <class Model, class F>
void for_each_expert_block(Model& m, F&& f, block_access access = block_access::write) {
  for_each_moe_layer(m, [&](auto& layer) { for_each_layer_block(layer, f, access); });
}

/// f(block_ref, store) for every local expert block of one MoE layer.
template <class Layer, class F>
void for_each_layer_block(Layer& layer, F&& f, block_access access) {
  {
    auto& store = layer.store();
    const index_t L = layer.local_experts(), id = layer.layer_id();
    using layer_t = std::remove_cvref_t<decltype(layer)>;
    constexpr index_t ahead = detail::read_ahead_of<layer_t>();
    for (index_t i = 0; i < L; ++i) {
      if constexpr (ahead > 0 && requires { store.prefetch(id, i, storage::tier_level::host); })
        for (index_t a = i + 1; a < std::min(L, i + 1 + ahead); ++a) store.prefetch(id, a, storage::tier_level::host);
      auto g = [&](storage::block_ref<typename std::remove_cvref_t<decltype(store)>::value_type> blk) { f(blk, store); };
      if constexpr (requires { store.visit(id, i, g, true); })
        store.visit(id, i, g, access == block_access::write);
      else
        store.visit(id, i, g);
    }
  }
}

namespace detail {
/// The memory a model's parameters live in: its backend's (host for models
/// that name no backend).
template <class Model>
struct model_space {
  using type = host_space;
};
template <class Model>
  requires requires { typename Model::backend::memory_space; }
struct model_space<Model> {
  using type = typename Model::backend::memory_space;
};

/// f(span) on the host: the span itself when the host can read its memory,
/// else a host copy (written back when `write_back`). Gradient clipping on a
/// device backend goes this way: correct, not fast.
template <class Space, class U, class F>
void on_host(std::span<U> v, bool write_back, F&& f) {
  if constexpr (Space::host_accessible) {
    f(v);
  } else {
    std::vector<std::remove_const_t<U>> h(v.size());
    copy_bytes<host_space, Space>(h.data(), v.data(), v.size_bytes());
    f(std::span<std::remove_const_t<U>>(h));
    if (write_back) copy_bytes<Space, host_space>(v.data(), h.data(), v.size_bytes());
  }
}
}  // namespace detail

/// Sum replicated dense gradients over the data-parallel ranks of `comm`,
/// fused into one flat buffer so the reduction is one collective, not one per
/// tensor. Sharded parameters are skipped: their gradients are complete.
template <class Model, class Comm>
void reduce_dense_grads(Model& m, Comm& comm) {
  if (comm.size() == 1) return;
  auto params = m.parameters();
  std::erase_if(params, [](const auto& p) { return p.scope == param_scope::sharded; });
  using T = typename decltype(params)::value_type::value_type;
  index_t n = 0;
  for (auto& p : params) n += static_cast<index_t>(p.grad.size());
  using space = typename detail::model_space<Model>::type;  // device gradients go through the host
  buffer<T> flat(n);
  index_t off = 0;
  for (auto& p : params) {
    copy_bytes<host_space, space>(flat.data() + off, p.grad.data(), p.grad.size_bytes());
    off += static_cast<index_t>(p.grad.size());
  }
  comm::all_reduce(comm, flat.span());
  off = 0;
  for (auto& p : params) {
    copy_bytes<space, host_space>(p.grad.data(), flat.data() + off, p.grad.size_bytes());
    off += static_cast<index_t>(p.grad.size());
  }
}

/// The global gradient norm: replicated dense gradients (already reduced, so
/// the same on every rank), plus every expert's gradients summed over the
/// expert-parallel group `experts`, plus sharded dense gradients summed over
/// the data-parallel group `shards` they are split across.
template <class Model, class ExpertComm, class ShardComm>
double grad_norm(Model& m, ExpertComm& experts, ShardComm& shards) {
  using space = typename detail::model_space<Model>::type;
  double sq[3] = {0, 0, 0};  // replicated, experts, sharded
  auto add = [](double& acc) {
    return [&acc]<class U>(std::span<U> g) {
      for (auto v : g) acc += static_cast<double>(v) * static_cast<double>(v);
    };
  };
  for (auto& p : m.parameters()) detail::on_host<space>(p.grad, false, add(sq[p.scope == param_scope::sharded ? 2 : 0]));
  for_each_expert_block(
      m, [&](auto& blk, auto&) { detail::on_host<space>(blk.grads, false, add(sq[1])); }, block_access::read);
  if (experts.size() > 1) comm::all_reduce(experts, std::span<double>(&sq[1], 1));
  if (shards.size() > 1) comm::all_reduce(shards, std::span<double>(&sq[2], 1));
  return std::sqrt(sq[0] + sq[1] + sq[2]);
}

/// One communicator for both: expert parallelism spans the data-parallel ranks.
template <class Model, class Comm>
double grad_norm(Model& m, Comm& comm) {
  return grad_norm(m, comm, comm);
}

/// Scale every gradient so the global norm is at most max_norm; returns the
/// norm before clipping.
template <class Model, class ExpertComm, class ShardComm>
double clip_grad_norm(Model& m, ExpertComm& experts, ShardComm& shards, double max_norm) {
  SEMOE_CHECK(max_norm > 0, "semoe::train::clip_grad_norm: max_norm = ", max_norm, ": expected > 0");
  const double norm = grad_norm(m, experts, shards);
  SEMOE_CHECK(std::isfinite(norm), "semoe::train::clip_grad_norm: the gradient norm is ", norm,
              " (NaN or Inf in a gradient)");
  if (norm > max_norm) {
    const double s = max_norm / (norm + 1e-6);
    using space = typename detail::model_space<Model>::type;
    auto scale = [s]<class U>(std::span<U> g) {
      for (auto& v : g) v = static_cast<U>(v * s);
    };
    for (auto& p : m.parameters()) detail::on_host<space>(p.grad, true, scale);
    for_each_expert_block(m, [&](auto& blk, auto&) { detail::on_host<space>(blk.grads, true, scale); });
  }
  return norm;
}

template <class Model, class Comm>
double clip_grad_norm(Model& m, Comm& comm, double max_norm) {
  return clip_grad_norm(m, comm, comm, max_norm);
}

namespace detail {

template <class T>
struct sgd_kernel {
  T* p;
  const T* g;
  T* mom;  // null without momentum
  T lr, momentum, wd;
  SEMOE_HD void operator()(index_t i) const {
    T d = g[i] + wd * p[i];
    if (mom) d = mom[i] = momentum * mom[i] + d;
    p[i] -= lr * d;
  }
};

/// AdamW (Loshchilov & Hutter): decoupled weight decay, bias-corrected moments.
template <class T>
struct adamw_kernel {
  T* p;
  const T* g;
  T* m;
  T* v;
  T lr, b1, b2, eps, wd, bc1, bc2;
  SEMOE_HD void operator()(index_t i) const {
    const T gi = g[i];
    m[i] = b1 * m[i] + (T(1) - b1) * gi;
    v[i] = b2 * v[i] + (T(1) - b2) * gi * gi;
    const T mh = m[i] / bc1, vh = v[i] / bc2;
    p[i] -= lr * (mh / (std::sqrt(vh) + eps) + wd * p[i]);
  }
};

}  // namespace detail

/// Optimizer state of dense parameters lives in the optimizer; that of expert
/// blocks lives in the block's `state` slots inside the store, next to the
/// weights, so a tiered store moves it with them.
template <class T, class Derived, Backend B>
class optimizer_base {
 public:
  using backend = B;
  using state_buffer = buffer<T, typename B::memory_space>;

  explicit optimizer_base(typename B::executor& ex) : ex_(&ex) {}

  /// One update of every dense parameter and every local expert block.
  template <class Model>
  void step(Model& m) {
    ++t_;
    auto params = m.parameters();
    const index_t slots = Derived::state_slots;
    if (dense_state_.size() != params.size()) dense_state_.assign(params.size(), state_buffer());
    for (std::size_t i = 0; i < params.size(); ++i) {
      auto& p = params[i];
      auto& st = dense_state_[i];
      if (st.size() != slots * static_cast<index_t>(p.value.size())) {
        st.resize_discard(slots * static_cast<index_t>(p.value.size()));
        st.zero();
      }
      self().update(*ex_, p.value, p.grad, st.span());
    }
    for_each_moe_layer(m, [&](auto& layer) {
      if (std::find(early_.begin(), early_.end(), static_cast<const void*>(&layer)) != early_.end()) return;
      layer.store().reserve_state(slots);
      for_each_layer_block(layer, [&](auto& blk, auto& store) { update_block(store, blk); }, block_access::write);
    });
    early_.clear();
  }

  /// Update one expert block now, as part of the step() that follows
  /// (which then skips the layer): once an expert's backward is done its
  /// gradients are final, and updating while its block is still close to
  /// compute saves bringing it back. Same arithmetic, same result. Only valid
  /// when nothing changes gradients between backward and step(): no
  /// clipping, no reduction over expert replicas (the trainer checks).
  template <class Layer>
  void update_block_now(Layer& layer, index_t expert) {
    ++t_;  // the count step() is about to use
    layer.store().reserve_state(Derived::state_slots);
    auto& store = layer.store();
    store.visit(layer.layer_id(), expert, [&](storage::block_ref<T> blk) { update_block(store, blk); });
    --t_;
    if (std::find(early_.begin(), early_.end(), static_cast<const void*>(&layer)) == early_.end())
      early_.push_back(&layer);
  }

  std::uint64_t steps() const { return t_; }

  /// For checkpoints: the step count (bias correction) and the state of
  /// every dense parameter, in model.parameters() order (empty before the
  /// first step).
  std::uint64_t& step_count() { return t_; }
  std::vector<state_buffer>& dense_state() { return dense_state_; }
  static constexpr index_t slots() { return Derived::state_slots; }

 protected:
  Derived& self() { return static_cast<Derived&>(*this); }

  /// An expert block where its store keeps its optimizer state: on the
  /// backend's executor when it can reach that memory, else on the host
  /// (a device model over a tiered store: offloaded blocks are updated in
  /// host DRAM, as ZeRO-Offload does).
  template <class Store>
  void update_block(Store&, storage::block_ref<T> blk) {
    if constexpr (accessible_from<storage::visit_space_t<Store>, typename B::executor>) {
      self().update(*ex_, blk.params, blk.grads, blk.state);
    } else {
      if (!host_ex_) host_ex_ = std::make_unique<typename cpu::executor>();
      self().update(*host_ex_, blk.params, blk.grads, blk.state);
    }
  }

  typename B::executor* ex_;
  std::unique_ptr<typename cpu::executor> host_ex_;  // made on first need
  std::uint64_t t_ = 0;
  std::vector<state_buffer> dense_state_;
  std::vector<const void*> early_;  // layers update_block_now() did this step
};

template <class T, Backend B = cpu>
class sgd : public optimizer_base<T, sgd<T, B>, B> {
 public:
  struct options {
    double lr = 0.01;
    double momentum = 0;
    double weight_decay = 0;
  };
  static void validate(const options& o) {
    SEMOE_CHECK(o.lr > 0, "semoe::train::sgd: options.lr = ", o.lr, ": expected > 0");
    SEMOE_CHECK(o.momentum >= 0 && o.momentum < 1, "semoe::train::sgd: options.momentum = ", o.momentum,
                ": expected in [0, 1)");
  }
  static constexpr index_t state_slots = 1;

  sgd(typename B::executor& ex, options o) : optimizer_base<T, sgd<T, B>, B>(ex), opt_(o) { validate(o); }
  void set_lr(double lr) { opt_.lr = lr; }
  double lr() const { return opt_.lr; }

  template <Executor Ex>
  void update(Ex& ex, std::span<T> p, std::span<const T> g, std::span<T> state) {
    ex.parallel_for(static_cast<index_t>(p.size()),
                            detail::sgd_kernel<T>{p.data(), g.data(), opt_.momentum > 0 ? state.data() : nullptr,
                                                  T(opt_.lr), T(opt_.momentum), T(opt_.weight_decay)},
                            4096);
  }

 private:
  options opt_;
};

template <class T, Backend B = cpu>
class adamw : public optimizer_base<T, adamw<T, B>, B> {
 public:
  struct options {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.01;
  };
  static void validate(const options& o) {
    SEMOE_CHECK(o.lr > 0, "semoe::train::adamw: options.lr = ", o.lr, ": expected > 0");
    SEMOE_CHECK(o.beta1 >= 0 && o.beta1 < 1, "semoe::train::adamw: options.beta1 = ", o.beta1, ": expected in [0, 1)");
    SEMOE_CHECK(o.beta2 >= 0 && o.beta2 < 1, "semoe::train::adamw: options.beta2 = ", o.beta2, ": expected in [0, 1)");
    SEMOE_CHECK(o.eps > 0, "semoe::train::adamw: options.eps = ", o.eps, ": expected > 0");
  }
  static constexpr index_t state_slots = 2;

  adamw(typename B::executor& ex, options o) : optimizer_base<T, adamw<T, B>, B>(ex), opt_(o) { validate(o); }
  void set_lr(double lr) { opt_.lr = lr; }
  double lr() const { return opt_.lr; }

  template <Executor Ex>
  void update(Ex& ex, std::span<T> p, std::span<const T> g, std::span<T> state) {
    const auto n = static_cast<index_t>(p.size());
    const double t = static_cast<double>(this->t_);
    ex.parallel_for(n,
                            detail::adamw_kernel<T>{p.data(), g.data(), state.data(), state.data() + n, T(opt_.lr),
                                                    T(opt_.beta1), T(opt_.beta2), T(opt_.eps), T(opt_.weight_decay),
                                                    T(1 - std::pow(opt_.beta1, t)), T(1 - std::pow(opt_.beta2, t))},
                            4096);
  }

 private:
  options opt_;
};

/// Linear warm-up then cosine decay to `floor` x base.
inline double cosine_lr(std::uint64_t step, std::uint64_t total, double base, std::uint64_t warmup = 0,
                        double floor = 0.0) {
  if (step < warmup) return base * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double span = static_cast<double>(total > warmup ? total - warmup : 1);
  const double prog = std::min(1.0, static_cast<double>(step - warmup) / span);
  return base * (floor + (1 - floor) * 0.5 * (1 + std::cos(3.14159265358979323846 * prog)));
}

}  // namespace semoe::train
