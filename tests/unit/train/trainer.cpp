// Data + expert parallel training over W thread-ranks follows the loss curve
// of one rank on the whole batch, with and without expert replicas.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/activation.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/train/trainer.hpp"

using namespace semoe;

namespace {

using moe_t = moe_layer<cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::local>;
using model_t = layer::sequential<float, layer::linear<float>, layer::activation<float, act::gelu>,
                                  layer::residual<float, layer::layer_norm<float>, moe_t>, layer::linear<float>>;

constexpr index_t in = 12, hidden = 16, classes = 5, batch = 64, experts = 4;

// Labels from a fixed rule on the inputs, so the loss goes down.
void make_batch(std::uint64_t step, matrix<float>& x, std::vector<std::int32_t>& y) {
  const philox rng(77, step);
  for (index_t i = 0; i < batch; ++i) {
    float s = 0;
    for (index_t j = 0; j < in; ++j) s += (x(i, j) = 2 * rng.uniform(static_cast<std::uint64_t>(i * in + j)) - 1) * (j % 3 - 1.0f);
    const auto bin = static_cast<index_t>(std::floor((s + 2.5f) / 5.0f * classes));
    y[i] = static_cast<std::int32_t>(std::clamp<index_t>(bin, 0, classes - 1));
  }
}

std::vector<double> loss_curve(int world_size, int expert_parallel, int steps, gate::top_k_options<2> gopt) {
  std::vector<double> curve;
  matrix<float> xs(batch, in);
  std::vector<std::int32_t> ys(batch);
  comm::local::run(world_size, [&](comm::local& world) {
    auto groups = train::make_groups(world, expert_parallel);
    cpu_executor ex({.threads = 1});
    model_t model(layer::linear<float>(ex, {.in = in, .out = hidden}, 1), layer::activation<float, act::gelu>(ex),
                  layer::residual<float, layer::layer_norm<float>, moe_t>(
                      ex, layer::layer_norm<float>(ex, {.dim = hidden}),
                      moe_t(ex, groups.expert,
                            {.hidden = hidden, .ffn = 24, .experts = experts,
                             .gate = gopt, .seed = 9})),
                  layer::linear<float>(ex, {.in = hidden, .out = classes}, 2));
    train::adamw<float> opt(ex, {.lr = 3e-3});
    // Small buckets: several reductions launch while backward still runs.
    train::trainer tr(model, opt, world, groups, {.clip_norm = 0.5, .bucket_bytes = 256});
    layer::softmax_cross_entropy<float> ce(ex);
    const index_t n = batch / world_size, t0 = world.rank() * n;
    matrix<float> x(batch, in), dlogits(n, classes);
    std::vector<std::int32_t> y(batch);
    for (int s = 0; s < steps; ++s) {
      make_batch(static_cast<std::uint64_t>(s), x, y);  // every rank draws the global batch, takes its slice
      const double loss = tr.step([&](model_t& m) {
        auto logits = m.forward(as_matrix<const float>(x.data() + t0 * in, n, in));
        const double l = ce.forward(logits, std::span<const std::int32_t>(y.data() + t0, n), batch);
        ce.backward(dlogits.view());
        m.backward(dlogits.view());
        return l;
      });
      if (world.rank() == 0) curve.push_back(loss);
    }
    if (world_size > 1) CHECK(tr.overlapped_buckets() > 2);
  });
  return curve;
}

}  // namespace

void check_curves(gate::top_k_options<2> gopt, std::initializer_list<std::pair<int, int>> setups) {
  const int steps = 50;
  const auto one = loss_curve(1, 0, steps, gopt);
  REQUIRE(one.size() == steps);
  CHECK(one.back() < 0.8 * one.front());  // it learns
  for (auto [W, EP] : setups) {
    const auto many = loss_curve(W, EP, steps, gopt);
    double worst = 0;
    for (int s = 0; s < steps; ++s) worst = std::max(worst, std::abs(many[s] - one[s]) / std::abs(one[s]));
    INFO("world " << W << ", expert parallel " << EP << ": worst relative difference " << worst);
    CHECK(worst <= 1e-4);
  }
}

TEST_CASE("the loss curve over 2 and 4 ranks equals one rank's: tight capacity, aux and z losses") {
  // One expert group spans the world: capacity, drops and balance losses are global.
  check_curves({.capacity_factor = 1.0, .aux_loss_coef = 0.05}, {{2, 0}, {4, 0}});
}

TEST_CASE("with expert replicas the loss curve equals one rank's when routing has no group statistics") {
  // Capacity and balance statistics are per expert group (GShard's groups), so
  // with replicas only dropless routing without batch-level losses is the
  // same function of the global batch as one rank.
  check_curves({.dropless = true, .balance = gate::balance_mode::none, .z_loss_coef = 0}, {{4, 2}, {2, 1}, {4, 1}});
}

TEST_CASE("make_groups splits the world into expert groups and replica groups") {
  comm::local::run(4, [](comm::local& world) {
    auto g = train::make_groups(world, 2);
    CHECK(g.expert.size() == 2);
    CHECK(g.replica.size() == 2);
    CHECK(g.expert.rank() == world.rank() % 2);
    CHECK(g.replica.rank() == world.rank() / 2);
    CHECK_THROWS_WITH_AS(train::make_groups(world, 3), doctest::Contains("must divide the world size 4"), semoe::error);
  });
}
