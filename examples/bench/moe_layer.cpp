// Benchmark: forward + backward of one MoE layer against the bare GEMMs of
// exactly the expert shapes the layer computed, measured in the same run.
//
//   hidden 1024, ffn 4096, 8 experts, top-2, 4096 tokens, capacity 1.25, gelu
//
// Usage: bench_moe_layer [--backend cpu|cuda] [--reps N]   (or a bare N)
//        [--hidden H] [--ffn F] [--experts E] [--top-k 1|2|4|8] [--tokens T]
//        [--capacity C (0: dropless)] [--shared-experts S] [--shared-ffn F]
//        [--blas-threads N]
// --backend cuda runs moe_layer_cuda.cu (builds with CUDA only, default shape).
// With --shared-experts S the layer is layer::with_shared_experts: S shared
// experts of width shared-ffn (default ffn), run as one of width S x shared-ffn
// on every token; their GEMMs join the baseline. The layer's executor has 2
// threads; OpenBLAS has --blas-threads (1: the layer's GEMMs run on the
// executor's threads, blas::gemms_on_executor).
//
// ratio_vs_gemm = layer time / GEMM time: what gating, permute, the
// activation, combine and their backward add on top of the expert GEMMs.
// The GEMM time is the fastest of three schedules of the bare library on
// cache-hot operands; ratio_vs_gemm_layer_buffers holds the layer to the
// same GEMMs on buffers laid out as its own (routed_gemms.hpp). The phase
// times come from the layer's trace scopes; routing_speedup is the routing
// path (every phase but the expert and router GEMMs) on 1 thread over 2.
// peak_bytes is the high-water mark of semoe's buffers over the layer's life
// (parameters, gradients, inputs and every workspace), against min_bytes: the
// parameters and gradients, x, y, dy, dx, the dispatched input and output
// rows, the saved pre-activation, and the one [rows, ffn] buffer a
// non-recomputing backward needs for the activation gradient.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "semoe/core/blas.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/trace.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/shared_experts.hpp"
#include "routed_gemms.hpp"
#if defined(SEMOE_BENCH_WITH_CUDA)
#include "moe_layer_cuda.hpp"
#endif

using namespace semoe;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class F>
double seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Milliseconds per step in each traced phase of the layer (router, gate,
/// permute, experts_forward, combine and their backward) over `steps` steps.
/// Under SEMOE_TRACE the user's trace keeps these events; else they are
/// recorded in memory and dropped.
template <class Step>
std::map<std::string, double> phase_ms(Step&& step, int steps) {
  auto& rec = trace::recorder::instance();
  const bool user_trace = rec.enabled();
  const std::size_t first = user_trace ? rec.events().size() : 0;
  if (!user_trace) rec.start_in_memory();
  for (int i = 0; i < steps; ++i) step();
  std::map<std::string, double> ms;
  const auto events = rec.events();
  for (std::size_t i = first; i < events.size(); ++i)
    if (events[i].category == "compute") ms[events[i].name] += 1e-3 * events[i].duration_us / steps;
  if (!user_trace) rec.stop();
  return ms;
}

/// The routing path: every phase but the expert and router GEMMs.
double routing_ms(const std::map<std::string, double>& phases) {
  double sum = 0;
  for (const auto& [name, ms] : phases)
    if (name != "experts_forward" && name != "experts_backward" && name != "router" && name != "router_backward")
      sum += ms;
  return sum;
}

/// The layer's shape (the command line's), printed and in the JSON line.
struct shape {
  index_t hidden = 1024, ffn = 4096, experts = 8, top_k = 2, tokens = 4096, shared_experts = 0, shared_ffn = 0;
  double capacity = 1.25;  // 0: dropless
  int blas_threads = 1;    // the layer's OpenBLAS threads (1: its GEMMs run on the executor)
  nlohmann::json json() const {
    return {{"hidden", hidden}, {"ffn", ffn},       {"experts", experts},
            {"top_k", top_k},   {"tokens", tokens}, {"capacity", capacity},
            {"shared_experts", shared_experts},     {"shared_ffn", shared_experts ? shared_ffn : 0}};
  }
};

template <int K, bool Shared>
int run(const shape& s, int reps) {
  const index_t tokens = s.tokens, H = s.hidden, F = s.ffn, E = s.experts, FS = s.shared_experts * s.shared_ffn;
  const int threads = 2;
  // By default one pool owns the cores: OpenBLAS on one thread, and the
  // layer runs its GEMMs on the executor's threads (blas::gemms_on_executor);
  // --blas-threads 2 lets OpenBLAS thread each GEMM instead.
  blas::set_num_threads(s.blas_threads);
  std::printf("BLAS kernels: %s\n", blas::kernel_name().c_str());
  if (const auto w = blas::kernel_warning(); !w.empty()) std::printf("warning: %s\n", w.c_str());
  cpu_executor ex({.threads = threads});
  auto comms = comm::local::make_world(1);
  using moe_t = moe_layer<cpu, gate::top_k<K>, expert::ffn<act::gelu>>;
  using layer_t = std::conditional_t<Shared, layer::with_shared_experts<moe_t>, moe_t>;

  auto& ledger = memory_ledger::instance();
  ledger.reset_peak();
  const std::size_t base = ledger.current();

  matrix<float> x(tokens, H), y(tokens, H), dy(tokens, H), dx(tokens, H);
  {
    std::mt19937 g(1);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (auto& v : x.span()) v = d(g);
    for (auto& v : dy.span()) v = d(g) * 1e-3f;
  }
  typename gate::top_k<K>::options go;
  go.capacity_factor = s.capacity > 0 ? s.capacity : 1.25;
  go.dropless = s.capacity <= 0;
  const typename moe_t::options mo{.hidden = H, .ffn = F, .experts = E, .gate = go, .seed = 1};
  auto make_layer = [&](cpu_executor& on) {
    if constexpr (Shared)
      return layer_t(on, comms[0], {.moe = mo, .shared_ffn = FS});
    else
      return layer_t(on, comms[0], mo);
  };
  layer_t layer = make_layer(ex);
  moe_t& moe = [&]() -> moe_t& {
    if constexpr (Shared)
      return layer.moe();
    else
      return layer;
  }();

  std::printf("moe_layer benchmark: %lld tokens, hidden %lld, ffn %lld, %lld experts, top-%d, %s",
              static_cast<long long>(tokens), static_cast<long long>(H), static_cast<long long>(F),
              static_cast<long long>(E), K, s.capacity > 0 ? "capacity " : "dropless");
  if (s.capacity > 0) std::printf("%.2f", s.capacity);
  if (Shared)
    std::printf(", %lld shared expert(s) of ffn %lld", static_cast<long long>(s.shared_experts),
                static_cast<long long>(s.shared_ffn));
  std::printf(", %d threads, OpenBLAS on %d\n", threads, s.blas_threads);
  std::fflush(stdout);
  std::vector<double> layer_times;
  for (int r = 0; r < reps + 1; ++r) {
    const double t = seconds([&] {
      layer.forward(x.view(), y.view());
      layer.backward(dy.view(), dx.view());
    });
    if (r > 0) layer_times.push_back(t);  // the first step allocates
  }
  const std::size_t peak = ledger.peak() - base;

  // The expert GEMMs of the last step with nothing else around them: the
  // routed experts' and, with shared experts, theirs over every token. Three
  // schedules of the bare library, in alternating rounds; the fastest is the
  // floor the layer is held to:
  //  * one GEMM after another, each on every OpenBLAS thread;
  //  * whole experts side by side, one per thread, single-threaded OpenBLAS;
  //  * semoe's cut (blas::grouped_gemm on the executor).
  // Twice: on operands every GEMM shares (cache-hot: the strict floor), and
  // on each expert's own buffers laid out as the layer's.
  const auto& plan = moe.plan();
  const index_t R = plan.kept();
  struct floor_times {
    double serial, experts, cut;
    double best() const { return std::min({serial, experts, cut}); }
  };
  auto time_floor = [&](bench::routed_gemms<host_space>& gemms) {
    std::vector<std::size_t> first = gemms.expert_first;
    first.push_back(gemms.problems.size());
    const std::vector<blas::gemm_problem<float>>& problems = gemms.problems;
    auto whole_experts = [&] {
      ex.parallel_chunks(static_cast<index_t>(first.size() - 1), 1, [&](index_t b, index_t e) {
        for (index_t x = b; x < e; ++x)
          for (std::size_t i = first[x]; i < first[x + 1]; ++i) {
            const auto& p = problems[i];
            blas::gemm(p.ta, p.tb, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta, p.c, p.ldc);
          }
      });
    };
    std::vector<double> serial_times, expert_times, cut_times;
    for (int r = 0; r < reps + 1; ++r) {
      blas::set_num_threads(threads);
      const double t1 = seconds([&] { expert::grouped_gemm<float>(std::span(problems)); });
      blas::set_num_threads(1);
      const double t2 = seconds(whole_experts);
      const double t3 = seconds([&] { expert::grouped_gemm<float>(ex, std::span(problems)); });
      if (r == 0) continue;
      serial_times.push_back(t1);
      expert_times.push_back(t2);
      cut_times.push_back(t3);
    }
    blas::set_num_threads(s.blas_threads);
    return floor_times{median(serial_times), median(expert_times), median(cut_times)};
  };
  double flops = 0;
  floor_times hot{}, in_layer{};
  for (auto where : {bench::operands::shared, bench::operands::in_layer_buffers}) {
    bench::routed_gemms<host_space> gemms(moe, where);
    if constexpr (Shared) gemms.add(layer.shared_expert().gemm_shapes(tokens));
    flops = gemms.flops;
    (where == bench::operands::shared ? hot : in_layer) = time_floor(gemms);
  }

  // Where the layer's time goes, and the routing path alone on 1 thread
  // (a layer of the same options on a one-thread executor: the same plan).
  const auto phases = phase_ms(
      [&] {
        layer.forward(x.view(), y.view());
        layer.backward(dy.view(), dx.view());
      },
      reps);
  std::map<std::string, double> phases_1;
  {
    cpu_executor ex1({.threads = 1});
    layer_t one = make_layer(ex1);
    auto step = [&] {
      one.forward(x.view(), y.view());
      one.backward(dy.view(), dx.view());
    };
    step();  // allocates
    phases_1 = phase_ms(step, reps);
  }
  const double route_1 = routing_ms(phases_1), route_n = routing_ms(phases);

  const double t_layer = median(layer_times), t_gemm = hot.best(), t_gemm_layer = in_layer.best();
  const std::size_t fb = sizeof(float);
  std::size_t params = static_cast<std::size_t>(E * moe.expert_policy().block_elems() + H * E);
  std::size_t rows = 2 * static_cast<std::size_t>(R * H) + 2 * static_cast<std::size_t>(R * F);
  if constexpr (Shared) {  // its block; its output, saved pre-activation and activation gradient over every token
    params += static_cast<std::size_t>(layer.shared_expert().block_elems());
    rows += static_cast<std::size_t>(tokens * H) + 2 * static_cast<std::size_t>(tokens * FS);
  }
  const std::size_t min_bytes = fb * (2 * params + 4 * static_cast<std::size_t>(tokens * H) + rows);
  std::printf("routed rows %lld of %lld (dropped %lld)\n", static_cast<long long>(R),
              static_cast<long long>(tokens * K), static_cast<long long>(plan.dropped));
  std::printf("layer fwd+bwd   %8.1f ms  %6.1f GFLOP/s (expert GEMM flops / layer time)\n", 1e3 * t_layer,
              flops / t_layer * 1e-9);
  std::printf("bare GEMMs      %8.1f ms  %6.1f GFLOP/s (the OpenBLAS ceiling of this machine: the fastest of\n"
              "                one GEMM after another on %d BLAS threads %.1f ms, whole experts per thread %.1f ms,\n"
              "                semoe's cut %.1f ms; all on cache-hot operands)\n",
              1e3 * t_gemm, flops / t_gemm * 1e-9, threads, 1e3 * hot.serial, 1e3 * hot.experts, 1e3 * hot.cut);
  std::printf("ratio layer / GEMM = %.3f   tokens/s = %.0f\n", t_layer / t_gemm, tokens / t_layer);
  std::printf("the same GEMMs in buffers laid out as the layer's: %.1f ms (serial %.1f, whole experts %.1f,\n"
              "                cut %.1f); ratio layer / these = %.3f\n",
              1e3 * t_gemm_layer, 1e3 * in_layer.serial, 1e3 * in_layer.experts, 1e3 * in_layer.cut,
              t_layer / t_gemm_layer);
  std::printf("phase              ms/step  share of the step\n");
  nlohmann::json phase_json = nlohmann::json::object();
  for (const auto& [name, ms] : phases) {
    std::printf("  %-16s %8.2f  %5.1f %%\n", name.c_str(), ms, 100.0 * ms / (1e3 * t_layer));
    phase_json[name] = ms;
  }
  std::printf("routing path (gate, permute, combine and their backward): 1 thread %.2f ms, %d threads %.2f ms "
              "(%.2fx)\n",
              route_1, threads, route_n, route_1 / route_n);
  std::printf("peak bytes %.1f MiB vs analytic minimum %.1f MiB (ratio %.3f)\n", peak / 1048576.0,
              min_bytes / 1048576.0, static_cast<double>(peak) / static_cast<double>(min_bytes));
  std::printf("%s\n", nlohmann::json{{"benchmark", "moe_layer"},
                                     {"backend", "cpu"},
                                     {"shape", s.json()},
                                     {"blas_threads", s.blas_threads},
                                     {"tokens_per_s", tokens / t_layer},
                                     {"ratio_vs_gemm", t_layer / t_gemm},
                                     {"layer_ms", 1e3 * t_layer},
                                     {"gemm_ms", 1e3 * t_gemm},
                                     {"gemm_ms_by_schedule",
                                      {{"serial_blas_threads", 1e3 * hot.serial},
                                       {"whole_experts", 1e3 * hot.experts},
                                       {"semoe_cut", 1e3 * hot.cut}}},
                                     {"gemm_ms_layer_buffers", 1e3 * t_gemm_layer},
                                     {"ratio_vs_gemm_layer_buffers", t_layer / t_gemm_layer},
                                     {"gflops_layer", flops / t_layer * 1e-9},
                                     {"gflops_gemm", flops / t_gemm * 1e-9},
                                     {"peak_bytes", peak},
                                     {"min_bytes", min_bytes},
                                     {"peak_ratio", static_cast<double>(peak) / static_cast<double>(min_bytes)},
                                     {"phases_ms", phase_json},
                                     {"routing_ms_1_thread", route_1},
                                     {"routing_ms", route_n},
                                     {"routing_speedup", route_1 / route_n}}
                          .dump()
                          .c_str());
  trace::recorder::instance().write();  // under SEMOE_TRACE=path: the Chrome trace of every step
  return 0;
}

template <int K>
int run_k(const shape& s, int reps) {
  return s.shared_experts > 0 ? run<K, true>(s, reps) : run<K, false>(s, reps);
}

}  // namespace

int main(int argc, char** argv) {
  std::string backend = "cpu";
  int reps = 5;
  shape s;
  bool custom = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto number = [&](double lo) {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_moe_layer: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      char* end = nullptr;
      const double v = std::strtod(argv[++i], &end);
      if (end == argv[i] || *end || !(v >= lo)) {
        std::fprintf(stderr, "bench_moe_layer: %s = '%s': expected a number >= %g\n", a.c_str(), argv[i], lo);
        std::exit(2);
      }
      custom = true;
      return v;
    };
    if (a == "--help" || a == "-h") {
      std::printf("usage: bench_moe_layer [--backend cpu|cuda] [--reps N] [--hidden H] [--ffn F] [--experts E]\n"
                  "                       [--top-k 1|2|4|8] [--tokens T] [--capacity C] [--shared-experts S]\n"
                  "                       [--shared-ffn F] [--blas-threads N]\n"
                  "  forward + backward of one MoE layer against the bare GEMMs of the routed shapes;\n"
                  "  prints ratios and ends with one JSON line. Default shape: hidden 1024, ffn 4096,\n"
                  "  8 experts, top-2, 4096 tokens, capacity 1.25 (0: dropless), no shared experts;\n"
                  "  shared experts are of width --shared-ffn (default: ffn). The layer runs on 2 threads;\n"
                  "  --blas-threads 1 (default) runs its GEMMs on them, more lets OpenBLAS thread each GEMM.\n"
                  "  Prints the time of each phase, the routing path on 1 and 2 threads, and the bare GEMMs\n"
                  "  on cache-hot operands (the floor) and in buffers laid out as the layer's.\n");
      return 0;
    } else if (a == "--backend" && i + 1 < argc) {
      backend = argv[++i];
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--hidden") {
      s.hidden = static_cast<index_t>(number(1));
    } else if (a == "--ffn") {
      s.ffn = static_cast<index_t>(number(1));
    } else if (a == "--experts") {
      s.experts = static_cast<index_t>(number(1));
    } else if (a == "--top-k") {
      s.top_k = static_cast<index_t>(number(1));
    } else if (a == "--tokens") {
      s.tokens = static_cast<index_t>(number(1));
    } else if (a == "--capacity") {
      s.capacity = number(0);
    } else if (a == "--shared-experts") {
      s.shared_experts = static_cast<index_t>(number(0));
    } else if (a == "--shared-ffn") {
      s.shared_ffn = static_cast<index_t>(number(1));
    } else if (a == "--blas-threads") {
      s.blas_threads = static_cast<int>(number(1));
    } else if (!a.empty() && a[0] != '-') {
      reps = std::max(1, std::atoi(a.c_str()));
    } else {
      std::fprintf(stderr, "bench_moe_layer: unknown argument '%s' (see --help)\n", a.c_str());
      return 2;
    }
  }
  if (s.shared_ffn == 0) s.shared_ffn = s.ffn;
  if (backend == "cuda") {
#if defined(SEMOE_BENCH_WITH_CUDA)
    if (custom) {
      std::fprintf(stderr, "bench_moe_layer: --backend cuda runs the default shape only\n");
      return 2;
    }
    return bench_moe_layer_cuda(reps);
#else
    std::fprintf(stderr, "bench_moe_layer: --backend cuda: this build has no CUDA (configure with SEMOE_CUDA=ON)\n");
    return 2;
#endif
  }
  if (backend != "cpu") {
    std::fprintf(stderr, "bench_moe_layer: --backend %s: expected cpu or cuda\n", backend.c_str());
    return 2;
  }
  try {
    switch (s.top_k) {
      case 1: return run_k<1>(s, reps);
      case 2: return run_k<2>(s, reps);
      case 4: return run_k<4>(s, reps);
      case 8: return run_k<8>(s, reps);
      default:
        std::fprintf(stderr, "bench_moe_layer: --top-k %lld: this benchmark is built for 1, 2, 4 or 8\n",
                     static_cast<long long>(s.top_k));
        return 2;
    }
  } catch (const semoe::error& e) {
    std::fprintf(stderr, "bench_moe_layer: %s\n", e.what());
    return 1;
  }
}
