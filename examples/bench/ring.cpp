// Benchmark: ring-memory inference (SE-MoE §4) of a model whose expert
// weights are 4x the fast-memory budget, against compute alone (everything
// resident) and loading alone (every layer through the ring, no compute),
// measured in the same run, for K = 2, 3, 4 slots fed from host DRAM and from
// an SSD file.
//
//   16 MoE layers x 8 experts, hidden 512, ffn 1024, top-2, 1024 tokens a batch
//   expert weights 512 MiB; fast budget 128 MiB (a K-slot ring of 32 MiB slots)
//
// ratio = ring / max(compute-only, load-only): 1.0 means the ring hid the
// smaller of the two entirely. Usage: bench_ring [ssd-dir] [batches]
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
#include "semoe/infer/ring_engine.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/repeated.hpp"
#include "semoe/layer/sequential.hpp"

using namespace semoe;

namespace {

constexpr index_t H = 512, F = 1024, E = 8, depth = 16, tokens = 1024;
constexpr std::size_t layer_bytes = E * 2 * H * F * sizeof(float);

template <class Storage, class Prefetch>
using moe_t = basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, Storage, Prefetch>;
template <class Storage, class Prefetch>
using block_t = layer::residual<float, layer::layer_norm<float>, moe_t<Storage, Prefetch>>;
template <class Storage, class Prefetch>
using model_t = layer::repeated<float, block_t<Storage, Prefetch>>;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// Seconds per batch of inference (median of `batches` after one warm-up).
template <class Storage, class Prefetch>
double inference(typename Storage::template store<float>::options o, int batches, std::vector<float>* first = nullptr) {
  cpu_executor ex({.threads = 2});
  auto comms = comm::local::make_world(1);
  auto store = std::make_shared<typename Storage::template store<float>>(o);
  model_t<Storage, Prefetch> model(depth, [&](index_t i) {
    return block_t<Storage, Prefetch>(ex, layer::layer_norm<float>(ex, {.dim = H}),
                                      moe_t<Storage, Prefetch>(ex, comms[0],
                                                               {.hidden = H, .ffn = F, .experts = E,
                                                                .seed = 30 + std::uint64_t(i)},
                                                               store));
  });
  model.train(false);
  matrix<float> x(tokens, H), y(tokens, H);
  const philox rng(5, 0);
  for (index_t i = 0; i < tokens * H; ++i) x.data()[i] = 2 * rng.uniform(std::uint64_t(i)) - 1;
  std::vector<double> t;
  for (int b = 0; b <= batches; ++b) {
    const double t0 = now();
    model.forward(x.view(), y.view());
    if (b > 0) t.push_back(now() - t0);
    if (b == 0 && first) first->assign(y.data(), y.data() + tokens * H);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

/// Seconds per pass of every layer through a K-slot ring with no compute.
double load_only(infer::ring::store_options o, int batches) {
  infer::ring::store<float> s(o);
  for (index_t l = 0; l < depth; ++l) s.add_layer(E, 2 * H * F);
  auto pass = [&] {
    for (index_t l = 0; l < depth; ++l) {
      for (index_t e = 0; e < E; ++e) s.acquire(l, e);
      for (index_t e = 0; e < E; ++e) s.release(l, e);
      s.end_layer(l);
    }
  };
  pass();
  std::vector<double> t;
  for (int b = 0; b < batches; ++b) {
    const double t0 = now();
    pass();
    t.push_back(now() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path dir =
      argc > 1 ? std::filesystem::path(argv[1])
               : std::filesystem::temp_directory_path() / ("semoe-bench-ring-" + std::to_string(::getpid()));
  const int batches = argc > 2 ? std::max(1, std::atoi(argv[2])) : 3;
  blas::set_num_threads(2);
  const std::size_t budget = depth * layer_bytes / 4;
  std::printf("ring benchmark: %lld MoE layers x %lld experts (hidden %lld, ffn %lld), %lld tokens a batch\n",
              (long long)depth, (long long)E, (long long)H, (long long)F, (long long)tokens);
  std::printf("expert weights %.0f MiB, fast budget %.0f MiB (1/4); slots of %.0f MiB\n",
              double(depth * layer_bytes) / (1 << 20), double(budget) / (1 << 20), double(layer_bytes) / (1 << 20));
  std::vector<float> want;
  const double compute = inference<storage::resident, prefetch::on_demand>({}, batches, &want);
  std::printf("  compute only (all resident): %.3f s a batch\n", compute);
  nlohmann::json results = nlohmann::json::array();
  bool identical = true;
  for (auto source : {infer::ring_source::dram, infer::ring_source::ssd})
    for (index_t k : {2, 3, 4}) {
      infer::ring::store_options o;
      o.slots = k;
      o.source = source;
      o.ssd.dir = dir;
      const double load = load_only(o, batches);
      std::vector<float> got;
      const double ring = inference<infer::ring, infer::ring_release>(o, batches, &got);
      identical = identical && got == want;
      const char* src = source == infer::ring_source::dram ? "dram" : "ssd";
      const double ratio = ring / std::max(compute, load);
      std::printf("  K = %lld, from %-4s: ring %.3f s, load only %.3f s -> ratio %.3f\n", (long long)k, src, ring,
                  load, ratio);
      std::fflush(stdout);
      results.push_back({{"k", k}, {"source", src}, {"unit", "layer"}, {"ratio", ratio}, {"ring_s", ring},
                         {"compute_s", compute}, {"load_s", load}});
    }
  // The same 128 MiB as one-expert slots: a slot frees as soon as its expert
  // is done, not when its whole layer is, so the loader has more slack.
  for (auto source : {infer::ring_source::dram, infer::ring_source::ssd}) {
    infer::ring::store_options o;
    o.unit = infer::ring_unit::expert;
    o.budget_bytes = budget;
    o.source = source;
    o.ssd.dir = dir;
    const double load = load_only(o, batches);
    std::vector<float> got;
    const double ring = inference<infer::ring, infer::ring_release>(o, batches, &got);
    identical = identical && got == want;
    const index_t k = static_cast<index_t>(budget / (layer_bytes / E));
    const char* src = source == infer::ring_source::dram ? "dram" : "ssd";
    const double ratio = ring / std::max(compute, load);
    std::printf("  K = %lld one-expert slots, from %-4s: ring %.3f s, load only %.3f s -> ratio %.3f\n",
                (long long)k, src, ring, load, ratio);
    std::fflush(stdout);
    results.push_back({{"k", k}, {"source", src}, {"unit", "expert"}, {"ratio", ratio}, {"ring_s", ring},
                       {"compute_s", compute}, {"load_s", load}});
  }
  std::filesystem::remove_all(dir);
  std::printf("outputs of the ring equal all-resident inference bit for bit: %s\n", identical ? "yes" : "NO");
  std::printf("%s\n", nlohmann::json{{"benchmark", "ring"}, {"results", results}, {"bitwise_equal", identical}}
                          .dump()
                          .c_str());
  return identical ? 0 : 1;
}
