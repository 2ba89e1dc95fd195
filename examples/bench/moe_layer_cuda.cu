// bench_moe_layer --backend cuda: forward + backward of one MoE layer on the
// GPU against cuBLAS's grouped GEMM of exactly the routed expert shapes, in
// the same run, on the same stream. Shapes: the CPU benchmark's (hidden 1024,
// ffn 4096, 8 experts, top-2, 4096 tokens) in fp32, and a Mixtral-sized one
// (hidden 4096, ffn 14336, 8 experts, top-2, 16384 tokens) in fp32 and with
// bf16 GEMM inputs (tensor cores; fp32 weights and activations, converted to
// bf16 for each GEMM). The bf16 floor is cuBLAS on operands already in bf16:
// the conversions are the layer's to pay. Times are wall clock around a
// synchronize.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <optional>
#include <random>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe_layer_cuda.hpp"
#include "routed_gemms.hpp"
#include "semoe/cuda/backend.cuh"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"

using namespace semoe;

namespace {

struct shape {
  const char* name;
  index_t tokens, hidden, ffn, experts;
  blas::precision inputs;
};

/// The routed problems on bf16 operands with fp32 C: the bf16 floor.
struct bf16_floor {
  buffer<__nv_bfloat16, device_space> a, b;
  std::vector<blas::bf16_problem> problems;
  bf16_floor(cuda_executor& ex, const bench::routed_gemms<device_space>& g) {
    a.resize_discard(g.a.size());
    b.resize_discard(g.b.size());
    ex.parallel_rows(1, g.a.size(), blas::detail::to_bf16_kernel{g.a.data(), g.a.size(), a.data(), g.a.size()});
    ex.parallel_rows(1, g.b.size(), blas::detail::to_bf16_kernel{g.b.data(), g.b.size(), b.data(), g.b.size()});
    for (const auto& p : g.problems)
      problems.push_back({p.ta, p.tb, p.m, p.n, p.k, p.alpha, a.data(), p.lda, b.data(), p.ldb, p.beta, p.c, p.ldc});
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class F>
double seconds(cuda_executor& ex, F&& f) {
  ex.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  f();
  ex.synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

nlohmann::json run(cuda_executor& ex, const shape& s, int reps) {
  const index_t T = s.tokens, H = s.hidden, F = s.ffn, E = s.experts;
  using layer_t = moe_layer<semoe::cuda, gate::top_k<2>, expert::ffn<act::gelu>>;
  auto comms = comm::local::make_world(1);
  const bool bf16 = s.inputs == blas::precision::bf16;
  const char* dtype = bf16 ? "bf16 GEMM inputs, fp32 master" : "fp32";
  layer_t moe(ex, comms[0],
              {.hidden = H,
               .ffn = F,
               .experts = E,
               .gate = {.capacity_factor = 1.25},
               .expert = {.gemm_inputs = s.inputs},
               .seed = 1});
  buffer<float, device_space> x(T * H), y(T * H), dy(T * H), dx(T * H);
  {
    std::vector<float> h(static_cast<std::size_t>(T * H));
    std::mt19937 g(1);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (auto& v : h) v = d(g);
    ex.copy(x.data(), h.data(), x.bytes());
    for (auto& v : h) v *= 1e-3f;
    ex.copy(dy.data(), h.data(), dy.bytes());
  }
  std::printf("[%s] %lld tokens, hidden %lld, ffn %lld, %lld experts, top-2, capacity 1.25, %s\n", s.name,
              static_cast<long long>(T), static_cast<long long>(H), static_cast<long long>(F),
              static_cast<long long>(E), dtype);
  std::fflush(stdout);
  std::vector<double> layer_times;
  for (int r = 0; r < reps + 1; ++r) {
    const double t = seconds(ex, [&] {
      moe.forward(matrix_view<const float>(x.matrix(T, H)), y.matrix(T, H));
      moe.backward(matrix_view<const float>(dy.matrix(T, H)), dx.matrix(T, H));
    });
    if (r > 0) layer_times.push_back(t);  // the first step allocates
  }

  // The expert GEMMs of the last step as one grouped call, nothing around it.
  bench::routed_gemms<device_space> gemms(moe);
  const double flops = gemms.flops;
  std::optional<bf16_floor> floor;
  if (bf16) floor.emplace(ex, gemms);
  std::vector<double> gemm_times;
  for (int r = 0; r < reps + 1; ++r) {
    const double t = seconds(ex, [&] {
      if (bf16)
        blas::grouped_gemm_bf16(ex, floor->problems);
      else
        blas::grouped_gemm<cuda_executor, float>(ex, gemms.problems);
    });
    if (r > 0) gemm_times.push_back(t);
  }
  const double tl = median(layer_times), tg = median(gemm_times);
  std::printf("  layer fwd+bwd %9.2f ms  %7.1f TFLOP/s of expert GEMMs\n", 1e3 * tl, flops / tl * 1e-12);
  std::printf("  bare grouped  %9.2f ms  %7.1f TFLOP/s (cuBLAS, the same routed shapes)\n", 1e3 * tg,
              flops / tg * 1e-12);
  std::printf("  ratio layer / GEMM = %.3f   tokens/s = %.0f\n", tl / tg, T / tl);
  return {{"shape", s.name},       {"tokens", T},
          {"hidden", H},           {"ffn", F},
          {"experts", E},          {"dtype", bf16 ? "bf16-inputs" : "fp32"},
          {"layer_ms", 1e3 * tl},  {"gemm_ms", 1e3 * tg},
          {"ratio_vs_gemm", tl / tg}, {"tflops_layer", flops / tl * 1e-12},
          {"tflops_gemm", flops / tg * 1e-12}, {"tokens_per_s", T / tl}};
}

}  // namespace

int bench_moe_layer_cuda(int reps) {
  if (!cuda_device_available()) {
    std::fprintf(stderr, "bench_moe_layer: --backend cuda: this process sees no CUDA device\n");
    return 2;
  }
  cuda_executor ex;
  cudaDeviceProp prop{};
  SEMOE_CUDA_TRY(cudaGetDeviceProperties(&prop, ex.device()));
  std::printf("moe_layer benchmark on %s (cuda backend)\n", prop.name);
  const shape shapes[] = {{"cpu-bench", 4096, 1024, 4096, 8, blas::precision::native},
                          {"mixtral", 16384, 4096, 14336, 8, blas::precision::native},
                          {"mixtral-bf16", 16384, 4096, 14336, 8, blas::precision::bf16}};
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& s : shapes) rows.push_back(run(ex, s, reps));
  std::printf("%s\n", nlohmann::json{{"benchmark", "moe_layer"},
                                     {"backend", "cuda"},
                                     {"device", prop.name},
                                     {"ratio_vs_gemm", rows[0]["ratio_vs_gemm"]},
                                     {"tokens_per_s", rows[0]["tokens_per_s"]},
                                     {"shapes", rows}}
                          .dump()
                          .c_str());
  return 0;
}
