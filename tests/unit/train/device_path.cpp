// The device code paths of layers, optimizer and trainer, run in CI on a
// device backend emulated on the host (tests/unit/core/emulated_device.hpp):
// the gate staged through host memory, the plan uploaded, parameters
// initialized on the host and copied, gradient clipping through host copies.
// Same arithmetic as the cpu backend, so every result must be bit-identical.
#include <doctest/doctest.h>

#include <filesystem>
#include <mutex>
#include <string>
#include <random>
#include <vector>

#include <unistd.h>

#include "../core/emulated_device.hpp"
#include "../core/ring_scenario.hpp"
#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/infer/ring_engine.hpp"
#include "semoe/layer/activation.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/prefetch/vertical.hpp"
#include "semoe/storage/tiered_store.hpp"
#include "semoe/train/trainer.hpp"

using namespace semoe;
using dev = test::emulated_device;

namespace {

std::vector<float> random_vec(std::size_t n, unsigned seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> v(n);
  for (auto& x : v) x = u(g);
  return v;
}

/// The emulated device memory is host memory in fact: a test may look.
std::vector<float> look(std::span<const float> s) { return {s.begin(), s.end()}; }

/// Gradients zeroed, then one forward and backward of cpu layer `a` and
/// device layer `b` on the same x and dy: outputs and dx must be the same bits.
template <class La, class Lb>
void same_step(La& a, Lb& b, dev::executor& dex, const std::vector<float>& x, const std::vector<float>& dy,
               index_t T, index_t H) {
  buffer<float, dev::memory_space> xd(T * H), dyd(T * H), yd(T * H), dxd(T * H);
  dex.copy(xd.data(), x.data(), xd.bytes());
  dex.copy(dyd.data(), dy.data(), dyd.bytes());
  std::vector<float> ya(T * H), dxa(T * H);
  a.zero_grad();
  b.zero_grad();
  a.forward(as_matrix<const float>(x.data(), T, H), as_matrix(ya.data(), T, H));
  b.forward(matrix_view<const float>(xd.matrix(T, H)), yd.matrix(T, H));
  a.backward(as_matrix<const float>(dy.data(), T, H), as_matrix(dxa.data(), T, H));
  b.backward(matrix_view<const float>(dyd.matrix(T, H)), dxd.matrix(T, H));
  CHECK(look(yd.span()) == ya);
  CHECK(look(dxd.span()) == dxa);
}

template <class Gate>
void same_layer(typename Gate::options gopt) {
  const index_t T = 96, H = 24, F = 40, E = 4;
  cpu_executor cex({.threads = 2});
  dev::executor dex({.threads = 2});
  auto w1 = comm::local::make_world(1), w2 = comm::local::make_world(1);
  moe_layer<cpu, Gate> a(cex, w1[0], {.hidden = H, .ffn = F, .experts = E, .gate = gopt, .expert = {.bias = true}, .seed = 9});
  moe_layer<dev, Gate> b(dex, w2[0], {.hidden = H, .ffn = F, .experts = E, .gate = gopt, .expert = {.bias = true}, .seed = 9});
  const auto x = random_vec(T * H, 1), dy = random_vec(T * H, 2);
  for (int step = 0; step < 2; ++step) {
    same_step(a, b, dex, x, dy, T, H);
    CHECK(look(b.parameters()[0].value) == look(a.parameters()[0].value));
    CHECK(look(b.parameters()[0].grad) == look(a.parameters()[0].grad));
    CHECK(b.plan().dropped == a.plan().dropped);
    for (index_t e = 0; e < E; ++e) {
      CHECK(look(b.store().acquire(b.layer_id(), e).params) == look(a.store().acquire(a.layer_id(), e).params));
      CHECK(look(b.store().acquire(b.layer_id(), e).grads) == look(a.store().acquire(a.layer_id(), e).grads));
    }
    a.end_step();
    b.end_step();
  }
  a.train(false);
  b.train(false);
  buffer<float, dev::memory_space> xd(T * H), yd(T * H);
  dex.copy(xd.data(), x.data(), xd.bytes());
  std::vector<float> ya(T * H);
  a.forward(as_matrix<const float>(x.data(), T, H), as_matrix(ya.data(), T, H));
  b.forward(matrix_view<const float>(xd.matrix(T, H)), yd.matrix(T, H));
  CHECK(look(yd.span()) == ya);
}

template <class B>
using model_t = layer::sequential<float, layer::linear<float, B>, layer::activation<float, act::gelu, B>,
                                  layer::dropout<float, B>,
                                  layer::residual<float, layer::layer_norm<float, B>, moe_layer<B, gate::top_k<2>>>,
                                  layer::layer_norm<float, B>, layer::linear<float, B>>;

template <class B>
model_t<B> make_model(typename B::executor& ex, comm::local& c) {
  using norm = layer::layer_norm<float, B>;
  using moe = moe_layer<B, gate::top_k<2>>;
  return model_t<B>(layer::linear<float, B>(ex, {.in = 20, .out = 16}, 1), layer::activation<float, act::gelu, B>(ex),
                    layer::dropout<float, B>(ex, {.p = 0.2}, 4),
                    layer::residual<float, norm, moe>(
                        ex, norm(ex, {.dim = 16}),
                        moe(ex, c, {.hidden = 16, .ffn = 24, .experts = 4, .expert = {.bias = true}, .seed = 3})),
                    norm(ex, {.dim = 16}), layer::linear<float, B>(ex, {.in = 16, .out = 5}, 2));
}

}  // namespace

TEST_CASE("moe_layer on a device backend: the cpu backend's results, bit for bit") {
  SUBCASE("top-2, capacity 1.0 (drops)") { same_layer<gate::top_k<2>>({.capacity_factor = 1.0}); }
  SUBCASE("top-2 dropless") { same_layer<gate::top_k<2>>({.dropless = true}); }
  SUBCASE("switch with router jitter") { same_layer<gate::switch_gate>({.jitter_eps = 0.05}); }
}

TEST_CASE("a model and its trainer on a device backend: the same losses and parameters, clipping included") {
  cpu_executor cex({.threads = 2});
  dev::executor dex({.threads = 2});
  auto w1 = comm::local::make_world(1), w2 = comm::local::make_world(1);
  auto g1 = train::make_groups(w1[0]), g2 = train::make_groups(w2[0]);
  auto a = make_model<cpu>(cex, g1.expert);
  auto b = make_model<dev>(dex, g2.expert);
  train::adamw<float, cpu> oa(cex, {.lr = 1e-2});
  train::adamw<float, dev> ob(dex, {.lr = 1e-2});
  train::trainer ta(a, oa, w1[0], g1, {.clip_norm = 0.05});  // small enough to clip every step
  train::trainer tb(b, ob, w2[0], g2, {.clip_norm = 0.05});
  layer::softmax_cross_entropy<float, cpu> la(cex, {.label_smoothing = 0.1});
  layer::softmax_cross_entropy<float, dev> lb(dex, {.label_smoothing = 0.1});
  const index_t N = 64;
  std::vector<std::int32_t> labels(N);
  for (index_t i = 0; i < N; ++i) labels[i] = static_cast<std::int32_t>(i % 5);
  matrix<float> dla(N, 5);
  matrix<float, dev::memory_space> xd(N, 20), dlb(N, 5);
  for (int step = 0; step < 4; ++step) {
    CAPTURE(step);
    const auto x = random_vec(N * 20, 10 + step);
    dex.copy(xd.data(), x.data(), xd.bytes());
    const double l1 = ta.step([&](auto& m) {
      const double l = la.forward(m.forward(as_matrix<const float>(x.data(), N, 20)), labels, N);
      la.backward(dla.view());
      m.backward(dla.view());
      return l;
    });
    const double l2 = tb.step([&](auto& m) {
      const double l = lb.forward(m.forward(matrix_view<const float>(xd.view())), labels, N);
      lb.backward(dlb.view());
      m.backward(dlb.view());
      return l;
    });
    CHECK(l1 == l2);
    CHECK(ta.last_grad_norm() > 0.05);
    CHECK(ta.last_grad_norm() == tb.last_grad_norm());
    auto pa = a.parameters(), pb = b.parameters();
    REQUIRE(pa.size() == pb.size());
    for (std::size_t i = 0; i < pa.size(); ++i) {
      CAPTURE(pa[i].name);
      CHECK(look(pb[i].value) == look(pa[i].value));
    }
  }
}

TEST_CASE("two expert-parallel ranks on a device backend (rows through host memory) equal two cpu ranks") {
  const index_t N = 64;  // per rank
  auto run = [&]<class B>(std::vector<std::vector<float>>& params, std::vector<double>& losses) {
    std::mutex m;
    comm::local::run(2, [&](comm::local& world) {
      typename B::executor ex({.threads = 1});
      auto groups = train::make_groups(world);
      auto model = make_model<B>(ex, groups.expert);
      train::adamw<float, B> opt(ex, {.lr = 1e-2});
      train::trainer tr(model, opt, world, groups, {.clip_norm = 0.05});
      layer::softmax_cross_entropy<float, B> loss(ex, {.label_smoothing = 0.1});
      std::vector<std::int32_t> labels(N);
      for (index_t i = 0; i < N; ++i) labels[i] = static_cast<std::int32_t>((i + world.rank()) % 5);
      matrix<float, typename B::memory_space> x(N, 20), dl(N, 5);
      std::vector<double> mine;
      for (int step = 0; step < 3; ++step) {
        const auto h = random_vec(N * 20, 50 + 2 * step + world.rank());
        ex.copy(x.data(), h.data(), x.bytes());
        mine.push_back(tr.step([&](auto& md) {
          const double l = loss.forward(md.forward(matrix_view<const float>(x.view())), labels, 2 * N);
          loss.backward(dl.view());
          md.backward(dl.view());
          return l;
        }));
      }
      std::lock_guard lock(m);
      if (world.rank() == 1) {  // the replicated dense parameters, and rank 1's experts
        for (auto& p : model.parameters()) params.push_back(look(p.value));
        train::for_each_expert_block(
            model, [&](auto& blk, auto&) { params.push_back(look(blk.params)); }, train::block_access::read);
        losses = mine;
      }
    });
  };
  std::vector<std::vector<float>> pa, pb;
  std::vector<double> la, lb;
  run.template operator()<cpu>(pa, la);
  run.template operator()<dev>(pb, lb);
  CHECK(la == lb);
  REQUIRE(pa.size() == pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i) CHECK(pa[i] == pb[i]);
}

namespace {

using ssd_tiers = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;

template <class B>
using offloaded_moe = basic_moe_layer<float, B, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, ssd_tiers,
                                      prefetch::vertical<1>>;

struct scratch_dir {
  std::filesystem::path path;
  explicit scratch_dir(const char* tag)
      : path(std::filesystem::temp_directory_path() / (std::string("semoe-devpath-") + tag + "-" +
                                                      std::to_string(::getpid()))) {
    std::filesystem::create_directories(path);
  }
  ~scratch_dir() { std::filesystem::remove_all(path); }
};

}  // namespace

TEST_CASE("experts offloaded to SSD under tight budgets, device tier in device memory: the cpu backend's results") {
  const index_t T = 64, H = 32, F = 48, E = 4;
  scratch_dir da("cpu"), db("dev");
  auto make_store = [&]<class Store>(const std::filesystem::path& dir) {
    typename Store::options o;
    o.device.budget_bytes = 2 * 2 * sizeof(float) * static_cast<std::size_t>(expert::ffn<>::block_elems({H, F}));
    o.host.budget_bytes = 3 * 4 * sizeof(float) * static_cast<std::size_t>(expert::ffn<>::block_elems({H, F})) + 4 * 4096;
    o.ssd.dir = dir;
    return std::make_shared<Store>(o);
  };
  cpu_executor cex({.threads = 2});
  dev::executor dex({.threads = 2});
  auto w1 = comm::local::make_world(1), w2 = comm::local::make_world(1);
  using ma = offloaded_moe<cpu>;
  using mb = offloaded_moe<dev>;
  static_assert(std::is_same_v<typename mb::store_type::memory_space, dev::memory_space>);
  auto sa = make_store.template operator()<typename ma::store_type>(da.path);
  auto sb = make_store.template operator()<typename mb::store_type>(db.path);
  ma a(cex, w1[0], {.hidden = H, .ffn = F, .experts = E, .seed = 5}, sa);
  mb b(dex, w2[0], {.hidden = H, .ffn = F, .experts = E, .seed = 5}, sb);
  train::adamw<float, cpu> oa(cex, {.lr = 1e-2});
  train::adamw<float, dev> ob(dex, {.lr = 1e-2});
  for (int step = 0; step < 3; ++step) {
    CAPTURE(step);
    dex.synchronizations = 0;
    same_step(a, b, dex, random_vec(T * H, 30 + step), random_vec(T * H, 40 + step), T, H);
    // Released blocks carry an event to the store, which waits for it before
    // moving them: the layer never waits for its own stream to release one.
    CHECK(dex.synchronizations == 0);
    oa.step(a);  // offloaded blocks: AdamW in host DRAM, on the host, for both
    ob.step(b);
    a.end_step();
    b.end_step();
  }
  for (index_t e = 0; e < E; ++e) {
    std::vector<float> pa, pb;
    sa->visit(a.layer_id(), e, [&](storage::block_ref<float> blk) { pa = look(blk.params); }, false);
    sb->visit(b.layer_id(), e, [&](storage::block_ref<float> blk) { pb = look(blk.params); }, false);
    CHECK(pa == pb);
  }
  const auto st = sb->stats();
  CHECK(st.ssd.bytes_out > 0);  // blocks really came back from SSD
  CHECK(st.device.peak_bytes <= st.device.budget_bytes);
  // The device's host tier is its staging (pinned) memory: every byte the
  // host tier holds was allocated there, counted by the space itself.
  CHECK(st.host.used_bytes > 0);
  CHECK(test::emulated_pinned_space::live_bytes() >= st.host.used_bytes);
}

TEST_CASE("ring-memory inference with slots in device memory, from DRAM and SSD: the cpu backend's outputs") {
  const index_t T = 48, H = 32, F = 64, E = 4;
  const auto x = random_vec(T * H, 77);
  for (auto source : {infer::ring_source::dram, infer::ring_source::ssd}) {
    CAPTURE(int(source));
    scratch_dir da("ring-cpu"), db("ring-dev");
    cpu_executor cex({.threads = 2});
    dev::executor dex({.threads = 2});
    const auto ya = test::ring_scenario<cpu>(cex, source, da.path, x, T, H, F, E);
    const auto yb = test::ring_scenario<dev>(dex, source, db.path, x, T, H, F, E);
    CHECK(ya == yb);
  }
}

TEST_CASE("a store's mover and loader threads allocate and copy in the context (device) of the thread that made it") {
  using space = dev::memory_space;
  space::context() = 3;  // "cudaSetDevice(3)" on this thread
  space::expected_context() = 3;
  space::foreign_allocations() = 0;
  {
    using store_t = storage::tiered<storage::device_tier, storage::host_tier>::store<float, space>;
    store_t s;
    s.add_layer(4, 1000);
    for (index_t e = 0; e < 4; ++e) s.prefetch(0, e, storage::tier_level::device);  // a mover allocates
    s.drain();
    for (index_t e = 0; e < 4; ++e) CHECK(s.on_device(0, e));
  }
  {
    infer::ring::store<float, space> r(infer::ring::store_options{.slots = 1});
    r.add_layer(2, 500);
    r.add_layer(2, 500);
    for (index_t l = 0; l < 2; ++l) {  // the loader copies both layers through the one slot
      (void)r.acquire(l, 0);
      r.release(l, 0);
      r.end_layer(l);
    }
  }
  CHECK(space::foreign_allocations() == 0);
  space::context() = 0;
  space::expected_context() = -1;
}

TEST_CASE("with tracing on, a device layer waits for each phase's device work before the phase's event closes") {
  const index_t T = 32, H = 16;
  dev::executor dex({.threads = 1});
  auto w = comm::local::make_world(1);
  moe_layer<dev, gate::top_k<2>> l(dex, w[0], {.hidden = H, .ffn = 24, .experts = 4, .seed = 2});
  buffer<float, dev::memory_space> x(T * H), y(T * H);
  const auto h = random_vec(T * H, 5);
  dex.copy(x.data(), h.data(), x.bytes());
  auto& rec = trace::recorder::instance();
  const bool was = rec.enabled();
  rec.stop();
  dex.synchronizations = 0;
  l.forward(matrix_view<const float>(x.matrix(T, H)), y.matrix(T, H));
  const int untraced = dex.synchronizations;
  const auto trace_file = std::filesystem::temp_directory_path() / ("semoe-devpath-trace-" + std::to_string(::getpid()) + ".json");
  rec.start(trace_file.string());
  dex.synchronizations = 0;
  l.forward(matrix_view<const float>(x.matrix(T, H)), y.matrix(T, H));
  const int traced = dex.synchronizations;
  rec.stop();
  if (was) rec.start(trace_file.string());
  CHECK(traced >= untraced + 5);  // router, gate, permute, experts, combine
}
