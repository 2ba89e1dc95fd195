// The layer's kernel bodies (permute, combine, activations, AdamW) run on the
// GPU through cuda_executor and on the CPU through cpu_executor; the results
// must agree. Exits 77 (ctest: skipped) where no GPU is present.
#include <cmath>
#include <cstdio>
#include <vector>

#include "semoe/core/executor.hpp"
#include "semoe/cuda/executor.cuh"
#include "semoe/expert/ffn.hpp"
#include "semoe/layer/dispatch.hpp"
#include "semoe/train/optimizer.hpp"

using namespace semoe;

namespace {

template <class T>
T* managed(std::size_t n) {
  T* p = nullptr;
  SEMOE_CUDA_TRY(cudaMallocManaged(&p, n * sizeof(T)));
  return p;
}

int compare(const char* what, const float* a, const float* b, index_t n, float tol) {
  for (index_t i = 0; i < n; ++i)
    if (!(std::abs(a[i] - b[i]) <= tol * std::max(1.0f, std::abs(b[i])))) {
      std::fprintf(stderr, "kernels: %s differs at %lld: gpu %.9g cpu %.9g\n", what, static_cast<long long>(i), a[i], b[i]);
      return 1;
    }
  std::printf("kernels: %s agrees on %lld values\n", what, static_cast<long long>(n));
  return 0;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::puts("kernels: no CUDA device, skipping");
    return 77;
  }
  cuda_executor gpu;
  cpu_executor cpu({.threads = 2});
  const index_t T = 1000, k = 2, H = 64, A = T * k, R = A;
  philox rng(3);

  // A routing: every token to experts (t % 7) and ((t + 3) % 7), all kept, token order.
  auto* row = managed<index_t>(A);
  auto* weight = managed<float>(A);
  for (index_t a = 0; a < A; ++a) {
    row[a] = (a * 7919) % R;  // a permutation of [0, R)
    weight[a] = rng.uniform(a);
  }
  auto* x = managed<float>(T * H);
  for (index_t i = 0; i < T * H; ++i) x[i] = 2 * rng.uniform(i, 1) - 1;

  int bad = 0;
  {  // permute
    auto* g = managed<float>(R * H);
    std::vector<float> c(R * H);
    gpu.parallel_for(A, layer::detail::permute_kernel<float>{row, k, H, x, H, g, H});
    gpu.synchronize();
    cpu.parallel_for(A, layer::detail::permute_kernel<float>{row, k, H, x, H, c.data(), H});
    bad += compare("permute", g, c.data(), R * H, 0);
    // combine back
    auto* yg = managed<float>(T * H);
    std::vector<float> yc(T * H);
    gpu.parallel_for(T, layer::detail::combine_kernel<float>{row, weight, k, H, g, H, yg, H});
    gpu.synchronize();
    cpu.parallel_for(T, layer::detail::combine_kernel<float>{row, weight, k, H, c.data(), H, yc.data(), H});
    bad += compare("combine", yg, yc.data(), T * H, 1e-6f);
    cudaFree(g);
    cudaFree(yg);
  }
  {  // activations: eval forward, training forward keeping the slope, backward from it
    auto* pre = managed<float>(T * H);
    auto* out = managed<float>(T * H);
    auto* da = managed<float>(T * H);
    std::vector<float> pc(T * H), oc(T * H), dc(T * H);
    for (index_t i = 0; i < T * H; ++i) pc[i] = pre[i] = 3 * x[i];
    for (index_t i = 0; i < T * H; ++i) dc[i] = da[i] = x[i];
    gpu.parallel_for(T, expert::detail::activation_forward_kernel<float, act::gelu>{pre, H, out, H, H});
    gpu.synchronize();
    cpu.parallel_for(T, expert::detail::activation_forward_kernel<float, act::gelu>{pc.data(), H, oc.data(), H, H});
    bad += compare("gelu", out, oc.data(), T * H, 1e-6f);
    gpu.parallel_for(T, expert::detail::activation_forward_keep_slope_kernel<float, act::gelu>{pre, H, out, H, H});
    gpu.synchronize();
    using keep = expert::detail::activation_forward_keep_slope_kernel<float, act::gelu>;
    cpu.parallel_for(T, keep{pc.data(), H, oc.data(), H, H});
    bad += compare("gelu keeping its slope", out, oc.data(), T * H, 1e-6f);
    bad += compare("gelu slope", pre, pc.data(), T * H, 1e-6f);
    gpu.parallel_for(T, expert::detail::times_slope_kernel<float, act::gelu>{pre, H, da, H, H});
    gpu.synchronize();
    cpu.parallel_for(T, expert::detail::times_slope_kernel<float, act::gelu>{pc.data(), H, dc.data(), H, H});
    bad += compare("gelu backward", da, dc.data(), T * H, 1e-6f);
    cudaFree(pre);
    cudaFree(out);
    cudaFree(da);
  }
  {  // AdamW
    const index_t n = 4096;
    auto* p = managed<float>(4 * n);
    std::vector<float> c(4 * n);
    for (index_t i = 0; i < 4 * n; ++i) c[i] = p[i] = (i < 2 * n) ? rng.uniform(i, 2) - 0.5f : 0.0f;
    gpu.parallel_for(n, train::detail::adamw_kernel<float>{p, p + n, p + 2 * n, p + 3 * n, 1e-3f, 0.9f, 0.999f, 1e-8f,
                                                           0.01f, 0.1f, 0.001f});
    gpu.synchronize();
    cpu.parallel_for(n, train::detail::adamw_kernel<float>{c.data(), c.data() + n, c.data() + 2 * n, c.data() + 3 * n,
                                                           1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 0.1f, 0.001f});
    bad += compare("adamw", p, c.data(), 4 * n, 1e-6f);
    cudaFree(p);
  }
  cudaFree(row);
  cudaFree(weight);
  cudaFree(x);
  return bad ? 1 : 0;
}
