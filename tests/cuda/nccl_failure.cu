// comm::nccl's failure paths on one GPU: a rank that never joins is a
// timeout naming the init call, and a collective that cannot finish aborts
// the communicator with an error naming it (held back by a host function on
// the compute stream, which lets go after 3 s). Skipped without a device
// (gpu_main.cuh).
#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "gpu_main.cuh"
#include "semoe/comm/local.hpp"
#include "semoe/comm/nccl.hpp"
#include "semoe/cuda/backend.cuh"

using namespace semoe;
using namespace std::chrono_literals;

namespace nccl_failure_test {  // named: nvcc warns of unused members of internal types

/// A side channel for rank 0 of a 2-rank job whose rank 1 never comes: the
/// NCCL id "reaches" no one, and asking the peers fails naming rank 1.
struct lonely_side {
  using policy_kind = comm::comm_tag;
  int rank() const { return 0; }
  int size() const { return 2; }
  int local_rank() const { return 0; }
  int local_size() const { return 2; }
  template <class T>
  comm::request broadcast_async(std::span<T>, int) {
    return {};
  }
  template <class T>
  comm::request all_gather_async(std::span<const T>, std::span<T>) {
    semoe::detail::fail("rank 1 never joined the side channel");
  }
  template <class T>
  comm::request all_to_all_v_async(std::span<const T>, std::span<const index_t>, std::span<T>,
                                   std::span<const index_t>) {
    return {};
  }
  template <class T>
  comm::request all_reduce_async(std::span<T>, comm::reduce_op = comm::reduce_op::sum) {
    return {};
  }
  template <class T>
  comm::request reduce_scatter_async(std::span<const T>, std::span<T>, comm::reduce_op = comm::reduce_op::sum) {
    return {};
  }
  void barrier() {}
  lonely_side split(int, int) { return {}; }
};
static_assert(comm::Communicator<lonely_side>);

}  // namespace nccl_failure_test

using nccl_failure_test::lonely_side;

namespace {

/// Holds the stream until released or for 3 s at most: aborting the
/// communicator frees device memory, and cudaFree waits for all work on the
/// device, so the hold must end by itself for the abort to return.
std::atomic<bool> release{false};
void CUDART_CB hold_stream(void*) {
  const auto until = std::chrono::steady_clock::now() + 3s;
  while (!release.load() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
}

}  // namespace

TEST_CASE("nccl: a rank that never joins makes the init a timeout error, not a hang") {
  cuda_executor ex;
  comm::nccl_options o;
  o.timeout = 2s;
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(comm::nccl::over(lonely_side{}, o),
                       doctest::Contains("ncclCommInitRankConfig did not complete within 2000 ms (are all 2 ranks "
                                         "running?)"),
                       semoe::error);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(took < 10);
}

TEST_CASE("nccl: a collective that cannot finish aborts the communicator and names it; later ones fail at once") {
  comm::local::run(1, [](comm::local& side) {
    cuda_executor ex;
    comm::nccl_options o;
    o.timeout = 1s;
    auto world = comm::nccl::over(side.split(0, 0), o);
    std::vector<float> ok{1, 2};
    comm::all_reduce(world, std::span<float>(ok));  // #1 completes
    CHECK(ok == std::vector<float>{1, 2});
    // The compute stream stalls on a host function; the collective (#2) is
    // ordered after it and cannot start.
    SEMOE_CUDA_TRY(cudaLaunchHostFunc(ex.stream(), hold_stream, nullptr));
    std::vector<float> x{1, 2, 3};
    auto req = world.all_reduce_async(std::span<float>(x));
    CHECK_THROWS_WITH_AS(req.wait(),
                         doctest::Contains("all_reduce #2 did not finish within 1000 ms; the communicator is "
                                           "aborted: every rank issued it"),
                         semoe::error);
    CHECK_THROWS_WITH_AS(comm::all_reduce(world, std::span<float>(x)),
                         doctest::Contains("all_reduce on a communicator that was aborted: all_reduce #2 failed"),
                         semoe::error);
    release = true;
  });
}
