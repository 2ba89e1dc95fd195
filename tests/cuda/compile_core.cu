// Compiles the core headers with nvcc and runs one SEMOE_HD kernel body on the
// GPU and on the host: the philox draws must agree bit for bit.
// Exits 77 (ctest: skipped) where no GPU is present.
#include <cstdio>
#include <vector>

#include <cuda_runtime.h>

#include "semoe/core/config.hpp"
#include "semoe/core/random.hpp"
#include "semoe/core/tensor.hpp"

namespace {

struct fill_uniform {
  semoe::vector_view<float> out;
  semoe::philox rng;
  SEMOE_HD void operator()(semoe::index_t i) const {
    out(i) = rng.uniform(static_cast<std::uint64_t>(i), static_cast<int>(i));
  }
};

template <class F>
SEMOE_KERNEL void for_each_index(F f, semoe::index_t n) {
  const semoe::index_t i = static_cast<semoe::index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) f(i);
}

bool ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "compile_core: %s: %s\n", what, cudaGetErrorString(e));
  return false;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::puts("compile_core: no CUDA device, skipping");
    return 77;
  }

  constexpr semoe::index_t n = 1 << 16;
  const semoe::philox rng(0x5e30e, 7);
  float* d = nullptr;
  if (!ok(cudaMalloc(&d, n * sizeof(float)), "cudaMalloc")) return 1;
  for_each_index<<<(n + 255) / 256, 256>>>(fill_uniform{semoe::vector_view<float>(d, {n}), rng}, n);
  std::vector<float> gpu(n), cpu(n);
  if (!ok(cudaGetLastError(), "launch") ||
      !ok(cudaMemcpy(gpu.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy"))
    return 1;
  cudaFree(d);

  const fill_uniform host{semoe::vector_view<float>(cpu.data(), {n}), rng};
  for (semoe::index_t i = 0; i < n; ++i) host(i);
  for (semoe::index_t i = 0; i < n; ++i) {
    if (gpu[i] != cpu[i]) {
      std::fprintf(stderr, "compile_core: mismatch at %lld: gpu %.9g, cpu %.9g\n",
                   static_cast<long long>(i), gpu[i], cpu[i]);
      return 1;
    }
  }
  std::printf("compile_core: %lld philox draws agree on GPU and CPU\n", static_cast<long long>(n));
  return 0;
}
