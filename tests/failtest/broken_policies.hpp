// A well-formed expert and gate with one piece taken away, chosen by `Missing`:
// each failtest names the piece and the sentence it expects. A piece is taken
// away by a requires-clause, so the rest stays exactly as a user writes it.
#pragma once

#include <span>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"

namespace failtest {

using semoe::index_t;

enum class missing {
  nothing,
  options_constructor,
  static_block_elems,
  saved_cols,
  work_cols,
  init,
  const_init,
  const_forward,
  backward,
  const_backward,
  choices,
};

template <missing Missing>
struct expert {
  static constexpr bool has(missing m) { return Missing != m; }
  using policy_kind = semoe::expert::expert_tag;
  struct options {
    index_t hidden = 0, ffn = 0;
  };
  expert() = default;
  explicit expert(options) requires(has(missing::options_constructor)) {}
  static index_t block_elems(const options&) requires(has(missing::static_block_elems)) { return 1; }
  index_t block_elems() const { return 1; }
  index_t saved_cols() const requires(has(missing::saved_cols)) { return 0; }
  index_t work_cols() const requires(has(missing::work_cols)) { return 0; }
  template <class T>
  void init(std::span<T>, semoe::philox, index_t) const requires(has(missing::init) && has(missing::const_init)) {}
  template <class T>
  void init(std::span<T>, semoe::philox, index_t) requires(!has(missing::const_init)) {}
  template <class T>
  void forward(semoe::cpu_executor&, const semoe::expert::expert_batch<T>&, semoe::matrix_view<T>) const
      requires(has(missing::const_forward)) {}
  template <class T>
  void forward(semoe::cpu_executor&, const semoe::expert::expert_batch<T>&, semoe::matrix_view<T>)
      requires(!has(missing::const_forward)) {}
  template <class T>
  void backward(semoe::cpu_executor&, const semoe::expert::expert_batch<T>&, semoe::matrix_view<const T>,
                semoe::matrix_view<T>) const requires(has(missing::backward) && has(missing::const_backward)) {}
  template <class T>
  void backward(semoe::cpu_executor&, const semoe::expert::expert_batch<T>&, semoe::matrix_view<const T>,
                semoe::matrix_view<T>) requires(!has(missing::const_backward)) {}
};

template <missing Missing>
struct gate {
  static constexpr bool has(missing m) { return Missing != m; }
  using policy_kind = semoe::gate::gate_tag;
  struct options {};
  gate() = default;
  explicit gate(options) requires(has(missing::options_constructor)) {}
  static void validate(const options&) {}
  index_t choices(index_t) const requires(has(missing::choices)) { return 1; }
  template <class T>
  void route(const semoe::gate::route_context&, semoe::matrix_view<const T>, semoe::gate::routing_plan<T>&) {}
  template <class T>
  void backward(const semoe::gate::route_context&, semoe::matrix_view<const T>, const semoe::gate::routing_plan<T>&,
                std::span<const T>, semoe::matrix_view<T>) const requires(has(missing::const_backward)) {}
  template <class T>
  void backward(const semoe::gate::route_context&, semoe::matrix_view<const T>, const semoe::gate::routing_plan<T>&,
                std::span<const T>, semoe::matrix_view<T>) requires(!has(missing::const_backward)) {}
};

/// A layer built and stepped as a user would, so its constructor, forward and
/// backward are instantiated too: the sentence must still come first.
template <class Gate, class Expert>
int build_layer() {
  semoe::cpu_executor ex({.threads = 1});
  auto comms = semoe::comm::local::make_world(1);
  semoe::moe_layer<semoe::cpu, Gate, Expert> layer(ex, comms[0], {.hidden = 8, .ffn = 16, .experts = 2});
  semoe::matrix<float> x(4, 8), y(4, 8);
  layer.forward(x.view(), y.view());
  layer.backward(y.view(), x.view());
  return 0;
}

}  // namespace failtest
