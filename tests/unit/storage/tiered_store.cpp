// Training with expert blocks offloaded (device budget two layers of experts,
// host DRAM a quarter of all expert state, the rest on SSD) ends with bitwise
// the same parameters as training with everything resident, for every
// prefetch policy and both cache policies; budgets hold, measured.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <vector>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/activation.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/repeated.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/prefetch/two_d.hpp"
#include "semoe/prefetch/vertical.hpp"
#include "semoe/storage/tiered_store.hpp"
#include "semoe/train/trainer.hpp"

using namespace semoe;

namespace {

constexpr index_t in = 12, hidden = 16, ffn = 240, classes = 5, batch = 64, experts = 4, depth = 8;
// ffn<gelu> block: 2 * hidden * ffn = 7680 elements; with grads and two AdamW
// moments 122,880 bytes, a whole number of 4 KiB pages.
constexpr std::size_t elems = 2 * hidden * ffn;
constexpr std::size_t full_block = 4 * elems * sizeof(float), device_block = 2 * elems * sizeof(float);
constexpr std::size_t all_state = depth * experts * full_block;

template <class Storage, class Prefetch>
using moe_t = basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, Storage, Prefetch>;
template <class Storage, class Prefetch>
using block_t = layer::residual<float, layer::layer_norm<float>, moe_t<Storage, Prefetch>>;
template <class Storage, class Prefetch>
using model_t = layer::sequential<float, layer::linear<float>, layer::repeated<float, block_t<Storage, Prefetch>>,
                                  layer::linear<float>>;

using ssd_store = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;
using dram_store = storage::tiered<storage::device_tier, storage::host_tier>;

void make_batch(std::uint64_t step, matrix<float>& x, std::vector<std::int32_t>& y) {
  const philox rng(5, step);
  for (index_t i = 0; i < batch; ++i) {
    float s = 0;
    for (index_t j = 0; j < in; ++j)
      s += (x(i, j) = 2 * rng.uniform(static_cast<std::uint64_t>(i * in + j)) - 1) * (j % 3 - 1.0f);
    y[i] = static_cast<std::int32_t>(std::clamp<index_t>(static_cast<index_t>((s + 2.5f) / 5.0f * classes), 0, classes - 1));
  }
}

struct run_result {
  std::vector<float> params;  // dense then every expert block, in order
  storage::store_stats stats;
};

/// `steps` steps of AdamW with clipping; every parameter at the end.
template <class Storage, class Prefetch>
run_result run_training(int steps, typename Storage::template store<float>::options* o = nullptr,
                        double clip = 0.5, bool update_in_backward = false) {
  using store_t = typename Storage::template store<float>;
  using M = model_t<Storage, Prefetch>;
  auto store = o ? std::make_shared<store_t>(*o) : std::make_shared<store_t>();
  run_result out;
  comm::local::run(1, [&](comm::local& world) {
    auto groups = train::make_groups(world);
    cpu_executor ex({.threads = 2});
    M model(layer::linear<float>(ex, {.in = in, .out = hidden}, 1),
            layer::repeated<float, block_t<Storage, Prefetch>>(depth, [&](index_t i) {
              return block_t<Storage, Prefetch>(
                  ex, layer::layer_norm<float>(ex, {.dim = hidden}),
                  moe_t<Storage, Prefetch>(ex, groups.expert,
                                           {.hidden = hidden, .ffn = ffn, .experts = experts,
                                            .seed = 100 + static_cast<std::uint64_t>(i)},
                                           store));
            }),
            layer::linear<float>(ex, {.in = hidden, .out = classes}, 2));
    train::adamw<float> opt(ex, {.lr = 3e-3});
    train::trainer tr(model, opt, world, groups,
                      {.clip_norm = clip, .update_experts_in_backward = update_in_backward});
    layer::softmax_cross_entropy<float> ce(ex);
    matrix<float> x(batch, in), dlogits(batch, classes);
    std::vector<std::int32_t> y(batch);
    if constexpr (requires { store->reset_stats(); }) store->reset_stats();
    for (int s = 0; s < steps; ++s) {
      make_batch(static_cast<std::uint64_t>(s), x, y);
      tr.step([&](M& m) {
        auto logits = m.forward(x.view());
        const double l = ce.forward(logits, std::span<const std::int32_t>(y), batch);
        ce.backward(dlogits.view());
        m.backward(dlogits.view());
        return l;
      });
    }
    if constexpr (requires { tr.gather_dense(); }) tr.gather_dense();  // two_d keeps dense parameters sharded
    for (auto& p : model.parameters()) out.params.insert(out.params.end(), p.value.begin(), p.value.end());
    train::for_each_expert_block(
        model, [&](auto& blk, auto&) { out.params.insert(out.params.end(), blk.params.begin(), blk.params.end()); },
        train::block_access::read);
    if constexpr (requires { store->stats(); }) out.stats = store->stats();
  });
  return out;
}

struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(const char* tag)
      : path(std::filesystem::temp_directory_path() / (std::string("semoe-test-") + tag + "-" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
  }
  ~temp_dir() { std::filesystem::remove_all(path); }
};

ssd_store::store<float>::options offload_options(const std::filesystem::path& dir, storage::cache_kind cache) {
  ssd_store::store<float>::options o;
  o.device.budget_bytes = 2 * experts * device_block;  // two layers of experts
  o.host.budget_bytes = all_state / 4;                 // a quarter of all expert state
  o.ssd.dir = dir;
  o.cache = cache;
  return o;
}

void require_bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  REQUIRE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

void require_within_budgets(const storage::store_stats& s) {
  CHECK(s.device.peak_bytes <= s.device.budget_bytes);
  CHECK(s.host.peak_bytes <= s.host.budget_bytes);
  CHECK(s.device.peak_bytes > 0);
  CHECK(s.host.peak_bytes > 0);
}

constexpr int steps = 100;

}  // namespace

TEST_CASE("tiered store: offloaded training equals resident training bit for bit, for every prefetch policy") {
  const auto resident = run_training<storage::resident, prefetch::on_demand>(steps);
  REQUIRE(resident.params.size() > depth * experts * elems);

  SUBCASE("on_demand, lfu") {
    temp_dir d("on-demand");
    auto o = offload_options(d.path, storage::cache_kind::lfu);
    const auto r = run_training<ssd_store, prefetch::on_demand>(steps, &o);
    require_bitwise_equal(resident.params, r.params);
    require_within_budgets(r.stats);
    CHECK(r.stats.ssd.bytes_in > 0);   // blocks really went to SSD ...
    CHECK(r.stats.ssd.bytes_out > 0);  // ... and came back
    CHECK(r.stats.prefetches == 0);
  }
  SUBCASE("vertical<1>, lfu") {
    temp_dir d("vertical1");
    auto o = offload_options(d.path, storage::cache_kind::lfu);
    const auto r = run_training<ssd_store, prefetch::vertical<1>>(steps, &o);
    require_bitwise_equal(resident.params, r.params);
    require_within_budgets(r.stats);
    CHECK(r.stats.prefetches > 0);
    CHECK(r.stats.hits > 0);
  }
  SUBCASE("vertical<2>, lru") {
    temp_dir d("vertical2");
    auto o = offload_options(d.path, storage::cache_kind::lru);
    const auto r = run_training<ssd_store, prefetch::vertical<2>>(steps, &o);
    require_bitwise_equal(resident.params, r.params);
    require_within_budgets(r.stats);
    CHECK(r.stats.prefetches > 0);
  }
  SUBCASE("device and host only") {
    dram_store::store<float>::options o;
    o.device.budget_bytes = 2 * experts * device_block;
    const auto r = run_training<dram_store, prefetch::vertical<1>>(steps, &o);
    require_bitwise_equal(resident.params, r.params);
    CHECK(r.stats.device.peak_bytes <= r.stats.device.budget_bytes);
  }
}

TEST_CASE("tiered store: experts updated in backward, near compute, end bit for bit as an optimizer pass after it") {
  // Reference: all resident, no clipping, experts updated by the optimizer's pass at the end of each step.
  const auto resident = run_training<storage::resident, prefetch::on_demand>(steps / 2, nullptr, 0.0, false);
  temp_dir d("in-backward");
  auto o = offload_options(d.path, storage::cache_kind::lfu);
  const auto r = run_training<ssd_store, prefetch::vertical<1>>(steps / 2, &o, 0.0, true);
  require_bitwise_equal(resident.params, r.params);
  require_within_budgets(r.stats);
  temp_dir d2("two-d");
  auto o2 = offload_options(d2.path, storage::cache_kind::lfu);
  const auto r2 = run_training<ssd_store, prefetch::two_d<2>>(steps, &o2, 0.0, true);  // dense sharded too
  const auto resident_full = run_training<storage::resident, prefetch::on_demand>(steps, nullptr, 0.0, false);
  require_bitwise_equal(resident_full.params, r2.params);
  require_within_budgets(r2.stats);
  const auto resident_early = run_training<storage::resident, prefetch::on_demand>(steps / 2, nullptr, 0.0, true);
  require_bitwise_equal(resident.params, resident_early.params);  // the grouped (non-streaming) path too
  const auto clipped = run_training<storage::resident, prefetch::on_demand>(2, nullptr, 0.5, false);
  CHECK_FALSE(std::memcmp(clipped.params.data(), resident.params.data(), 64) == 0);  // the runs differ at all
}

TEST_CASE("tiered store: updating experts in backward refuses clipping, which needs every gradient first") {
  comm::local::run(1, [](comm::local& world) {
    auto groups = train::make_groups(world);
    cpu_executor ex({.threads = 1});
    using M = moe_t<storage::resident, prefetch::on_demand>;
    M moe(ex, groups.expert, {.hidden = hidden, .ffn = 8, .experts = experts});
    train::adamw<float> opt(ex, {});
    using T = train::trainer<M, train::adamw<float>, comm::local>;
    CHECK_THROWS_WITH_AS(T(moe, opt, world, groups, {.clip_norm = 1.0, .update_experts_in_backward = true}),
                         doctest::Contains("clip_norm = 0"), error);
  });
}

TEST_CASE("tiered store: vertical prefetch predicts from recorded counts and brings the next layers closer") {
  using store_t = ssd_store::store<float>;
  temp_dir d("vertical");
  store_t::options o;
  o.ssd.dir = d.path;
  o.device.budget_bytes = 4 * device_block;
  o.host.budget_bytes = 6 * full_block;
  store_t s(o);
  for (int l = 0; l < 4; ++l) s.add_layer(2, elems);
  for (int l = 0; l < 4; ++l)
    for (int e = 0; e < 2; ++e) s.visit(l, e, [](storage::block_ref<float>) {});  // fills host, spills to SSD
  CHECK(prefetch::predict_experts(s.recorded_counts(2), s.experts(2)) == std::vector<index_t>{0, 1});  // nothing recorded: all
  prefetch::vertical<2> v;
  const std::int32_t routed_to_1[2] = {0, 5};
  v.before(s, 2, prefetch::phase::forward, routed_to_1);  // layer 2 sends rows to expert 1 only
  CHECK(prefetch::predict_experts(s.recorded_counts(2), s.experts(2)) == std::vector<index_t>{1});
  s.drain();
  CHECK(s.on_device(3, 0));  // layer 3 (distance 1): to the device
  CHECK(s.on_device(3, 1));
  v.before(s, 1, prefetch::phase::forward, routed_to_1);  // layer 2 (distance 1) and 3 (distance 2)
  s.drain();
  CHECK(s.on_device(2, 1));
  CHECK_FALSE(s.on_device(2, 0));  // predicted idle: not moved
  v.before(s, 3, prefetch::phase::backward, routed_to_1);  // backward goes down: layers 2 and 1
  s.drain();
  CHECK(s.in_host(1, 0));
  CHECK(s.in_host(1, 1));
  const auto st = s.stats();
  CHECK(st.prefetches >= 3);
  CHECK(st.device.peak_bytes <= st.device.budget_bytes);
  CHECK(st.host.peak_bytes <= st.host.budget_bytes);
}

TEST_CASE("tiered store: budgets too small for one block or one layer are errors that say so") {
  using store_t = ssd_store::store<float>;
  temp_dir d("small");
  store_t::options o;
  o.ssd.dir = d.path;
  o.device.budget_bytes = device_block - 1;
  store_t s(o);
  CHECK_THROWS_WITH_AS(s.add_layer(2, elems), doctest::Contains("device budget"), error);

  o.device.budget_bytes = device_block;  // one block: a layer's two routed experts cannot both be resident
  auto small = std::make_shared<store_t>(o);
  small->add_layer(2, elems);
  auto a = small->acquire(0, 0);
  CHECK(a.params.size() == elems);
  CHECK_THROWS_WITH_AS(small->acquire(0, 1), doctest::Contains("device budget"), error);
  small->release(0, 0);
  CHECK_NOTHROW(small->acquire(0, 1));
  small->release(0, 1);
  CHECK_THROWS_WITH_AS(small->reserve_state(3), doctest::Contains("state_slots"), error);
}

TEST_CASE("tiered store: a block moves device -> host -> SSD and back with its contents") {
  using store_t = ssd_store::store<float>;
  temp_dir d("moves");
  store_t::options o;
  o.ssd.dir = d.path;
  o.device.budget_bytes = device_block;
  o.host.budget_bytes = full_block;
  store_t s(o);
  s.add_layer(2, elems);
  s.visit(0, 0, [](storage::block_ref<float> b) {
    for (std::size_t i = 0; i < b.params.size(); ++i) b.params[i] = float(i);
    b.state[3] = 7;
  });
  s.visit(0, 1, [](storage::block_ref<float> b) { b.params[0] = -1; });  // evicts block 0 to SSD
  CHECK_FALSE(s.in_host(0, 0));
  auto b = s.acquire(0, 0);  // SSD -> host -> device
  CHECK(s.on_device(0, 0));
  CHECK(b.params[5] == 5.0f);
  b.grads[2] = 3;
  s.release(0, 0);
  s.visit(0, 1, [](storage::block_ref<float> b1) { CHECK(b1.params[0] == -1); });  // block 0 leaves, grads go home
  s.visit(0, 0, [](storage::block_ref<float> b0) {
    CHECK(b0.grads[2] == 3.0f);
    CHECK(b0.state[3] == 7.0f);
    CHECK(b0.params[elems - 1] == float(elems - 1));
  });
  s.zero_grads(0);
  s.visit(0, 0, [](storage::block_ref<float> b0) { CHECK(b0.grads[2] == 0.0f); });
  const auto file = s.ssd_path();
  CHECK(std::filesystem::exists(file));
}

TEST_CASE("tiered store: a block the optimizer changed is written back at once, so its eviction writes nothing") {
  using store_t = ssd_store::store<float>;
  for (const bool eager : {true, false}) {
    CAPTURE(eager);
    temp_dir d("eager");
    store_t::options o;
    o.ssd.dir = d.path;
    o.host.budget_bytes = full_block;  // one block: visiting the other evicts it
    o.eager_write_back = eager;
    store_t s(o);
    s.add_layer(2, elems);
    s.visit(0, 0, [](storage::block_ref<float> b) { b.params[1] = 2; });  // an optimizer update
    s.drain();
    const auto before_eviction = s.stats().ssd.bytes_in;
    CHECK(before_eviction == (eager ? full_block : 0));
    CHECK(s.in_host(0, 0));  // written back, still cached
    s.visit(0, 1, [](storage::block_ref<float>) {}, false);  // evicts block 0
    CHECK_FALSE(s.in_host(0, 0));
    CHECK(s.stats().ssd.bytes_in == full_block);  // one write of block 0 either way: early or at eviction
    s.visit(0, 0, [](storage::block_ref<float> b) { CHECK(b.params[1] == 2.0f); }, false);
  }
}

TEST_CASE("tiered store: its SSD file is scratch unless a checkpoint names it") {
  using store_t = ssd_store::store<float>;
  temp_dir d("scratch");
  store_t::options o;
  o.ssd.dir = d.path;
  o.host.budget_bytes = full_block;
  std::filesystem::path file;
  {
    store_t s(o);
    s.add_layer(2, elems);
    s.visit(0, 0, [](storage::block_ref<float>) {});
    s.visit(0, 1, [](storage::block_ref<float>) {});  // block 0 goes to SSD
    file = s.ssd_path();
    CHECK(std::filesystem::exists(file));
  }
  CHECK_FALSE(std::filesystem::exists(file));
  {
    store_t s(o);
    s.add_layer(2, elems);
    s.checkpoint([](std::span<const storage::ssd_block_record> r, const storage::ssd_options&) { CHECK(r.size() == 2); });
    file = s.ssd_path();
  }
  CHECK(std::filesystem::exists(file));
}

TEST_CASE("tiered store: the README's composition compiles and trains a step") {
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  auto& comm = comms[0];
  temp_dir d("readme");
  // --- as in README.md, "Experts bigger than memory" (only the SSD directory differs) ---
  using tiers = semoe::storage::tiered<semoe::storage::device_tier, semoe::storage::host_tier,
                                       semoe::storage::ssd_tier>;
  using moe_t = semoe::basic_moe_layer<float, semoe::cpu, semoe::gate::top_k<2>, semoe::expert::ffn<semoe::act::gelu>,
                                       semoe::comm::local, tiers, semoe::prefetch::vertical<2>>;
  tiers::store<float>::options o;
  o.device.budget_bytes = 128 << 20;  // weights + grads of the experts in use
  o.host.budget_bytes = 512 << 20;    // whole blocks, optimizer state included
  o.ssd.dir = d.path;                 // everything, two crash-safe slots per block
  auto experts = std::make_shared<tiers::store<float>>(o);  // one budget shared by every layer
  moe_t moe(ex, comm, {.hidden = 512, .ffn = 1024, .experts = 8}, experts);
  // ---
  matrix<float> x(64, 512), y(64, 512), dx(64, 512);
  x.fill(0.5f);
  moe.forward(x.view(), y.view());
  moe.backward(y.view(), dx.view());
  const auto st = experts->stats();
  CHECK(st.device.peak_bytes <= o.device.budget_bytes);
  CHECK(st.misses > 0);
}

TEST_CASE("tiered store: an LFU device tier keeps the expert used most; LRU the one used last") {
  using store_t = dram_store::store<float>;
  for (auto policy : {storage::cache_kind::lfu, storage::cache_kind::lru}) {
    store_t::options o;
    o.device.budget_bytes = 2 * device_block;
    o.device_cache = policy;
    store_t s(o);
    s.add_layer(3, elems);
    auto use = [&](index_t e) {
      s.acquire(0, e, false);
      s.release(0, e);
    };
    use(0);
    use(0);
    use(0);
    use(1);
    use(2);  // the device holds two: 0 (three uses, least recent) or 1 (one use, more recent) must go
    CHECK(s.on_device(0, 2));
    CHECK(s.on_device(0, 0) == (policy == storage::cache_kind::lfu));
    CHECK(s.on_device(0, 1) == (policy == storage::cache_kind::lru));
  }
}

TEST_CASE("tiered store: an inference-only device tier holds twice the experts and refuses gradients") {
  using store_t = dram_store::store<float>;
  store_t::options o;
  o.device.budget_bytes = 2 * device_block;  // two experts with gradient room, four without
  o.device_grads = false;
  store_t s(o);
  s.add_layer(4, elems);
  for (index_t e = 0; e < 4; ++e) {
    auto b = s.acquire(0, e, false);
    CHECK(b.params.size() == elems);
    CHECK(b.grads.empty());
    s.release(0, e);
  }
  for (index_t e = 0; e < 4; ++e) CHECK(s.on_device(0, e));
  CHECK_THROWS_WITH_AS(s.acquire(0, 0, true), doctest::Contains("made for inference"), error);
}

TEST_CASE("tiered store: a block released with a compute wait is not moved before the wait returns") {
  using store_t = ssd_store::store<float>;
  temp_dir d("compute-done");
  store_t::options o;
  o.ssd.dir = d.path;
  o.device.budget_bytes = 2 * device_block;  // room for two blocks: a third evicts one
  o.host.budget_bytes = 6 * full_block;
  store_t s(o);
  s.add_layer(3, elems);
  std::vector<int> waited(3, 0);
  std::vector<bool> on_device_at_wait(3, false);
  for (index_t e = 0; e < 2; ++e) {
    auto blk = s.acquire(0, e);
    blk.grads[0] = 1.0f + static_cast<float>(e);  // "compute" wrote a gradient
    s.release(0, e, [&, e] {
      ++waited[e];
      on_device_at_wait[e] = s.on_device(0, e);  // still there: the wait comes first
    });
  }
  CHECK(waited == std::vector<int>{0, 0, 0});  // releasing waits for nothing
  (void)s.acquire(0, 2);                       // evicts expert 0 (least recently used)
  s.release(0, 2);
  CHECK(waited[0] == 1);
  CHECK(on_device_at_wait[0]);
  CHECK_FALSE(s.on_device(0, 0));
  CHECK(waited[1] == 0);  // not moved yet: not waited for
  float g = 0;
  s.visit(0, 1, [&](storage::block_ref<float> b) { g = b.grads[0]; }, false);  // the host reads its gradients
  CHECK(waited[1] == 1);
  CHECK(g == 2.0f);
}
