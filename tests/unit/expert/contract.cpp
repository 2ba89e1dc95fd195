// The Expert and Gate contracts both ways, on the policies the failtests
// break one piece at a time: whole, they satisfy the concept and a layer
// builds and steps with them; each broken one is rejected.
#include <doctest/doctest.h>

#include "failtest/broken_policies.hpp"

namespace {

using failtest::missing;
template <missing M>
constexpr bool is_expert = semoe::expert::Expert<failtest::expert<M>>;
template <missing M>
constexpr bool is_gate = semoe::gate::Gate<failtest::gate<M>>;

static_assert(is_expert<missing::nothing> && semoe::expert::check_expert<failtest::expert<missing::nothing>>());
static_assert(!is_expert<missing::options_constructor> && !is_expert<missing::static_block_elems>);
static_assert(!is_expert<missing::saved_cols> && !is_expert<missing::work_cols>);
static_assert(!is_expert<missing::init> && !is_expert<missing::const_init>);
static_assert(!is_expert<missing::const_forward> && !is_expert<missing::backward> &&
              !is_expert<missing::const_backward>);
static_assert(semoe::expert::Expert<failtest::expert<missing::nothing>, semoe::cpu_executor, double>);
static_assert(!semoe::expert::backward_in_place_v<failtest::expert<missing::nothing>>);

static_assert(is_gate<missing::nothing> && semoe::gate::check_gate<failtest::gate<missing::nothing>>());
static_assert(!is_gate<missing::options_constructor> && !is_gate<missing::choices> &&
              !is_gate<missing::const_backward>);

}  // namespace

TEST_CASE("the whole expert and gate the failtests break go into a layer") {
  // The expert runs (it computes nothing); the gate routes nothing, so its
  // layer is only compiled: check_plan would refuse its empty plan.
  CHECK(failtest::build_layer<semoe::gate::top_k<2>, failtest::expert<missing::nothing>>() == 0);
  int (*gate_layer)() = &failtest::build_layer<failtest::gate<missing::nothing>, semoe::expert::ffn<semoe::act::gelu>>;
  CHECK(static_cast<bool>(gate_layer));
}
