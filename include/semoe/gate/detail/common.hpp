// semoe/gate/detail/common.hpp: checks and steps every gate's route() shares.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/executor.hpp"
#include "semoe/core/random.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/gate/balance.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate::detail {

/// k choices per token over `experts`, or an error naming both.
inline index_t check_choices(const char* gate, index_t k, index_t experts) {
  SEMOE_CHECK(experts >= 1, gate, ": experts = ", experts, ": expected at least 1");
  SEMOE_CHECK(k <= experts, gate, ": k = ", k, " exceeds experts = ", experts);
  return k;
}

/// The fields every gate's options share.
template <class O>
void validate_common(const char* gate, const O& o) {
  SEMOE_CHECK(o.dropless || (o.capacity_factor > 0 && std::isfinite(o.capacity_factor)), gate,
              ": options.capacity_factor = ", o.capacity_factor, ": expected a finite value > 0 (or dropless = true)");
  if constexpr (requires { o.eval_capacity_factor; })
    SEMOE_CHECK(o.dropless || (o.eval_capacity_factor > 0 && std::isfinite(o.eval_capacity_factor)), gate,
                ": options.eval_capacity_factor = ", o.eval_capacity_factor,
                ": expected a finite value > 0 (or dropless = true)");
  if constexpr (requires { o.min_capacity; })
    SEMOE_CHECK(o.min_capacity >= 0, gate, ": options.min_capacity = ", o.min_capacity, ": expected a value >= 0");
  SEMOE_CHECK(o.drop == drop_policy::position || o.drop == drop_policy::probability, gate, ": options.drop = ",
              static_cast<int>(o.drop), ": expected drop_policy::position or drop_policy::probability");
  validate_balance(gate, o.balance, o.aux_loss_coef, o.z_loss_coef, o.bias_rate);
}

/// Checks of the route context shared by every route(). Returns the context
/// with global_tokens filled in when a single rank left it at 0.
inline route_context check_context(const char* gate, const route_context& ctx, index_t n) {
  route_context g = ctx;
  if (g.global_tokens == 0 && g.ranks == 1) g.global_tokens = n;
  SEMOE_CHECK(g.ranks >= 1 && g.rank >= 0 && g.rank < g.ranks, gate, ": route_context.rank = ", g.rank,
              " of ranks = ", g.ranks, ": expected 0 <= rank < ranks");
  SEMOE_CHECK(g.token_offset >= 0 && g.token_offset + n <= g.global_tokens, gate,
              ": route_context.global_tokens = ", g.global_tokens, ", token_offset = ", g.token_offset,
              ": expected token_offset + tokens (", n, ") <= global_tokens");
  return g;
}

/// The first non-finite logit, named, as a semoe::error.
template <class T>
void check_finite(const char* gate, matrix_view<const T> logits) {
  for (index_t t = 0; t < logits.rows(); ++t)
    for (index_t e = 0; e < logits.cols(); ++e)
      if (!std::isfinite(logits(t, e)))
        ::semoe::detail::fail(gate, ": gate logits contain NaN or Inf at token ", t, ", expert ", e, " (value ",
                              logits(t, e), ")");
}

/// Checks shared by every route(), then plan.reset. Returns the context with
/// global_tokens filled in when a single rank left it at 0.
template <class T>
route_context begin_route(const char* gate, const route_context& ctx, matrix_view<const T> logits,
                          routing_plan<T>& plan, index_t k) {
  const index_t n = logits.rows();
  // A rank may hold no tokens in a step when its peers do: it still joins
  // every collective of the routing. An empty batch over all ranks is an error.
  SEMOE_CHECK(n > 0 || (ctx.ranks > 1 && ctx.global_tokens > 0), gate,
              ": empty batch: logits have 0 tokens; expected at least 1");
  check_finite(gate, logits);
  const route_context g = check_context(gate, ctx, n);
  plan.reset(n, logits.cols(), k);
  return g;
}

/// begin_route for logits and a plan in the memory of executor `ex`: a
/// kernel looks for non-finite logits, and only then do they come to the
/// host to be named.
template <Executor Exec, class T, class Space>
route_context begin_route(Exec& ex, const char* gate, const route_context& ctx, matrix_view<const T> logits,
                          routing_plan<T, Space>& plan, index_t k) {
  if constexpr (Space::host_accessible && !Exec::on_device) {
    return begin_route(gate, ctx, logits, plan, k);
  } else {
    const index_t n = logits.rows(), E = logits.cols();
    SEMOE_CHECK(n > 0 || (ctx.ranks > 1 && ctx.global_tokens > 0), gate,
                ": empty batch: logits have 0 tokens; expected at least 1");
    buffer<std::uint32_t, Space> flag(1);
    flag.zero();
    ex.parallel_for(n, nonfinite_kernel<T>{logits.data(), logits.ld(), E, flag.data()}, 64);
    std::uint32_t bad = 0;
    ex.copy(&bad, flag.data(), sizeof bad);
    if (bad) {
      std::vector<T> host(static_cast<std::size_t>(n * logits.ld()));
      ex.copy(host.data(), logits.data(), host.size() * sizeof(T));
      check_finite(gate, matrix_view<const T>(host.data(), {n, E}, {logits.ld(), 1}));
    }
    const route_context g = check_context(gate, ctx, n);
    plan.reset(n, E, k);
    return g;
  }
}

/// Shape checks shared by every backward().
template <class T, class Space>
void check_backward(const char* gate, matrix_view<const T> logits, const routing_plan<T, Space>& plan,
                    std::span<const T> dweight, matrix_view<T> dlogits) {
  SEMOE_CHECK(plan.tokens == logits.rows() && plan.experts == logits.cols(), gate,
              ": backward: the plan routes [", plan.tokens, ", ", plan.experts, "] but logits are [", logits.rows(),
              ", ", logits.cols(), "]; expected the plan route() made from these logits");
  SEMOE_CHECK(static_cast<index_t>(dweight.size()) == plan.assignments(), gate, ": backward: dweight has ",
              dweight.size(), " values; expected tokens * k = ", plan.assignments());
  check_shape(dlogits, plan.tokens, plan.experts, "semoe::gate: backward: dlogits");
}

/// check_backward, then dlogits = 0 (host memory).
template <class T>
void begin_backward(const char* gate, matrix_view<const T> logits, const routing_plan<T>& plan,
                    std::span<const T> dweight, matrix_view<T> dlogits) {
  check_backward(gate, logits, plan, dweight, dlogits);
  for (index_t t = 0; t < plan.tokens; ++t)
    for (index_t e = 0; e < plan.experts; ++e) dlogits(t, e) = T(0);
}

/// Capacity of the plan (0: dropless), then the group-wide capacity limit.
/// Outside training, gates that have one use eval_capacity_factor (GShard
/// evaluates with a larger capacity: dropping a token costs accuracy there,
/// and no gradient step needs the compute bound). Options with min_capacity
/// (DeepSpeed's) never let an expert's capacity fall below it: small batches
/// would otherwise drop most of what they route.
template <class Exec, class T, class Space, class O>
void apply_capacity(Exec& ex, const route_context& ctx, routing_plan<T, Space>& plan, const O& o) {
  double factor = o.capacity_factor;
  if constexpr (requires { o.eval_capacity_factor; })
    if (!ctx.training) factor = o.eval_capacity_factor;
  plan.capacity = o.dropless ? 0 : expert_capacity(factor, ctx.global_tokens, plan.k, plan.experts);
  if constexpr (requires { o.min_capacity; })
    if (plan.capacity > 0) plan.capacity = std::max<index_t>(plan.capacity, o.min_capacity);
  limit_by_capacity(ex, plan, ctx, o.drop);
}
template <class T, class O>
void apply_capacity(const route_context& ctx, routing_plan<T>& plan, const O& o) {
  sequential_executor seq;
  apply_capacity(seq, ctx, plan, o);
}

/// Gate noise is a pure function of (seed, step, global token, expert, use),
/// so it is the same however the batch is split over ranks.
enum class noise_use : std::uint64_t { gshard_second = 1, noisy_logits = 2 };

inline philox noise_source(const route_context& ctx, noise_use use) {
  return philox(ctx.seed ^ (static_cast<std::uint64_t>(use) * 0x9E3779B97F4A7C15ull), ctx.step);
}
inline std::uint64_t noise_counter(const route_context& ctx, index_t t, index_t experts, index_t e) {
  return static_cast<std::uint64_t>(ctx.token_offset + t) * static_cast<std::uint64_t>(experts) +
         static_cast<std::uint64_t>(e);
}

}  // namespace semoe::gate::detail
