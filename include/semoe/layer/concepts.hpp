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

/// The Module contract, one requirement per entry: its sub-concept and its
/// fix-it. T (void: any) is the value_type a container needs. Diagnose =
/// false answers the concept; Diagnose = true stops compilation with the
/// sentence of every broken requirement.
template <class M, class T, bool Diagnose>
constexpr bool module_contract() {
  bool ok = true;
  if constexpr (!tagged_module<M>) {
    static_assert(!Diagnose, "semoe::sequential: every layer must declare `using policy_kind = "
                  "semoe::layer::module_tag;`; see layer/concepts.hpp");
    ok = false;
  }
  if constexpr (!has_value_type<M>) {
    static_assert(!Diagnose, "semoe::sequential: every layer must declare `using value_type = T;`; see "
                  "layer/concepts.hpp");
    ok = false;
  } else if constexpr (!value_type_is<M, T>) {
    static_assert(!Diagnose, "semoe::sequential: every layer must have the value_type of the container; see "
                  "layer/concepts.hpp");
    ok = false;
  }
  if constexpr (!has_output_cols<M>) {
    static_assert(!Diagnose, "semoe::sequential: every layer must provide `index_t output_cols(index_t) const`; "
                  "see layer/concepts.hpp");
    ok = false;
  }
  if constexpr (has_value_type<M> && !has_forward<M>) {
    static_assert(!Diagnose, "semoe::sequential: every layer must provide forward(x, y); see layer/concepts.hpp");
    ok = false;
  }
  if constexpr (has_value_type<M> && !has_backward<M>) {
    static_assert(!Diagnose, "semoe::sequential: every layer must provide backward(dy, dx); see "
                  "layer/concepts.hpp");
    ok = false;
  }
  if constexpr (has_value_type<M> && !has_parameters<M>) {
    static_assert(!Diagnose, "semoe::sequential: every layer must provide parameters() returning "
                  "param_list<value_type>; see layer/concepts.hpp");
    ok = false;
  }
  if constexpr (!has_zero_grad<M>) {
    static_assert(!Diagnose, "semoe::sequential: every layer must provide zero_grad(); see layer/concepts.hpp");
    ok = false;
  }
  if constexpr (!std::movable<M>) {
    static_assert(!Diagnose, "semoe::sequential: every layer must be movable; see layer/concepts.hpp");
    ok = false;
  }
  return ok || Diagnose;
}

}  // namespace detail

/// A layer of a network over rows of T: `using policy_kind = module_tag;`,
/// `using value_type = T;`, movable, and
///   output_cols(c)    the output width for input width c; throws semoe::error if c is wrong
///   forward(x, y)     x [n, in] stays valid (the caller keeps it) until backward
///   backward(dy, dx)  accumulates (+=) parameter gradients and overwrites dx;
///                     a dx with 0 rows means "not needed" and is skipped
///   parameters()      param_refs to values and gradients
///   zero_grad()
/// Optional, found with `requires`: train(bool), aux_loss(), end_step().
/// `static_assert(check_module<M>())` names every requirement a type breaks.
template <class M>
concept Module = detail::module_contract<M, void, false>();

/// Fix-it diagnostics: one sentence per broken requirement of Module (and,
/// when T is given, a value_type other than T). Returns true so it can sit in
/// a static_assert; the sentences come from inside.
template <class M, class T = void>
consteval bool check_module() {
  return detail::module_contract<M, T, true>();
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
