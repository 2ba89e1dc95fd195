// Benchmark: forward + backward of one MoE layer against the bare GEMMs of
// exactly the expert shapes the layer computed, measured in the same run.
//
//   hidden 1024, ffn 4096, 8 experts, top-2, 4096 tokens, capacity 1.25, gelu
//
// Usage: bench_moe_layer [--backend cpu|cuda] [--reps N]   (or a bare N)
// --backend cuda runs moe_layer_cuda.cu (builds with CUDA only).
//
// ratio_vs_gemm = layer time / GEMM time: what gating, permute, the
// activation, combine and their backward add on top of the expert GEMMs.
// peak_bytes is the high-water mark of semoe's buffers over the layer's life
// (parameters, gradients, inputs and every workspace), against min_bytes: the
// parameters and gradients, x, y, dy, dx, the dispatched input and output
// rows, the saved pre-activation, and the one [rows, ffn] buffer a
// non-recomputing backward needs for the activation gradient.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "semoe/core/blas.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"
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

}  // namespace

int main(int argc, char** argv) {
  std::string backend = "cpu";
  int reps = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("usage: bench_moe_layer [--backend cpu|cuda] [--reps N]\n"
                  "  forward + backward of one MoE layer against the bare GEMMs of the routed shapes;\n"
                  "  prints ratios and ends with one JSON line\n");
      return 0;
    } else if (a == "--backend" && i + 1 < argc) {
      backend = argv[++i];
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (!a.empty() && a[0] != '-') {
      reps = std::max(1, std::atoi(a.c_str()));
    } else {
      std::fprintf(stderr, "bench_moe_layer: unknown argument '%s' (see --help)\n", a.c_str());
      return 2;
    }
  }
  if (backend == "cuda") {
#if defined(SEMOE_BENCH_WITH_CUDA)
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
  const index_t tokens = 4096, H = 1024, F = 4096, E = 8;
  const int threads = 2;
  blas::set_num_threads(threads);
  std::printf("BLAS kernels: %s\n", blas::kernel_name().c_str());
  if (const auto w = blas::kernel_warning(); !w.empty()) std::printf("warning: %s\n", w.c_str());
  cpu_executor ex({.threads = threads});
  auto comms = comm::local::make_world(1);
  using layer_t = moe_layer<cpu, gate::top_k<2>, expert::ffn<act::gelu>>;

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
  layer_t moe(ex, comms[0], {.hidden = H, .ffn = F, .experts = E, .gate = {.capacity_factor = 1.25}, .seed = 1});

  std::printf("moe_layer benchmark: %lld tokens, hidden %lld, ffn %lld, %lld experts, top-2, capacity 1.25, %d threads\n",
              static_cast<long long>(tokens), static_cast<long long>(H), static_cast<long long>(F),
              static_cast<long long>(E), threads);
  std::fflush(stdout);
  std::vector<double> layer_times;
  for (int r = 0; r < reps + 1; ++r) {
    const double t = seconds([&] {
      moe.forward(x.view(), y.view());
      moe.backward(dy.view(), dx.view());
    });
    if (r > 0) layer_times.push_back(t);  // the first step allocates
  }
  const std::size_t peak = ledger.peak() - base;

  // The expert GEMMs of the last step, one by one, with nothing else around them.
  const auto& plan = moe.plan();
  const index_t R = plan.kept();
  bench::routed_gemms<host_space> gemms(moe);
  const double flops = gemms.flops;
  std::vector<double> gemm_times;
  for (int r = 0; r < reps + 1; ++r) {
    const double t = seconds([&] { expert::grouped_gemm<float>(gemms.problems); });
    if (r > 0) gemm_times.push_back(t);
  }

  const double t_layer = median(layer_times), t_gemm = median(gemm_times);
  const std::size_t fb = sizeof(float);
  const std::size_t params = static_cast<std::size_t>(E * moe.expert_policy().block_elems() + H * E);
  const std::size_t min_bytes = fb * (2 * params + 4 * static_cast<std::size_t>(tokens * H) +
                                      2 * static_cast<std::size_t>(R * H) + 2 * static_cast<std::size_t>(R * F));
  std::printf("routed rows %lld of %lld (dropped %lld)\n", static_cast<long long>(R),
              static_cast<long long>(tokens * 2), static_cast<long long>(plan.dropped));
  std::printf("layer fwd+bwd   %8.1f ms  %6.1f GFLOP/s (expert GEMM flops / layer time)\n", 1e3 * t_layer,
              flops / t_layer * 1e-9);
  std::printf("bare GEMMs      %8.1f ms  %6.1f GFLOP/s (the OpenBLAS ceiling of this machine)\n",
              1e3 * t_gemm, flops / t_gemm * 1e-9);
  std::printf("ratio layer / GEMM = %.3f   tokens/s = %.0f\n", t_layer / t_gemm, tokens / t_layer);
  std::printf("peak bytes %.1f MiB vs analytic minimum %.1f MiB (ratio %.3f)\n", peak / 1048576.0,
              min_bytes / 1048576.0, static_cast<double>(peak) / static_cast<double>(min_bytes));
  std::printf("%s\n", nlohmann::json{{"benchmark", "moe_layer"},
                                     {"backend", "cpu"},
                                     {"tokens_per_s", tokens / t_layer},
                                     {"ratio_vs_gemm", t_layer / t_gemm},
                                     {"layer_ms", 1e3 * t_layer},
                                     {"gemm_ms", 1e3 * t_gemm},
                                     {"gflops_layer", flops / t_layer * 1e-9},
                                     {"gflops_gemm", flops / t_gemm * 1e-9},
                                     {"peak_bytes", peak},
                                     {"min_bytes", min_bytes},
                                     {"peak_ratio", static_cast<double>(peak) / static_cast<double>(min_bytes)}}
                          .dump()
                          .c_str());
  return 0;
}
