// The cuda backend's pieces: memory spaces, the executor's streams and
// events, errors that name the call. GPU only (skipped without a device).
#include <cstring>
#include <vector>

#include "gpu_main.cuh"
#include "semoe/core/buffer.hpp"
#include "semoe/cuda/backend.cuh"

using namespace semoe;

namespace {
struct twice {
  const float* in;
  float* out;
  SEMOE_HD void operator()(index_t i) const { out[i] = 2 * in[i]; }
};
}  // namespace

static_assert(Backend<semoe::cuda> && Executor<cuda_executor>);
static_assert(accessible_from<device_space, cuda_executor> && !accessible_from<device_space, cpu_executor>);
static_assert(accessible_from<pinned_space, cuda_executor> && accessible_from<pinned_space, cpu_executor>);
static_assert(!accessible_from<host_space, cuda_executor>);

TEST_CASE("device buffers: allocate, zero and copy in stream order, counted in the ledger") {
  cuda_executor ex;
  const auto before = memory_ledger::instance().current();
  {
    buffer<float, device_space> d(1000);
    CHECK(memory_ledger::instance().current() == before + 4000);
    d.zero();
    std::vector<float> h(1000, 7.0f);
    ex.copy(h.data(), d.data(), d.bytes());
    for (float v : h) REQUIRE(v == 0.0f);
    for (int i = 0; i < 1000; ++i) h[i] = float(i);
    ex.copy(d.data(), h.data(), d.bytes());
    buffer<float, device_space> e(d);  // a device-to-device copy
    std::vector<float> back(1000);
    ex.copy(back.data(), e.data(), e.bytes());
    CHECK(back == h);
  }
  CHECK(memory_ledger::instance().current() == before);
}

TEST_CASE("a copy on the copy stream, ordered before compute by an event") {
  cuda_executor ex;
  const index_t n = 1 << 22;
  buffer<float, pinned_space> src(n), dst(n);
  for (index_t i = 0; i < n; ++i) src[i] = float(i % 1000);
  buffer<float, device_space> staged(n), doubled(n);
  cuda_event loaded;
  ex.copy_async(staged.data(), src.data(), staged.bytes());
  ex.record_copy(loaded);
  ex.wait(loaded);  // compute waits for the load, not the host
  ex.parallel_for(n, twice{staged.data(), doubled.data()});
  ex.copy(dst.data(), doubled.data(), doubled.bytes());
  for (index_t i = 0; i < n; i += 997) REQUIRE(dst[i] == 2.0f * float(i % 1000));
  CHECK(loaded.ready());
}

TEST_CASE("CUDA failures are semoe::error naming the call and CUDA's message") {
  CHECK_THROWS_WITH_AS(SEMOE_CUDA_TRY(cudaSetDevice(1 << 20)), doctest::Contains("cudaSetDevice(1 << 20)"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(SEMOE_CUDA_TRY(cudaSetDevice(1 << 20)), doctest::Contains("cudaErrorInvalidDevice"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(cuda_executor({.device = 1 << 20}), doctest::Contains("options.device"), semoe::error);
  CHECK_THROWS_WITH_AS(cuda_executor({.block = 100}), doctest::Contains("options.block = 100"), semoe::error);
}
