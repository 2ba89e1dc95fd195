// Benchmark: SE-MoE's multi-task placement (placement/task_proportional.hpp),
// projected to 8 ranks from step times measured on 2.
//
// Four tasks train one MoE model with global batches of 512, 256, 128 and
// 128 samples (of 8 tokens each). Given the same 2 ranks each (equal_allotment), a rank of the
// first task has 256 samples a step and a rank of the last has 64, so the
// step waits for the first task's ranks; task_proportional gives the tasks
// 4/2/1/1 ranks and every rank 128 samples.
//
// What is measured: training steps of the model on 2 thread-ranks (one core
// and one BLAS thread each, comm::local, data + expert parallel) at each
// per-rank batch an allotment needs, in interleaved rounds, medians. What is
// projected: an allotment's step time on 8 ranks as its slowest task's
// measured step at that task's per-rank batch. Not modelled: the collectives
// of 8 ranks instead of 2 (the same for both allotments per sample) and the
// reduction of the shared model's gradients across tasks.
//
// Usage: bench_multitask [--rounds N] [--steps S]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/placement/task_proportional.hpp"
#include "semoe/train/trainer.hpp"

using namespace semoe;

namespace {

constexpr index_t in = 128, hidden = 256, ffn = 1024, experts = 8, classes = 16, tokens_per_sample = 8;
constexpr int world = 8, measured_ranks = 2;
const std::vector<double> task_batch{512, 256, 128, 128};

using moe_t = moe_layer<cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::local>;
using block_t = layer::residual<float, layer::layer_norm<float>, moe_t>;
using model_t = layer::sequential<float, layer::linear<float>, block_t, layer::linear<float>>;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Seconds per training step on 2 thread-ranks with `per_rank` samples on
/// each, for each batch in `per_rank`, over `rounds` interleaved rounds.
std::map<index_t, double> step_seconds(const std::vector<index_t>& per_rank, int rounds, int steps) {
  std::map<index_t, std::vector<double>> times;
  std::mutex m;
  comm::local::run(measured_ranks, [&](comm::local& w) {
    auto groups = train::make_groups(w);
    cpu_executor ex({.threads = 1});
    model_t model(layer::linear<float>(ex, {.in = in, .out = hidden}, 1),
                  block_t(ex, layer::layer_norm<float>(ex, {.dim = hidden}),
                          moe_t(ex, groups.expert, {.hidden = hidden, .ffn = ffn, .experts = experts, .seed = 3})),
                  layer::linear<float>(ex, {.in = hidden, .out = classes}, 2));
    train::adamw<float> opt(ex, {.lr = 1e-3});
    train::trainer tr(model, opt, w, groups, {.clip_norm = 1.0});
    layer::softmax_cross_entropy<float> ce(ex);
    auto run = [&](index_t samples, int count) {
      const index_t n = samples * tokens_per_sample;  // rows: a sample is a short sequence
      matrix<float> x(n, in), dl(n, classes);
      std::vector<std::int32_t> y(static_cast<std::size_t>(n));
      const philox rng(11, static_cast<std::uint64_t>(w.rank()));
      for (index_t i = 0; i < n * in; ++i) x.data()[i] = 2 * rng.uniform(static_cast<std::uint64_t>(i)) - 1;
      for (index_t i = 0; i < n; ++i) y[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i % classes);
      w.barrier();
      const auto t0 = std::chrono::steady_clock::now();
      for (int s = 0; s < count; ++s)
        tr.step([&](model_t& mod) {
          auto logits = mod.forward(x.view());
          const double l = ce.forward(logits, std::span<const std::int32_t>(y), n * measured_ranks);
          ce.backward(dl.view());
          mod.backward(dl.view());
          return l;
        });
      w.barrier();
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / count;
    };
    for (index_t n : per_rank) run(n, 2);  // warm-up: buffers sized, pages touched
    for (int r = 0; r < rounds; ++r)
      for (index_t n : per_rank) {
        const double t = run(n, steps);
        if (w.rank() == 0) {
          std::lock_guard lk(m);
          times[n].push_back(t);
        }
      }
  });
  std::map<index_t, double> out;
  for (auto& [n, v] : times) out[n] = median(v);
  return out;
}

struct projected {
  placement::task_allotment a;
  std::vector<index_t> per_rank;
  double step_s = 0;
};

}  // namespace

int main(int argc, char** argv) {
  int rounds = 5, steps = 4;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("usage: bench_multitask [--rounds N] [--steps S]\n"
                  "Step times of one MoE model on 2 thread-ranks at the per-rank batches that equal and\n"
                  "task_proportional allotments of 4 tasks (batches 512/256/128/128) give on 8 ranks,\n"
                  "and the 8-rank step time each allotment would have: a projection.\n");
      return 0;
    }
    if (i + 1 < argc && a == "--rounds") rounds = std::max(1, std::atoi(argv[++i]));
    else if (i + 1 < argc && a == "--steps") steps = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "bench_multitask: unknown argument %s (see --help)\n", a.c_str());
      return 2;
    }
  }
  blas::set_num_threads(1);
  const int T = static_cast<int>(task_batch.size());
  // Load: samples per step x seconds per sample; one model, so the same
  // seconds per sample for every task and the batches decide.
  projected equal{placement::equal_allotment(T, world), {}, 0};
  projected prop{placement::task_proportional(task_batch, world), {}, 0};
  std::vector<index_t> needed;
  for (auto* p : {&equal, &prop})
    for (int t = 0; t < T; ++t) {
      const auto n = static_cast<index_t>(task_batch[static_cast<std::size_t>(t)]) / p->a.ranks[static_cast<std::size_t>(t)];
      p->per_rank.push_back(n);
      if (std::find(needed.begin(), needed.end(), n) == needed.end()) needed.push_back(n);
    }
  std::printf("measuring steps on %d thread-ranks at per-rank batches", measured_ranks);
  for (index_t n : needed) std::printf(" %lld", static_cast<long long>(n));
  std::printf(" (%d rounds x %d steps)\n", rounds, steps);
  std::fflush(stdout);
  const auto t = step_seconds(needed, rounds, steps);
  for (auto& [n, s] : t) std::printf("  %4lld samples per rank: %.4f s per step\n", static_cast<long long>(n), s);

  double total = 0;
  for (double b : task_batch) total += b;
  nlohmann::json results = nlohmann::json::array();
  for (auto* p : {&equal, &prop}) {
    for (index_t n : p->per_rank) p->step_s = std::max(p->step_s, t.at(n));
    const double rate = total / p->step_s / world;
    std::printf("PROJECTION, %d ranks, %s allotment", world, p == &equal ? "equal" : "task_proportional");
    for (int r : p->a.ranks) std::printf(" %d", r);
    std::printf(": step %.4f s, %.1f samples/s per rank\n", p->step_s, rate);
    results.push_back({{"placement", p == &equal ? "equal" : "task_proportional"},
                       {"ranks", p->a.ranks},
                       {"per_rank_batch", p->per_rank},
                       {"step_s", p->step_s},
                       {"samples_per_s_per_rank", rate}});
  }
  const double speedup = equal.step_s / prop.step_s;
  std::printf("task_proportional / equal samples/s per rank: %.2f (projection from %d measured ranks)\n", speedup,
              measured_ranks);
  std::printf("%s\n", nlohmann::json{{"benchmark", "multitask_placement"},
                                     {"projection", true},
                                     {"measured_ranks", measured_ranks},
                                     {"projected_ranks", world},
                                     {"task_batches", task_batch},
                                     {"results", results},
                                     {"speedup", speedup}}
                          .dump()
                          .c_str());
  return 0;
}
