// A gate's plan is checked before the layer uses it: a gate that forgets
// limit_by_capacity, or names an expert that does not exist, is told which
// field is wrong instead of crashing the layer or routing rows astray.
#include <doctest/doctest.h>

#include <cmath>

#include "semoe/layer/moe_layer.hpp"

using namespace semoe;

namespace {

/// Top-1 by argmax; `mistake` picks what it gets wrong.
struct careless_top1 {
  using policy_kind = gate::gate_tag;
  static constexpr const char* name = "careless_top1";
  enum class slip { none, no_limit, bad_expert };
  struct options {
    slip mistake = slip::none;
  };
  explicit careless_top1(options o) : opt(o) {}
  static void validate(const options&) {}
  index_t choices(index_t) const { return 1; }

  template <class T>
  void route(const gate::route_context& ctx, matrix_view<const T> logits, gate::routing_plan<T>& plan) {
    const index_t n = logits.rows(), E = logits.cols();
    plan.reset(n, E, 1);
    plan.probs.resize_discard(n * E);
    for (index_t t = 0; t < n; ++t) {
      index_t best = 0;
      for (index_t e = 1; e < E; ++e)
        if (logits(t, e) > logits(t, best)) best = e;
      plan.expert[t] = static_cast<std::int32_t>(best);
      plan.weight[t] = T(1);
      plan.score[t] = 1.0f;
    }
    if (opt.mistake == slip::no_limit) return;
    gate::limit_by_capacity(plan, ctx, gate::drop_policy::position);
    if (opt.mistake == slip::bad_expert) plan.expert[0] = static_cast<std::int32_t>(E);
  }
  template <class T>
  void backward(const gate::route_context&, matrix_view<const T>, const gate::routing_plan<T>&, std::span<const T>,
                matrix_view<T> dlogits) const {
    for (index_t t = 0; t < dlogits.rows(); ++t)
      for (index_t e = 0; e < dlogits.cols(); ++e) dlogits(t, e) = T(0);
  }
  options opt;
};

std::string forward_error(careless_top1::slip mistake) {
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  moe_layer<cpu, careless_top1> moe(ex, comms[0], {.hidden = 8, .ffn = 16, .experts = 4, .gate = {mistake}});
  matrix<float> x(16, 8), y(16, 8);
  for (index_t i = 0; i < 16 * 8; ++i) x.data()[i] = std::sin(0.7f * static_cast<float>(i));
  try {
    moe.forward(x.view(), y.view());
  } catch (const semoe::error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("a gate's plan is checked: a forgotten limit_by_capacity and a nonexistent expert are named") {
  CHECK(forward_error(careless_top1::slip::none).empty());
  const auto no_limit = forward_error(careless_top1::slip::no_limit);
  // reset() sized counts and offsets without filling them: which field shows it first depends on their contents.
  CHECK(no_limit.find("the plan careless_top1 routed: plan.") != std::string::npos);
  CHECK(no_limit.find("(call gate::limit_by_capacity after filling plan.expert and plan.weight)") != std::string::npos);
  const auto bad = forward_error(careless_top1::slip::bad_expert);
  CHECK(bad.find("plan.expert[0] = 4 is outside [0, 4)") != std::string::npos);
}
