// replicate_hot: under a Zipf-skewed gate the hottest experts get copies on
// the least-loaded ranks, the busiest rank's rows go down, and training
// follows static placement step for step (50 steps, relative 1e-4), with
// experts resident and on SSD; under even load no copy is made.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "semoe/gate/top_k.hpp"
#include "semoe/gate/with_prior.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/placement/replicate_hot.hpp"
#include "semoe/prefetch/vertical.hpp"
#include "semoe/storage/tiered_store.hpp"
#include "semoe/train/trainer.hpp"
#include "support/files.hpp"

using namespace semoe;

namespace {

constexpr index_t in = 12, hidden = 16, ffn = 32, classes = 5, batch = 64, experts = 8;

using skewed = gate::with_prior<gate::top_k<2>>;
using ssd_store = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;

template <class Storage, class Placement>
using moe_t = basic_moe_layer<float, cpu, skewed, expert::ffn<act::gelu>, comm::local, Storage, prefetch::vertical<1>,
                              Placement>;
template <class Storage, class Placement>
using model_t = layer::sequential<float, layer::linear<float>,
                                  layer::residual<float, layer::layer_norm<float>, moe_t<Storage, Placement>>,
                                  layer::linear<float>>;

struct outcome {
  std::vector<double> losses;
  std::vector<float> params;  ///< rank 0's dense parameters and home expert blocks, then rank 1's blocks...
  double busiest_share = 0;   ///< the busiest rank's share of expert rows over the last window
  std::vector<std::int32_t> replicas;
};

void make_batch(std::uint64_t step, matrix<float>& x, std::vector<std::int32_t>& y) {
  const philox rng(5, step);
  for (index_t i = 0; i < batch; ++i) {
    float s = 0;
    for (index_t j = 0; j < in; ++j) s += (x(i, j) = 2 * rng.uniform(std::uint64_t(i * in + j)) - 1) * (j % 3 - 1.0f);
    y[i] = static_cast<std::int32_t>(std::clamp<index_t>(static_cast<index_t>((s + 2.5f) / 5.0f * classes), 0, classes - 1));
  }
}

template <class Storage, class Placement>
outcome train(int ranks, int steps, double zipf, const std::filesystem::path& ssd = {}) {
  outcome out;
  std::mutex m;
  std::vector<std::vector<float>> per_rank(static_cast<std::size_t>(ranks));
  comm::local::run(ranks, [&](comm::local& world) {
    auto groups = train::make_groups(world);
    cpu_executor ex({.threads = 1});
    using store_t = typename Storage::template store<float>;
    typename store_t::options so{};
    if constexpr (!std::is_same_v<Storage, storage::resident>) {
      const std::size_t elems = 2 * hidden * ffn;
      so.device.budget_bytes = 3 * 2 * elems * sizeof(float);
      so.host.budget_bytes = 3 * 4 * elems * sizeof(float);
      so.ssd.dir = ssd;
      so.ssd.rank = world.rank();
    }
    auto store = std::make_shared<store_t>(so);
    typename skewed::options g{.gate = {.capacity_factor = 2.0}, .prior = gate::zipf_prior(experts, zipf)};
    typename Placement::options po{};
    if constexpr (Placement::replica_slots > 0) po.interval = 2;
    using M = model_t<Storage, Placement>;
    M model(layer::linear<float>(ex, {.in = in, .out = hidden}, 1),
            layer::residual<float, layer::layer_norm<float>, moe_t<Storage, Placement>>(
                ex, layer::layer_norm<float>(ex, {.dim = hidden}),
                moe_t<Storage, Placement>(ex, groups.expert,
                                          {.hidden = hidden, .ffn = ffn, .experts = experts, .gate = g, .seed = 4,
                                           .placement = po},
                                          store)),
            layer::linear<float>(ex, {.in = hidden, .out = classes}, 2));
    train::adamw<float> opt(ex, {.lr = 3e-3});
    train::trainer tr(model, opt, world, groups, {.clip_norm = 0.5});
    layer::softmax_cross_entropy<float> ce(ex);
    const index_t n = batch / ranks, r0 = world.rank() * n;
    matrix<float> x(batch, in), dlogits(n, classes);
    std::vector<std::int32_t> y(batch);
    std::vector<double> losses;
    for (int s = 0; s < steps; ++s) {
      make_batch(static_cast<std::uint64_t>(s), x, y);
      losses.push_back(tr.step([&](M& mod) {
        auto logits = mod.forward(as_matrix<const float>(x.data() + r0 * in, n, in));
        const double l = ce.forward(logits, std::span<const std::int32_t>(y.data() + r0, n), batch);
        ce.backward(dlogits.view());
        mod.backward(dlogits.view());
        return l;
      }));
    }
    double share = 0;
    std::vector<std::int32_t> replicas;
    train::for_each_moe_layer(model, [&](auto& moe) {
      share = moe.gather_load().max_rank_share();
      if constexpr (Placement::replica_slots > 0) {
        const auto r = moe.placement().replicas();
        replicas.assign(r.begin(), r.end());
      }
    });
    std::vector<float> mine;
    if (world.rank() == 0)
      for (auto& p : model.parameters()) mine.insert(mine.end(), p.value.begin(), p.value.end());
    train::for_each_expert_block(
        model, [&](auto& b, auto&) { mine.insert(mine.end(), b.params.begin(), b.params.end()); },
        train::block_access::read);
    std::lock_guard lk(m);
    per_rank[static_cast<std::size_t>(world.rank())] = std::move(mine);
    if (world.rank() == 0) {
      out.losses = losses;
      out.busiest_share = share;
      out.replicas = replicas;
    }
  });
  for (auto& v : per_rank) out.params.insert(out.params.end(), v.begin(), v.end());
  return out;
}

double worst_relative(const std::vector<double>& a, const std::vector<double>& b) {
  double w = 0;
  for (std::size_t i = 0; i < a.size(); ++i) w = std::max(w, std::abs(a[i] - b[i]) / std::abs(b[i]));
  return w;
}

template <class Storage>
void same_as_static(int ranks, const std::filesystem::path& ssd_a = {}, const std::filesystem::path& ssd_b = {}) {
  constexpr int steps = 50;
  const auto fixed = train<Storage, placement::static_placement>(ranks, steps, 1.2, ssd_a);
  const auto hot = train<Storage, placement::replicate_hot<1>>(ranks, steps, 1.2, ssd_b);
  INFO("static busiest share " << fixed.busiest_share << ", replicate_hot " << hot.busiest_share);
  // Copies were made, and they took rows off the busiest rank.
  CHECK(std::count_if(hot.replicas.begin(), hot.replicas.end(), [](auto e) { return e >= 0; }) >= 1);
  CHECK(fixed.busiest_share > 1.2 / ranks);  // the prior skews the load
  CHECK(hot.busiest_share < fixed.busiest_share - 0.05);
  // The same training, up to the order of float sums.
  REQUIRE(hot.losses.size() == fixed.losses.size());
  const double wl = worst_relative(hot.losses, fixed.losses);
  INFO("worst relative loss difference " << wl);
  CHECK(wl <= 1e-4);
  REQUIRE(hot.params.size() == fixed.params.size());
  double wp = 0;
  for (std::size_t i = 0; i < hot.params.size(); ++i)
    wp = std::max(wp, std::abs(double(hot.params[i]) - fixed.params[i]) / std::max(1e-3, std::abs(double(fixed.params[i]))));
  INFO("worst relative parameter difference " << wp);
  CHECK(wp <= 1e-4);
}

}  // namespace

TEST_CASE("replicate_hot copies the hottest experts and trains exactly like static placement (2 and 4 ranks)") {
  same_as_static<storage::resident>(2);
  same_as_static<storage::resident>(4);
}

TEST_CASE("replicate_hot moves replica blocks through an SSD-tiered store and still trains like static placement") {
  testing::temp_dir a("replicate-ssd-a"), b("replicate-ssd-b");
  same_as_static<ssd_store>(2, a.path, b.path);
}

TEST_CASE("replicate_hot makes no copy when the load is even") {
  // Counted loads fed to the placement directly: 8 experts on 2 ranks.
  auto decide = [](std::vector<std::int32_t> sent, double min_gain = 0.1) {
    std::vector<std::int32_t> out;
    std::mutex m;
    comm::local::run(2, [&](comm::local& c) {
      storage::resident::store<float> store;
      const index_t id = store.add_layer(4 + 1, 6);
      layer::load_monitor mon;
      mon.record_sent(std::span<const std::int32_t>(sent));
      mon.end_step();
      placement::replicate_hot<1> p({.interval = 1, .min_gain = min_gain});
      p.end_step<float>(store, id, c, 4, mon);
      std::lock_guard lk(m);
      if (c.rank() == 0) out.assign(p.replicas().begin(), p.replicas().end());
    });
    return out;
  };
  CHECK(decide({10, 10, 10, 10, 10, 10, 10, 10}) == std::vector<std::int32_t>{-1, -1});
  // Expert 2 draws most: a copy on rank 1, the least loaded.
  CHECK(decide({10, 10, 60, 10, 10, 10, 10, 10}) == std::vector<std::int32_t>{-1, 2});
  // Slightly uneven: a copy would not lower the busiest rank's rows by 10 %.
  CHECK(decide({11, 10, 10, 10, 10, 10, 10, 10}) == std::vector<std::int32_t>{-1, -1});
  // A copy of expert 0 would take the busiest rank from 60 to 55 rows: worth it at min_gain 5 %, not at 10 %.
  CHECK(decide({30, 10, 10, 10, 10, 10, 10, 10}) == std::vector<std::int32_t>{-1, -1});
  CHECK(decide({30, 10, 10, 10, 10, 10, 10, 10}, 0.05) == std::vector<std::int32_t>{-1, 0});
  CHECK_THROWS_WITH_AS(placement::replicate_hot<1>({.interval = 0}), doctest::Contains("interval = 0"), semoe::error);
}
