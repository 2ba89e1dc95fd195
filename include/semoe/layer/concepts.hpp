// semoe/layer/concepts.hpp: the Module contract shared by the dense layers,
// the MoE layer and the containers (sequential, residual), plus helpers that
// call a module's optional members when it has them.
#pragma once

#include <concepts>
#include <type_traits>

#include "semoe/core/backend.hpp"
#include "semoe/core/config.hpp"
#include "semoe/core/parameter.hpp"
#include "semoe/core/tensor.hpp"

namespace semoe::layer {

/// The backend a module runs on: its `backend` member, or the cpu backend for
/// modules that do not name one (user modules written before backends).
template <class L>
struct module_backend {
  using type = cpu;
};
template <class L>
  requires requires { typename L::backend; }
struct module_backend<L> {
  using type = typename L::backend;
};
template <class L>
using module_backend_t = typename module_backend<L>::type;

/// Opt-in tag: a type is a module because it says so (`using policy_kind =
/// semoe::layer::module_tag;`), not because its member names happen to fit.
struct module_tag {};

namespace detail {

template <class M>
concept tagged_module = requires { typename M::policy_kind; } &&
                        std::same_as<typename M::policy_kind, module_tag>;

template <class M>
concept has_value_type = requires { typename M::value_type; };

template <class M, class T>
concept value_type_is = has_value_type<M> && (std::is_void_v<T> || std::same_as<typename M::value_type, T>);

template <class M>
concept has_output_cols = requires(const M& m, index_t c) {
  { m.output_cols(c) } -> std::same_as<index_t>;
};

template <class M>
concept has_forward = has_value_type<M> &&
    requires(M& m, matrix_view<const typename M::value_type> x, matrix_view<typename M::value_type> y) {
      m.forward(x, y);
    };

template <class M>
concept has_backward = has_value_type<M> &&
    requires(M& m, matrix_view<const typename M::value_type> dy, matrix_view<typename M::value_type> dx) {
      m.backward(dy, dx);
    };

template <class M>
concept has_parameters = has_value_type<M> && requires(M& m) {
  { m.parameters() } -> std::same_as<param_list<typename M::value_type>>;
};

template <class M>
concept has_zero_grad = requires(M& m) { m.zero_grad(); };

}  // namespace detail

/// A layer of a network over rows of T:
///   output_cols(c)    the output width for input width c; throws semoe::error if c is wrong
///   forward(x, y)     x [n, in] stays valid (the caller keeps it) until backward
///   backward(dy, dx)  accumulates (+=) parameter gradients and overwrites dx;
///                     a dx with 0 rows means "not needed" and is skipped
///   parameters()      param_refs to values and gradients
///   zero_grad()
/// Optional, found with `requires`: train(bool), aux_loss(), end_step().
template <class M>
concept Module = detail::tagged_module<M> && detail::has_value_type<M> && detail::has_output_cols<M> &&
                 detail::has_forward<M> && detail::has_backward<M> && detail::has_parameters<M> &&
                 detail::has_zero_grad<M> && std::movable<M>;

/// Fix-it diagnostics: one sentence per missing piece of Module (and, when T is
/// given, a value_type mismatch). Returns true so it can sit in a
/// static_assert; the sentences come from the asserts inside.
template <class M, class T = void>
consteval bool check_module() {
  static_assert(detail::tagged_module<M>,
                "semoe::sequential: every layer must declare `using policy_kind = semoe::layer::module_tag;`; "
                "see layer/concepts.hpp");
  static_assert(detail::has_value_type<M>,
                "semoe::sequential: every layer must declare `using value_type = T;`; see layer/concepts.hpp");
  static_assert(!detail::has_value_type<M> || detail::value_type_is<M, T>,
                "semoe::sequential: every layer must have the value_type of the container; see layer/concepts.hpp");
  static_assert(detail::has_output_cols<M>,
                "semoe::sequential: every layer must provide `index_t output_cols(index_t) const`; "
                "see layer/concepts.hpp");
  static_assert(detail::has_forward<M>,
                "semoe::sequential: every layer must provide forward(x, y); see layer/concepts.hpp");
  static_assert(detail::has_backward<M>,
                "semoe::sequential: every layer must provide backward(dy, dx); see layer/concepts.hpp");
  static_assert(detail::has_parameters<M>,
                "semoe::sequential: every layer must provide parameters() returning param_list<value_type>; "
                "see layer/concepts.hpp");
  static_assert(detail::has_zero_grad<M>,
                "semoe::sequential: every layer must provide zero_grad(); see layer/concepts.hpp");
  static_assert(std::movable<M>, "semoe::sequential: every layer must be movable; see layer/concepts.hpp");
  return true;
}

/// m.aux_loss() if the module has one (MoE balance losses), else 0.
template <class M>
auto aux_loss_of(const M& m) {
  using T = typename M::value_type;
  if constexpr (requires { m.aux_loss(); })
    return static_cast<T>(m.aux_loss());
  else
    return T(0);
}

/// m.train(on) if the module distinguishes training from evaluation.
template <class M>
void train_mode(M& m, bool on) {
  if constexpr (requires { m.train(on); }) m.train(on);
}

/// m.end_step() if the module keeps per-step state (dropout's counter, load stats).
template <class M>
void end_step_of(M& m) {
  if constexpr (requires { m.end_step(); }) m.end_step();
}

}  // namespace semoe::layer
