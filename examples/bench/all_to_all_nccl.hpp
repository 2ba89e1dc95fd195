// bench_all_to_all --backend nccl: one rank per GPU, comm::nccl bootstrapped
// over comm::tcp. For each message size, the all-to-all's bytes leaving a
// rank per second against the floor of the same run: a copy of the same
// bytes from this GPU to the next one (cudaMemcpyPeerAsync; with one GPU, a
// device-to-device copy), each rank measuring its own. Figures are medians
// over 5 interleaved rounds.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include <nlohmann/json.hpp>

#include "semoe/comm/nccl.hpp"
#include "semoe/comm/tcp.hpp"

namespace bench_nccl {

using namespace semoe;

inline double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// One rank of the NCCL benchmark (started by the launcher).
inline int worker(const std::vector<std::size_t>& sizes, int rounds) {
  auto world = comm::nccl::over(comm::tcp::from_env());
  const int P = world.size(), rank = world.rank(), dev = world.device();
  int gpus = 0;
  SEMOE_CUDA_TRY(cudaGetDeviceCount(&gpus));
  const int peer = (dev + 1) % gpus;
  int can_peer = 0;
  if (peer != dev) SEMOE_CUDA_TRY(cudaDeviceCanAccessPeer(&can_peer, dev, peer));
  if (can_peer) {
    const cudaError_t e = cudaDeviceEnablePeerAccess(peer, 0);
    if (e != cudaErrorPeerAccessAlreadyEnabled) SEMOE_CUDA_TRY(e);
  }
  cudaStream_t s = nullptr;
  SEMOE_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (std::size_t bytes : sizes) {
    const auto per = static_cast<index_t>(bytes / sizeof(float));
    const std::size_t n = static_cast<std::size_t>(per) * P;
    float *send = nullptr, *recv = nullptr, *remote = nullptr;
    SEMOE_CUDA_TRY(cudaMalloc(&send, n * sizeof(float)));
    SEMOE_CUDA_TRY(cudaMalloc(&recv, n * sizeof(float)));
    SEMOE_CUDA_TRY(cudaSetDevice(peer));
    SEMOE_CUDA_TRY(cudaMalloc(&remote, n * sizeof(float)));
    SEMOE_CUDA_TRY(cudaSetDevice(dev));
    const std::vector<index_t> counts(static_cast<std::size_t>(P), per);
    const std::size_t leaving = bytes * static_cast<std::size_t>(std::max(P - 1, 1));  // per rank per call
    const int reps = static_cast<int>(std::clamp<std::size_t>((std::size_t{1} << 30) / (bytes * P), 5, 200));
    auto a2a = [&] {
      world.barrier();
      const double t0 = seconds_now();
      for (int r = 0; r < reps; ++r)
        world
            .all_to_all_v_async(std::span<const float>(send, n), std::span<const index_t>(counts),
                                std::span<float>(recv, n), std::span<const index_t>(counts))
            .wait();
      return static_cast<double>(leaving) / ((seconds_now() - t0) / reps) * 1e-9;
    };
    auto copy = [&] {
      world.barrier();
      const double t0 = seconds_now();
      for (int r = 0; r < reps; ++r)
        SEMOE_CUDA_TRY(peer != dev ? cudaMemcpyPeerAsync(remote, peer, send, dev, leaving, s)
                                   : cudaMemcpyAsync(remote, send, leaving, cudaMemcpyDeviceToDevice, s));
      SEMOE_CUDA_TRY(cudaStreamSynchronize(s));
      return static_cast<double>(leaving) / ((seconds_now() - t0) / reps) * 1e-9;
    };
    a2a();  // warm-up: NCCL's connections to each peer are made on first use
    copy();
    std::vector<double> got, floor, ratio;
    for (int r = 0; r < rounds; ++r) {
      floor.push_back(copy());
      got.push_back(a2a());
      ratio.push_back(got.back() / floor.back());
    }
    double sums[2] = {median_of(got), median_of(floor)};
    std::vector<double> all(2 * static_cast<std::size_t>(P));
    comm::all_gather(world, std::span<const double>(sums, 2), std::span<double>(all));
    if (rank == 0) {
      double total = 0, worst_ratio = 1e30, floor_min = 1e30;
      for (int q = 0; q < P; ++q) {
        total += all[2 * q];
        floor_min = std::min(floor_min, all[2 * q + 1]);
        worst_ratio = std::min(worst_ratio, all[2 * q] / all[2 * q + 1]);
      }
      std::printf("RESULT %s\n", nlohmann::json{{"backend", "nccl"},
                                                {"algo", "flat"},
                                                {"ranks", P},
                                                {"bytes_per_dest", bytes},
                                                {"gb_per_s", total},
                                                {"per_rank_gb_per_s", median_of(got)},
                                                {"copy_floor_gb_per_s", floor_min},
                                                {"copy_floor", peer != dev ? "cudaMemcpyPeer" : "device memcpy"},
                                                {"ratio_vs_copy", worst_ratio}}
                                     .dump()
                                     .c_str());
      std::fflush(stdout);
    }
    SEMOE_CUDA_TRY(cudaFree(send));
    SEMOE_CUDA_TRY(cudaFree(recv));
    SEMOE_CUDA_TRY(cudaFree(remote));
  }
  SEMOE_CUDA_TRY(cudaStreamDestroy(s));
  return 0;
}

}  // namespace bench_nccl
