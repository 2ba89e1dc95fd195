// The Gate concept both ways: every library gate and a user's 30-line gate
// pass; gates missing one piece are rejected.
#include "semoe/gate/concepts.hpp"

#include <doctest/doctest.h>

#include "gate_testing.hpp"
#include "semoe/gate/expert_choice.hpp"
#include "semoe/gate/gshard.hpp"
#include "semoe/gate/hash.hpp"
#include "semoe/gate/noisy_top_k.hpp"
#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;

namespace {

// A user's gate: every token to expert `options.target`, weight = sigmoid(logit).
struct fixed_gate {
  using policy_kind = sg::gate_tag;
  struct options {
    int target = 0;
  };
  fixed_gate() = default;
  explicit fixed_gate(options o) : o_(o) {}
  static void validate(const options&) {}
  index_t choices(index_t) const { return 1; }
  template <class T>
  void route(const route_context& ctx, semoe::matrix_view<const T> logits, routing_plan<T>& plan) {
    ++calls;
    plan.reset(logits.rows(), logits.cols(), 1);
    for (index_t t = 0; t < logits.rows(); ++t) {
      plan.expert[t] = o_.target;
      plan.weight[t] = T(1) / (T(1) + std::exp(-logits(t, o_.target)));
      plan.score[t] = 1;
    }
    sg::limit_by_capacity(plan, ctx, sg::drop_policy::position);
  }
  template <class T>
  void backward(const route_context&, semoe::matrix_view<const T> logits, const routing_plan<T>& plan,
                std::span<const T> dweight, semoe::matrix_view<T> dlogits) const {
    for (index_t t = 0; t < logits.rows(); ++t)
      for (index_t e = 0; e < logits.cols(); ++e)
        dlogits(t, e) = e == o_.target ? dweight[t] * plan.weight[t] * (T(1) - plan.weight[t]) : T(0);
  }
  options o_;
  int calls = 0;
};

// What a layer does with a gate, constrained on the concept.
template <sg::Gate G>
routing_plan<double> route_with(G& gate, const std::vector<double>& x, index_t E) {
  static_assert(sg::check_gate<G>());
  routing_plan<double> plan;
  gate.route(one_rank(static_cast<index_t>(x.size()) / E), view(x, E), plan);
  return plan;
}

struct no_tag {
  struct options {};
  explicit no_tag(options = {}) {}
  index_t choices(index_t) const { return 1; }
  void route(const route_context&, semoe::matrix_view<const float>, routing_plan<float>&) {}
  void backward(const route_context&, semoe::matrix_view<const float>, const routing_plan<float>&,
                std::span<const float>, semoe::matrix_view<float>) const {}
};
struct wrong_tag : no_tag {
  using no_tag::no_tag;
  using policy_kind = struct not_a_gate_tag;
};
struct no_options {
  using policy_kind = sg::gate_tag;
  index_t choices(index_t) const { return 1; }
  void route(const route_context&, semoe::matrix_view<const float>, routing_plan<float>&) {}
  void backward(const route_context&, semoe::matrix_view<const float>, const routing_plan<float>&,
                std::span<const float>, semoe::matrix_view<float>) const {}
};
struct no_choices : no_tag {
  using no_tag::no_tag;
  using policy_kind = sg::gate_tag;
  void choices() const {}
};
struct no_route : no_tag {
  using no_tag::no_tag;
  using policy_kind = sg::gate_tag;
  void route() {}
};
struct route_returns_plan : no_tag {
  using no_tag::no_tag;
  using policy_kind = sg::gate_tag;
  routing_plan<float> route(const route_context&, semoe::matrix_view<const float>, routing_plan<float>&) {
    return {};
  }
};
struct no_backward : no_tag {
  using no_tag::no_tag;
  using policy_kind = sg::gate_tag;
  void backward() const {}
};
struct mutable_backward : no_tag {
  using no_tag::no_tag;
  using policy_kind = sg::gate_tag;
  void backward(const route_context&, semoe::matrix_view<const float>, const routing_plan<float>&,
                std::span<const float>, semoe::matrix_view<float>) {}
};
struct tagged_minimal : no_tag {
  using no_tag::no_tag;
  using policy_kind = sg::gate_tag;
};

}  // namespace

TEST_CASE("every library gate satisfies Gate") {
  static_assert(sg::Gate<sg::top_k<1>> && sg::Gate<sg::top_k<2>> && sg::Gate<sg::top_k<4>>);
  static_assert(sg::Gate<sg::switch_gate> && sg::Gate<sg::gshard> && sg::Gate<sg::noisy_top_k<2>>);
  static_assert(sg::Gate<sg::expert_choice> && sg::Gate<sg::hash_gate>);
  static_assert(sg::check_gate<sg::top_k<2>>() && sg::check_gate<sg::expert_choice>());
  // Optional members the layer looks for.
  static_assert(sg::jittered_gate<sg::switch_gate> && !sg::jittered_gate<sg::top_k<2>>);
  static_assert(sg::stepped_gate<sg::top_k<2>> && sg::stepped_gate<sg::gshard> && !sg::stepped_gate<sg::hash_gate>);
  CHECK(sg::top_k<2>().choices(8) == 2);
}

TEST_CASE("a user's gate satisfies Gate and is the one that runs") {
  static_assert(sg::Gate<fixed_gate>);
  static_assert(sg::Gate<tagged_minimal>);
  fixed_gate gate({.target = 2});
  const auto x = random_logits(6, 4, 91);
  const auto plan = route_with(gate, x, 4);
  CHECK(gate.calls == 1);
  for (index_t t = 0; t < 6; ++t) {
    CHECK(plan.expert[t] == 2);
    CHECK(plan.weight[t] == doctest::Approx(1 / (1 + std::exp(-x[t * 4 + 2]))));
  }
  check_gradient(gate, x, 4, one_rank(6));
}

TEST_CASE("gates missing a piece are rejected") {
  static_assert(!sg::Gate<no_tag>);
  static_assert(!sg::Gate<wrong_tag>);
  static_assert(!sg::Gate<no_options>);
  static_assert(!sg::Gate<no_choices>);
  static_assert(!sg::Gate<no_route>);
  static_assert(!sg::Gate<route_returns_plan>);
  static_assert(!sg::Gate<no_backward>);
  static_assert(!sg::Gate<mutable_backward>);
  static_assert(!sg::Gate<int>);
  CHECK(true);
}
