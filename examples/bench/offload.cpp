// Benchmark: training with expert state offloaded to SSD under SE-MoE's
// hierarchical storage, against the same model all-resident, in one run.
//
//   16 MoE layers x 8 experts, hidden 512, ffn 1024, top-2, 2048 tokens, AdamW
//   expert state (weights + grads + 2 moments) = 128 blocks x 16 MiB = 2 GiB
//   device budget: 2 layers of experts (weights + grads) = 128 MiB
//   host budget:   25 % of the expert state = 512 MiB; the rest on SSD
//   AdamW on the host copy of each layer's experts as soon as its backward
//   ends (trainer option update_experts_in_backward), no clipping
//
// It measures the all-resident step, the I/O alone (the store moves of a step
// replayed with no compute), and the offloaded step per prefetch policy
// (on_demand, vertical<1>, vertical<2>, two_d; two_d's trace is recorded), and
// prints overlap_ratio = offloaded / max(resident, io_alone): 1.0 is perfect
// overlap of loads with compute. Usage: bench_offload [ssd-dir] [steps]
// (default: a directory under the system temp dir, 3 measured steps).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "semoe/gate/top_k.hpp"
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

constexpr index_t H = 512, F = 1024, E = 8, depth = 16, tokens = 2048, classes = 16;
constexpr std::size_t elems = 2 * H * F;  // ffn<gelu> block
constexpr std::size_t full_block = 4 * elems * sizeof(float), device_block = 2 * elems * sizeof(float);
constexpr std::size_t expert_state = depth * E * full_block;

template <class Storage, class Prefetch>
using moe_t = basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, Storage, Prefetch>;
template <class Storage, class Prefetch>
using block_t = layer::residual<float, layer::layer_norm<float>, moe_t<Storage, Prefetch>>;
template <class Storage, class Prefetch>
using model_t = layer::sequential<float, layer::repeated<float, block_t<Storage, Prefetch>>, layer::linear<float>>;
using ssd_store = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

ssd_store::store<float>::options offload_options(const std::filesystem::path& dir) {
  ssd_store::store<float>::options o;
  o.device.budget_bytes = 2 * E * device_block;
  o.host.budget_bytes = expert_state / 4;
  o.ssd.dir = dir;
  return o;
}

struct measured {
  double step_s = 0;  // median over the measured steps
  storage::store_stats per_step;
};

/// Train `steps` measured steps after one warm-up; the median step time and
/// the store's counters per step.
template <class Storage, class Prefetch>
measured train_steps(int steps, typename Storage::template store<float>::options opts, const char* name,
                     bool trace_last = false) {
  using store_t = typename Storage::template store<float>;
  using M = model_t<Storage, Prefetch>;
  measured out;
  comm::local::run(1, [&](comm::local& world) {
    auto store = std::make_shared<store_t>(opts);
    auto groups = train::make_groups(world);
    cpu_executor ex({.threads = 2});
    std::printf("  %-10s building the model (expert state %.2f GiB) ...\n", name, double(expert_state) / (1 << 30));
    std::fflush(stdout);
    M model(layer::repeated<float, block_t<Storage, Prefetch>>(depth, [&](index_t i) {
              return block_t<Storage, Prefetch>(
                  ex, layer::layer_norm<float>(ex, {.dim = H}),
                  moe_t<Storage, Prefetch>(ex, groups.expert,
                                           {.hidden = H, .ffn = F, .experts = E, .seed = 10 + std::uint64_t(i)},
                                           store));
            }),
            layer::linear<float>(ex, {.in = H, .out = classes}, 3));
    train::adamw<float> opt(ex, {.lr = 1e-3});
    // Experts are updated as each layer's backward ends, where their state is.
    train::trainer tr(model, opt, world, groups, {.clip_norm = 0, .update_experts_in_backward = true});
    layer::softmax_cross_entropy<float> ce(ex);
    matrix<float> x(tokens, H), dlogits(tokens, classes);
    std::vector<std::int32_t> y(tokens);
    const philox rng(3, 0);
    for (index_t i = 0; i < tokens * H; ++i) x.data()[i] = 2 * rng.uniform(std::uint64_t(i)) - 1;
    for (index_t i = 0; i < tokens; ++i) y[i] = static_cast<std::int32_t>(i % classes);
    auto step = [&] {
      tr.step([&](M& m) {
        auto logits = m.forward(x.view());
        const double l = ce.forward(logits, std::span<const std::int32_t>(y), tokens);
        ce.backward(dlogits.view());
        m.backward(dlogits.view());
        return l;
      });
    };
    step();  // warm-up: the first step fills caches and predictions
    if constexpr (requires { store->reset_stats(); }) {
      store->drain();
      store->reset_stats();
    }
    std::vector<double> t;
    auto& rec = trace::recorder::instance();
    const std::string trace_path = rec.path();
    for (int s = 0; s < steps; ++s) {
      // SEMOE_TRACE=file.json: the timeline of the last step of the last policy.
      const bool traced = !trace_path.empty() && trace_last && s + 1 == steps;
      if (traced) rec.start(trace_path);
      const double t0 = now();
      step();
      t.push_back(now() - t0);
      if (traced) {
        rec.stop();
        rec.write();
      }
      std::printf("  %-10s step %d: %.2f s\n", name, s + 1, t.back());
      std::fflush(stdout);
    }
    std::sort(t.begin(), t.end());
    out.step_s = t[t.size() / 2];
    if constexpr (requires { store->stats(); }) {
      auto s = store->stats();
      const auto div = [&](std::uint64_t& v) { v /= static_cast<std::uint64_t>(steps); };
      for (auto* ts : {&s.device, &s.host, &s.ssd}) {
        div(ts->bytes_in);
        div(ts->bytes_out);
      }
      out.per_step = s;
    }
  });
  return out;
}

/// The store traffic of one training step with no compute: every expert of
/// every layer acquired in forward order (weights), again in backward order
/// (weights and gradients) each layer followed by its experts' update on the
/// host, and the end of the cycle.
measured io_alone(int steps, ssd_store::store<float>::options opts) {
  using store_t = ssd_store::store<float>;
  store_t s(opts);
  for (index_t l = 0; l < depth; ++l) s.add_layer(E, elems);
  for (index_t l = 0; l < depth; ++l)
    for (index_t e = 0; e < E; ++e) s.visit(l, e, [](storage::block_ref<float>) {});
  auto step = [&] {
    for (index_t l = 0; l < depth; ++l) s.zero_grads(l);
    auto pass = [&](index_t l, bool grads) {
      for (index_t e = 0; e < E; ++e) s.acquire(l, e, grads);
      for (index_t e = 0; e < E; ++e) s.release(l, e);
    };
    for (index_t l = 0; l < depth; ++l) pass(l, false);  // forward: weights
    for (index_t l = depth; l-- > 0;) {                   // backward: weights + grads, then the update
      pass(l, true);
      for (index_t e = 0; e < E; ++e) s.visit(l, e, [](storage::block_ref<float>) {});
    }
    for (index_t l = 0; l < depth; ++l) s.end_step(l);
    s.drain();
  };
  step();
  s.reset_stats();
  std::vector<double> t;
  for (int i = 0; i < steps; ++i) {
    const double t0 = now();
    step();
    t.push_back(now() - t0);
  }
  std::sort(t.begin(), t.end());
  measured out;
  out.step_s = t[t.size() / 2];
  out.per_step = s.stats();
  for (auto* ts : {&out.per_step.device, &out.per_step.host, &out.per_step.ssd}) {
    ts->bytes_in /= static_cast<std::uint64_t>(steps);
    ts->bytes_out /= static_cast<std::uint64_t>(steps);
  }
  return out;
}

double mib(std::uint64_t b) { return static_cast<double>(b) / (1 << 20); }

}  // namespace

int main(int argc, char** argv) {
  trace::recorder::instance().stop();  // only the traced step records (SEMOE_TRACE)
  const std::filesystem::path dir =
      argc > 1 ? std::filesystem::path(argv[1])
               : std::filesystem::temp_directory_path() / ("semoe-bench-offload-" + std::to_string(::getpid()));
  const int steps = argc > 2 ? std::max(1, std::atoi(argv[2])) : 3;
  blas::set_num_threads(2);
  std::printf("offload benchmark: %lld MoE layers x %lld experts, hidden %lld, ffn %lld, %lld tokens, top-2\n",
              (long long)depth, (long long)E, (long long)H, (long long)F, (long long)tokens);
  std::printf("expert state %.0f MiB; device budget %.0f MiB (2 layers), host budget %.0f MiB (25 %%), SSD: %s\n",
              mib(expert_state), mib(2 * E * device_block), mib(expert_state / 4), dir.c_str());

  const auto resident = train_steps<storage::resident, prefetch::on_demand>(steps, {}, "resident");
  const auto io = io_alone(steps, offload_options(dir / "io"));
  std::printf("  %-10s %.2f s per step (SSD read %.0f MiB, write %.0f MiB)\n", "io alone", io.step_s,
              mib(io.per_step.ssd.bytes_out), mib(io.per_step.ssd.bytes_in));
  const double bound = std::max(resident.step_s, io.step_s);

  nlohmann::json policies = nlohmann::json::array();
  auto report = [&](const char* name, const measured& m) {
    const auto& s = m.per_step;
    policies.push_back({{"policy", name},
                        {"step_s", m.step_s},
                        {"overlap_ratio", m.step_s / bound},
                        {"vs_resident", m.step_s / resident.step_s},
                        {"hit_rate", s.hit_rate()},
                        {"wait_s", s.wait_seconds / steps},
                        {"bytes_per_step",
                         {{"ssd_read", s.ssd.bytes_out}, {"ssd_write", s.ssd.bytes_in},
                          {"host_to_device", s.device.bytes_in}, {"device_to_host", s.device.bytes_out}}},
                        {"peak_bytes", {{"device", s.device.peak_bytes}, {"host", s.host.peak_bytes}}},
                        {"budget_bytes", {{"device", s.device.budget_bytes}, {"host", s.host.budget_bytes}}}});
  };
  report("on_demand", train_steps<ssd_store, prefetch::on_demand>(steps, offload_options(dir / "a"), "on_demand"));
  report("vertical<1>", train_steps<ssd_store, prefetch::vertical<1>>(steps, offload_options(dir / "b"), "vertical<1>"));
  report("vertical<2>", train_steps<ssd_store, prefetch::vertical<2>>(steps, offload_options(dir / "c"), "vertical<2>"));
  // On one process the horizontal half (dense shards gathered a layer ahead)
  // has one shard per layer; it is real work, but there is no peer to share with.
  report("two_d", train_steps<ssd_store, prefetch::two_d<2>>(steps, offload_options(dir / "d"), "two_d", true));
  std::filesystem::remove_all(dir);

  std::printf("\nall-resident step %.2f s, I/O alone %.2f s per step\n", resident.step_s, io.step_s);
  std::printf("%-12s %8s %8s %8s %6s %9s %9s %9s %9s %11s %11s\n", "policy", "step s", "overlap", "vs res",
              "hit", "SSD rd", "SSD wr", "H->D", "D->H", "dev peak", "host peak");
  for (const auto& p : policies) {
    const auto& b = p["bytes_per_step"];
    std::printf("%-12s %8.2f %8.2f %8.2f %6.2f %8.0fM %8.0fM %8.0fM %8.0fM %5.0f/%-5.0f %5.0f/%-5.0f\n",
                p["policy"].get<std::string>().c_str(), p["step_s"].get<double>(), p["overlap_ratio"].get<double>(),
                p["vs_resident"].get<double>(), p["hit_rate"].get<double>(), mib(b["ssd_read"]), mib(b["ssd_write"]),
                mib(b["host_to_device"]), mib(b["device_to_host"]), mib(p["peak_bytes"]["device"]),
                mib(p["budget_bytes"]["device"]), mib(p["peak_bytes"]["host"]), mib(p["budget_bytes"]["host"]));
  }
  std::printf("(bytes per step; peaks and budgets in MiB)\n");
  std::printf("%s\n", nlohmann::json{{"benchmark", "offload"},
                                     {"resident_step_s", resident.step_s},
                                     {"io_alone_step_s", io.step_s},
                                     {"policies", policies}}
                          .dump()
                          .c_str());
  return 0;
}
