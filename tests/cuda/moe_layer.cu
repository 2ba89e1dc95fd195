// The MoE layer on the cuda backend against the same layer on the cpu
// backend: the same routing plan exactly (expert and slot of every choice),
// outputs and every gradient within 1e-5 of the tensor's scale in fp32, and
// the same parameters after an AdamW step. GPU only (skipped without one).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <random>
#include <vector>

#include "../unit/core/ring_scenario.hpp"
#include "compare.hpp"
#include "gpu_main.cuh"
#include "semoe/cuda/backend.cuh"
#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/infer/ring_engine.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/prefetch/vertical.hpp"
#include "semoe/storage/tiered_store.hpp"
#include "semoe/train/optimizer.hpp"

#include <unistd.h>

using namespace semoe;
using test::random_vec;
using test::scaled_error;

namespace {

std::vector<float> to_host(cuda_executor& ex, std::span<const float> d) {
  std::vector<float> h(d.size());
  ex.copy(h.data(), d.data(), d.size_bytes());
  return h;
}

constexpr double fp32_tol = 1e-5;
constexpr double bf16_tol = 1.0 / 64;  // 4u, u = 2^-8: see compare_layers

/// One forward + backward of both layers on the same input; everything compared.
template <class Gate>
void compare_layers(typename Gate::options gopt, bool bias, bool adam_step,
                    blas::precision inputs = blas::precision::native) {
  // bf16 GEMM inputs: both backends multiply bf16 roundings, but an fp32
  // intermediate that differs in its last bits (summation order) may round to
  // the neighbouring bf16 value, 2u = 2^-7 off; a few such steps chain
  // through the two GEMMs and back: 4u = 2^-6 of each tensor's scale.
  const double tol = inputs == blas::precision::bf16 ? bf16_tol : fp32_tol;
  using cpu_layer = moe_layer<cpu, Gate>;
  using gpu_layer = moe_layer<semoe::cuda, Gate>;
  const index_t T = 512, H = 128, F = 256, E = 8;
  cpu_executor cex({.threads = 2});
  cuda_executor gex;
  auto c1 = comm::local::make_world(1), c2 = comm::local::make_world(1);
  typename cpu_layer::options opt{.hidden = H,
                                  .ffn = F,
                                  .experts = E,
                                  .gate = gopt,
                                  .expert = {.bias = bias, .gemm_inputs = inputs},
                                  .seed = 21};
  cpu_layer a(cex, c1[0], opt);
  gpu_layer b(gex, c2[0],
              {.hidden = H, .ffn = F, .experts = E, .gate = gopt, .expert = {.bias = bias, .gemm_inputs = inputs},
               .seed = 21});

  const auto x = random_vec(T * H, 1), dy = random_vec(T * H, 2);
  std::vector<float> ya(T * H), dxa(T * H);
  a.forward(as_matrix(x.data(), T, H), as_matrix(ya.data(), T, H));
  a.zero_grad();
  a.backward(as_matrix(dy.data(), T, H), as_matrix(dxa.data(), T, H));

  buffer<float, device_space> xd(T * H), dyd(T * H), yd(T * H), dxd(T * H);
  gex.copy(xd.data(), x.data(), xd.bytes());
  gex.copy(dyd.data(), dy.data(), dyd.bytes());
  b.forward(matrix_view<const float>(xd.matrix(T, H)), yd.matrix(T, H));
  b.zero_grad();
  b.backward(matrix_view<const float>(dyd.matrix(T, H)), dxd.matrix(T, H));

  // The routing plan: the same expert and slot for every choice, exactly.
  const auto& pa = a.plan();
  const auto pb = [&] {  // the plan as the gpu built it, when its gate routes there
    if constexpr (gpu_layer::routes_on_executor)
      return gate::copy_to_host(gex, b.plan());
    else
      return b.plan();
  }();
  REQUIRE(pa.assignments() == pb.assignments());
  for (index_t i = 0; i < pa.assignments(); ++i) {
    REQUIRE(pa.expert[i] == pb.expert[i]);
    REQUIRE(pa.slot[i] == pb.slot[i]);
  }
  for (index_t e = 0; e <= E; ++e) REQUIRE(pa.offsets[e] == pb.offsets[e]);

  CHECK(scaled_error(to_host(gex, yd.span()), ya) < tol);
  CHECK(scaled_error(to_host(gex, dxd.span()), dxa) < tol);
  CHECK(scaled_error(to_host(gex, b.parameters()[0].grad), a.parameters()[0].grad) < tol);
  for (index_t e = 0; e < E; ++e) {
    CAPTURE(e);
    auto ba = a.store().acquire(a.layer_id(), e);
    auto bb = b.store().acquire(b.layer_id(), e);
    CHECK(scaled_error(to_host(gex, bb.params), ba.params) == 0.0);  // the same initial weights
    CHECK(scaled_error(to_host(gex, bb.grads), ba.grads) < tol);
  }

  if (adam_step) {
    train::adamw<float, cpu> oa(cex, {.lr = 1e-2});
    train::adamw<float, semoe::cuda> ob(gex, {.lr = 1e-2});
    oa.step(a);
    ob.step(b);
    CHECK(scaled_error(to_host(gex, b.parameters()[0].value), a.parameters()[0].value) < tol);
    for (index_t e = 0; e < E; ++e) {
      auto ba = a.store().acquire(a.layer_id(), e);
      auto bb = b.store().acquire(b.layer_id(), e);
      CHECK(scaled_error(to_host(gex, bb.params), ba.params) < tol);
    }
  }

  // Eval mode: forward only, one expert at a time on both backends.
  a.train(false);
  b.train(false);
  a.forward(as_matrix(x.data(), T, H), as_matrix(ya.data(), T, H));
  b.forward(matrix_view<const float>(xd.matrix(T, H)), yd.matrix(T, H));
  CHECK(scaled_error(to_host(gex, yd.span()), ya) < tol);
}

}  // namespace

TEST_CASE("top-2 with capacity (tokens dropped), gelu with bias: cuda equals cpu, AdamW step included") {
  compare_layers<gate::top_k<2>>({.capacity_factor = 1.0}, true, true);
}

TEST_CASE("top-2 with bf16 GEMM inputs (tensor cores on the GPU, rounded copies on the cpu): cuda equals cpu") {
  compare_layers<gate::top_k<2>>({.capacity_factor = 1.0}, true, true, blas::precision::bf16);
}

TEST_CASE("top-2 dropless without bias: cuda equals cpu") {
  compare_layers<gate::top_k<2>>({.dropless = true}, false, false);
}

TEST_CASE("switch (top-1) with router jitter: cuda equals cpu") {
  compare_layers<gate::switch_gate>({.capacity_factor = 1.25, .jitter_eps = 0.01}, false, true);
}

TEST_CASE("experts offloaded to SSD, device tier in device memory, vertical prefetch: cuda equals cpu") {
  using tiers = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;
  using cpu_layer = basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, tiers,
                                    prefetch::vertical<1>>;
  using gpu_layer = basic_moe_layer<float, semoe::cuda, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, tiers,
                                    prefetch::vertical<1>>;
  const index_t T = 256, H = 128, F = 256, E = 8;
  const auto block = static_cast<std::size_t>(expert::ffn<>::block_elems({H, F}));
  const auto dir = std::filesystem::temp_directory_path() / ("semoe-gpu-offload-" + std::to_string(::getpid()));
  auto make = [&]<class Store>(const char* sub) {
    typename Store::options o;
    o.device.budget_bytes = 3 * 2 * sizeof(float) * block;   // three experts' weights and gradients
    o.host.budget_bytes = 4 * 4 * sizeof(float) * block + 8 * 4096;
    o.ssd.dir = dir / sub;
    std::filesystem::create_directories(o.ssd.dir);
    return std::make_shared<Store>(o);
  };
  cpu_executor cex({.threads = 2});
  cuda_executor gex;
  auto c1 = comm::local::make_world(1), c2 = comm::local::make_world(1);
  auto sa = make.template operator()<typename cpu_layer::store_type>("cpu");
  auto sb = make.template operator()<typename gpu_layer::store_type>("gpu");
  cpu_layer a(cex, c1[0], {.hidden = H, .ffn = F, .experts = E, .seed = 8}, sa);
  gpu_layer b(gex, c2[0], {.hidden = H, .ffn = F, .experts = E, .seed = 8}, sb);
  train::adamw<float, cpu> oa(cex, {.lr = 1e-2});
  train::adamw<float, semoe::cuda> ob(gex, {.lr = 1e-2});
  buffer<float, device_space> xd(T * H), dyd(T * H), yd(T * H), dxd(T * H);
  std::vector<float> ya(T * H), dxa(T * H);
  for (int step = 0; step < 3; ++step) {
    CAPTURE(step);
    const auto x = random_vec(T * H, 60 + step), dy = random_vec(T * H, 70 + step);
    gex.copy(xd.data(), x.data(), xd.bytes());
    gex.copy(dyd.data(), dy.data(), dyd.bytes());
    a.zero_grad();
    b.zero_grad();
    a.forward(as_matrix(x.data(), T, H), as_matrix(ya.data(), T, H));
    b.forward(matrix_view<const float>(xd.matrix(T, H)), yd.matrix(T, H));
    a.backward(as_matrix(dy.data(), T, H), as_matrix(dxa.data(), T, H));
    b.backward(matrix_view<const float>(dyd.matrix(T, H)), dxd.matrix(T, H));
    CHECK(scaled_error(to_host(gex, yd.span()), ya) < fp32_tol);
    CHECK(scaled_error(to_host(gex, dxd.span()), dxa) < fp32_tol);
    oa.step(a);
    ob.step(b);
    a.end_step();
    b.end_step();
  }
  CHECK(sb->stats().device.peak_bytes <= sb->stats().device.budget_bytes);
  sa.reset();
  sb.reset();
  std::filesystem::remove_all(dir);
}

TEST_CASE("ring-memory inference with slots in device memory, from DRAM and SSD: cuda equals cpu") {
  const index_t T = 256, H = 128, F = 256, E = 8;
  const auto x = random_vec(T * H, 77);
  const auto dir = std::filesystem::temp_directory_path() / ("semoe-gpu-ring-" + std::to_string(::getpid()));
  for (auto source : {infer::ring_source::dram, infer::ring_source::ssd}) {
    CAPTURE(int(source));
    cpu_executor cex({.threads = 2});
    cuda_executor gex;
    const auto ya = test::ring_scenario<cpu>(cex, source, dir / "cpu", x, T, H, F, E);
    const auto yb = test::ring_scenario<semoe::cuda>(gex, source, dir / "gpu", x, T, H, F, E);
    CHECK(scaled_error(yb, ya) < fp32_tol);
  }
  std::filesystem::remove_all(dir);
}
