// Routing on the GPU (softmax + top-k per token, capacity by radix select,
// the plan's tables by CUB histogram, scan and stable radix sort) against the
// host route of the same gate: every choice's expert and slot, the counts,
// offsets and drops exactly; weights, probabilities, aux losses and the
// backward's dlogits within 1e-6 of their scale (both sides compute in
// double; the device may fuse multiply-adds). GPU only (skipped without one).
#include <cmath>
#include <cstring>
#include <vector>

#include "compare.hpp"
#include "gpu_main.cuh"
#include "semoe/cuda/backend.cuh"
#include "semoe/gate/sigmoid_top_k.hpp"
#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/dispatch.hpp"

using namespace semoe;
using test::random_vec;
using test::scaled_error;

namespace {

constexpr double tol = 1e-6;

template <class Gate>
void compare_route(typename Gate::options o, index_t n, index_t E, std::uint64_t seed) {
  const auto x = random_vec(static_cast<std::size_t>(n * E), seed);
  Gate host_gate(o), gpu_gate(o);
  const index_t k = host_gate.choices(E);
  std::vector<float> dw(static_cast<std::size_t>(n * k));
  for (index_t a = 0; a < n * k; ++a) dw[a] = static_cast<float>(std::sin(0.37 * static_cast<double>(a)));
  gate::route_context ctx;
  ctx.global_tokens = n;

  cuda_executor ex;
  buffer<float, device_space> xd(n * E), dwd(n * k), dld(n * E);
  ex.copy(xd.data(), x.data(), xd.bytes());
  ex.copy(dwd.data(), dw.data(), dwd.bytes());
  for (int step = 0; step < 2; ++step) {  // the second step selects with the aux-free bias of the first
    ctx.step = static_cast<std::uint64_t>(step);
    gate::routing_plan<float> hp;
    std::vector<float> hdl(static_cast<std::size_t>(n * E));
    host_gate.route(ctx, as_matrix<const float>(x.data(), n, E), hp);
    host_gate.backward(ctx, as_matrix<const float>(x.data(), n, E), hp, std::span<const float>(dw),
                       as_matrix(hdl.data(), n, E));
    gate::routing_plan<float, device_space> dp;
    const auto xv = as_matrix<const float>(xd.data(), n, E);
    gpu_gate.route(ex, ctx, xv, dp);
    gpu_gate.backward(ex, ctx, xv, dp, std::span<const float>(dwd.span()), dld.matrix(n, E));
    const auto gp = gate::copy_to_host(ex, dp);
    std::vector<float> gdl(static_cast<std::size_t>(n * E));
    ex.copy(gdl.data(), dld.data(), dld.bytes());

    REQUIRE(gp.dropped == hp.dropped);
    for (index_t a = 0; a < n * k; ++a) {
      REQUIRE(gp.expert[a] == hp.expert[a]);
      REQUIRE(gp.slot[a] == hp.slot[a]);
    }
    for (index_t e = 0; e <= E; ++e) REQUIRE(gp.offsets[e] == hp.offsets[e]);
    CHECK(scaled_error(gp.weight.span(), hp.weight.span()) < tol);
    CHECK(scaled_error(gp.probs.span(), hp.probs.span()) < tol);
    CHECK(scaled_error(gdl, hdl) < tol);
    CHECK(std::abs(gp.balance_loss - hp.balance_loss) <= tol * std::abs(hp.balance_loss));
    CHECK(std::abs(gp.z_loss - hp.z_loss) <= tol * std::abs(hp.z_loss));

    // The dispatch rows the layer's kernels read.
    buffer<index_t> hr;
    buffer<index_t, device_space> gr;
    layer::dispatch_rows(hp, hr);
    layer::dispatch_rows(ex, dp, gr);
    std::vector<index_t> grh(static_cast<std::size_t>(gr.size()));
    ex.copy(grh.data(), gr.data(), gr.bytes());
    for (index_t a = 0; a < n * k; ++a) REQUIRE(grh[a] == hr[a]);

    host_gate.end_step(ctx);
    gpu_gate.end_step(ctx);
  }
}

}  // namespace

TEST_CASE("cuda routing: top_k<2>, capacity by position, 16384 tokens over 8 experts") {
  gate::top_k<2>::options o;
  o.capacity_factor = 0.8;
  compare_route<gate::top_k<2>>(o, 16384, 8, 1);
}

TEST_CASE("cuda routing: top_k<2>, capacity by probability") {
  gate::top_k<2>::options o;
  o.capacity_factor = 0.5;
  o.drop = gate::drop_policy::probability;
  compare_route<gate::top_k<2>>(o, 4099, 16, 2);
}

TEST_CASE("cuda routing: top_k<8> dropless over 64 experts, aux-free bias") {
  gate::top_k<8>::options o;
  o.dropless = true;
  o.balance = gate::balance_mode::aux_free;
  o.bias_rate = 0.01;
  compare_route<gate::top_k<8>>(o, 8192, 64, 3);
}

TEST_CASE("cuda routing: top_k<2> re-normalized after drops, min_capacity") {
  gate::top_k<2>::options o;
  o.capacity_factor = 0.3;
  o.min_capacity = 700;
  o.renormalize_after_drops = true;
  compare_route<gate::top_k<2>>(o, 8192, 16, 6);
}

TEST_CASE("cuda routing: sigmoid_top_k<4> over 4 of 8 groups, aux-free bias, scaled") {
  gate::sigmoid_top_k<4>::options o;
  o.capacity_factor = 1.0;
  o.bias_rate = 0.01;
  o.scaling = 2.5;
  o.groups = 8;
  o.top_groups = 4;
  compare_route<gate::sigmoid_top_k<4>>(o, 8192, 64, 7);
}

TEST_CASE("cuda routing: switch_gate") {
  gate::switch_gate::options o;
  o.capacity_factor = 1.0;
  compare_route<gate::switch_gate>(o, 3000, 8, 4);
}

TEST_CASE("cuda routing: a NaN logit is named") {
  const index_t n = 64, E = 8;
  auto x = random_vec(static_cast<std::size_t>(n * E), 5);
  x[17 * E + 3] = NAN;
  cuda_executor ex;
  buffer<float, device_space> xd(n * E);
  ex.copy(xd.data(), x.data(), xd.bytes());
  gate::routing_plan<float, device_space> p;
  gate::top_k<2> g;
  gate::route_context ctx;
  ctx.global_tokens = n;
  CHECK_THROWS_WITH_AS(g.route(ex, ctx, as_matrix<const float>(xd.data(), n, E), p),
                       doctest::Contains("token 17, expert 3"), semoe::error);
}
