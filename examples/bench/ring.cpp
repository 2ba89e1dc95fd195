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
// smaller of the two entirely. Compute-only, load-only and ring batches run in
// interleaved rounds; each figure is the median over the rounds.
// Usage: bench_ring [ssd-dir] [rounds, default 7]
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

/// A model of `depth` residual blocks (layer norm + MoE) over one expert store.
template <class Storage, class Prefetch>
struct runner {
  using store_t = typename Storage::template store<float>;
  cpu_executor ex{{.threads = 2}};
  std::vector<comm::local> comms = comm::local::make_world(1);
  std::shared_ptr<store_t> store;
  model_t<Storage, Prefetch> model;
  matrix<float> x{tokens, H}, y{tokens, H};

  explicit runner(typename store_t::options o)
      : store(std::make_shared<store_t>(o)), model(depth, [&](index_t i) {
          return block_t<Storage, Prefetch>(ex, layer::layer_norm<float>(ex, {.dim = H}),
                                            moe_t<Storage, Prefetch>(ex, comms[0],
                                                                     {.hidden = H, .ffn = F, .experts = E,
                                                                      .seed = 30 + std::uint64_t(i)},
                                                                     store));
        }) {
    model.train(false);
    const philox rng(5, 0);
    for (index_t i = 0; i < tokens * H; ++i) x.data()[i] = 2 * rng.uniform(std::uint64_t(i)) - 1;
    model.forward(x.view(), y.view());  // warm-up: first touch, the ring's SSD copy and loader
  }
  /// Seconds for one batch of inference.
  double batch() {
    const double t0 = now();
    model.forward(x.view(), y.view());
    return now() - t0;
  }
  std::vector<float> output() const { return {y.data(), y.data() + tokens * H}; }
};

/// Every layer through a K-slot ring with no compute.
struct loader {
  infer::ring::store<float> s;
  explicit loader(infer::ring::store_options o) : s(o) {
    for (index_t l = 0; l < depth; ++l) s.add_layer(E, 2 * H * F);
    (void)pass();  // warm-up
  }
  /// Seconds for one pass.
  double pass() {
    const double t0 = now();
    for (index_t l = 0; l < depth; ++l) {
      for (index_t e = 0; e < E; ++e) s.acquire(l, e);
      for (index_t e = 0; e < E; ++e) s.release(l, e);
      s.end_layer(l);
    }
    return now() - t0;
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
    std::printf("usage: bench_ring [ssd-dir] [rounds, default 7]\n"
                "Ring-memory inference of a model 4x the fast-memory budget, K = 2, 3, 4 slots fed from DRAM and\n"
                "from an SSD file in ssd-dir (default: the temporary directory), against compute alone and\n"
                "loading alone, in interleaved rounds.\n");
    return 0;
  }
  const std::filesystem::path dir =
      argc > 1 ? std::filesystem::path(argv[1])
               : std::filesystem::temp_directory_path() / ("semoe-bench-ring-" + std::to_string(::getpid()));
  const int batches = argc > 2 ? std::max(1, std::atoi(argv[2])) : 7;
  blas::set_num_threads(2);
  std::printf("BLAS kernels: %s\n", blas::kernel_name().c_str());
  if (const auto w = blas::kernel_warning(); !w.empty()) std::printf("warning: %s\n", w.c_str());
  const std::size_t budget = depth * layer_bytes / 4;
  std::printf("ring benchmark: %lld MoE layers x %lld experts (hidden %lld, ffn %lld), %lld tokens a batch\n",
              (long long)depth, (long long)E, (long long)H, (long long)F, (long long)tokens);
  std::printf("expert weights %.0f MiB, fast budget %.0f MiB (1/4); slots of %.0f MiB\n",
              double(depth * layer_bytes) / (1 << 20), double(budget) / (1 << 20), double(layer_bytes) / (1 << 20));
  // Compute-only, load-only and ring batches run in interleaved rounds, and
  // each figure is the median over rounds: a slow spell of this shared box
  // then weighs on all three alike instead of on whichever ran during it.
  runner<storage::resident, prefetch::on_demand> resident({});
  const std::vector<float> want = resident.output();
  nlohmann::json results = nlohmann::json::array();
  bool identical = true;
  auto measure = [&](infer::ring::store_options o, const char* what) {
    o.ssd.dir = dir / "load-only";  // one SSD file each
    loader load(o);
    o.ssd.dir = dir / "ring";
    runner<infer::ring, infer::ring_release> ring(o);
    std::vector<double> tc, tl, tr, ratio;
    for (int r = 0; r < batches; ++r) {
      tc.push_back(resident.batch());
      tl.push_back(load.pass());
      tr.push_back(ring.batch());
      ratio.push_back(tr.back() / std::max(tc.back(), tl.back()));
    }
    identical = identical && ring.output() == want;
    const auto st = ring.store->stats();
    const index_t k = ring.store->slots();
    const char* src = o.source == infer::ring_source::dram ? "dram" : "ssd";
    std::printf("  K = %2lld %s from %-4s: compute %.3f s, load %.3f s, ring %.3f s -> ratio %.3f"
                "  (compute waited %.3f s a batch)\n",
                (long long)k, what, src, median(tc), median(tl), median(tr), median(ratio),
                st.wait_seconds / (batches + 1));
    std::fflush(stdout);
    results.push_back({{"k", k}, {"source", src},
                       {"unit", o.unit == infer::ring_unit::layer ? "layer" : "expert"}, {"ratio", median(ratio)},
                       {"ring_s", median(tr)}, {"compute_s", median(tc)}, {"load_s", median(tl)}});
  };
  for (auto source : {infer::ring_source::dram, infer::ring_source::ssd})
    for (index_t k : {2, 3, 4}) {
      infer::ring::store_options o;
      o.slots = k;
      o.source = source;
      measure(o, "layer slots,     ");
    }
  // The same budget as one-expert slots: a slot frees as soon as its expert
  // is done, not when its whole layer is, so the loader has more slack.
  for (auto source : {infer::ring_source::dram, infer::ring_source::ssd}) {
    infer::ring::store_options o;
    o.unit = infer::ring_unit::expert;
    o.budget_bytes = budget;
    o.source = source;
    measure(o, "one-expert slots,");
  }
  // Control: a ring with a slot for every layer loads once and never turns.
  // Its ratio is what the ring's own bookkeeping costs; the rows above add
  // the loader's work, which on a CPU build takes cores from compute (a GPU
  // build's copy engine would not).
  {
    infer::ring::store_options o;
    o.slots = depth;
    measure(o, "(all fit) slots, ");
  }
  std::filesystem::remove_all(dir);
  std::printf("outputs of the ring equal all-resident inference bit for bit: %s\n", identical ? "yes" : "NO");
  std::printf("%s\n", nlohmann::json{{"benchmark", "ring"}, {"results", results}, {"bitwise_equal", identical}}
                          .dump()
                          .c_str());
  return identical ? 0 : 1;
}
