// Budgets measured from outside the store: its tiers take their memory from a
// memory space that meters every byte it hands out (live and peak), so the
// check "peak <= budget" reads a count the store's own arenas do not keep and
// fails if they under-count, leak or pass over their limit. A configuration
// too small for the work is an error naming the tier.
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include <unistd.h>

#include "semoe/storage/tiered_store.hpp"

using namespace semoe;

namespace {

/// Bytes handed out and not yet returned, and the most at any time.
struct meter {
  std::atomic<std::size_t> live{0}, peak{0};
  void on_alloc(std::size_t n) {
    const std::size_t now = live.fetch_add(n) + n;
    std::size_t p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
  }
  void on_free(std::size_t n) { live.fetch_sub(n); }
  void reset() { live = 0, peak = 0; }
};
meter device_meter, host_meter;

/// Host memory standing for the host tier's (pinned) memory, metered.
struct metered_host_space {
  static constexpr const char* name = "metered host";
  static constexpr bool host_accessible = true;
  static constexpr bool device_accessible = false;
  static void* allocate(std::size_t bytes) { return allocate_aligned(bytes, 64); }
  static void deallocate(void* p, std::size_t bytes) { deallocate_aligned(p, bytes); }
  static void* allocate_aligned(std::size_t bytes, std::size_t alignment) {
    void* p = std::aligned_alloc(alignment, (bytes + alignment - 1) / alignment * alignment);
    if (p) host_meter.on_alloc(bytes);
    return p;
  }
  static void deallocate_aligned(void* p, std::size_t bytes) {
    if (!p) return;
    host_meter.on_free(bytes);
    std::free(p);
  }
  static void copy(void* d, const void* s, std::size_t n) { std::memcpy(d, s, n); }
  static void zero(void* p, std::size_t n) { std::memset(p, 0, n); }
};

/// Host memory standing for device memory, metered; its host staging space
/// (where the host tier lives) is metered too.
struct metered_device_space {
  static constexpr const char* name = "metered device";
  using host_staging_space = metered_host_space;
  static constexpr bool host_accessible = true;
  static constexpr bool device_accessible = false;
  static void* allocate(std::size_t bytes) {
    void* p = host_space::allocate(bytes);
    device_meter.on_alloc(bytes);
    return p;
  }
  static void deallocate(void* p, std::size_t bytes) {
    if (!p) return;
    device_meter.on_free(bytes);
    host_space::deallocate(p, bytes);
  }
  static void copy(void* d, const void* s, std::size_t n) { std::memcpy(d, s, n); }
  static void zero(void* p, std::size_t n) { std::memset(p, 0, n); }
};
static_assert(MemorySpace<metered_device_space> && MemorySpace<metered_host_space>);

using tiers = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;
using store_t = tiers::store<float, metered_device_space>;

constexpr std::size_t elems = 3000;  // floats per weight (and per gradient) of a block
constexpr std::size_t device_block = 2 * elems * sizeof(float), full_block = 4 * elems * sizeof(float);
constexpr index_t layers = 4, experts = 4;

struct temp_dir {
  std::filesystem::path path = std::filesystem::temp_directory_path() /
                               ("semoe-test-meter-" + std::to_string(::getpid()));
  temp_dir() { std::filesystem::remove_all(path); }
  ~temp_dir() { std::filesystem::remove_all(path); }
};

/// Forward and backward over every layer's experts, `passes` times, with the
/// next layer prefetched as a vertical prefetcher would.
void work(store_t& s, int passes) {
  for (int p = 0; p < passes; ++p) {
    for (index_t l = 0; l < layers; ++l) {
      if (l + 1 < layers) s.prefetch(l + 1, 0, storage::tier_level::device);
      for (index_t e = 0; e < experts; ++e) {
        auto b = s.acquire(l, e, false);
        b.params[0] += 1;
        s.release(l, e);
      }
    }
    for (index_t l = layers; l-- > 0;)
      for (index_t e = 0; e < experts; ++e) {
        auto b = s.acquire(l, e);
        b.grads[1] += 1;
        s.release(l, e);
      }
    s.end_step(layers - 1);
  }
  s.drain();  // the movers' last prefetches and write-backs
}

}  // namespace

TEST_CASE("tiered store: tiers stay within their budgets as metered by the memory they take, not by the store") {
  temp_dir d;
  device_meter.reset();
  host_meter.reset();
  {
    store_t::options o;
    o.device.budget_bytes = 3 * (device_block + 256);  // three experts' weights and gradients (256-byte rounding)
    o.host.budget_bytes = 6 * full_block + 6 * 4096;    // 6 of the 16 blocks, with the tier's 4 KiB rounding
    o.ssd.dir = d.path;
    o.movers = 2;
    store_t s(o);
    for (index_t l = 0; l < layers; ++l) s.add_layer(experts, elems);
    work(s, 3);
    const auto st = s.stats();
    INFO("device: metered peak " << device_meter.peak.load() << ", store's peak " << st.device.peak_bytes << ", budget "
                                 << o.device.budget_bytes);
    INFO("host: metered peak " << host_meter.peak.load() << ", store's peak " << st.host.peak_bytes << ", budget "
                               << o.host.budget_bytes);
    CHECK(device_meter.peak <= o.device.budget_bytes);
    CHECK(host_meter.peak <= o.host.budget_bytes);
    CHECK(device_meter.peak >= 2 * device_block);  // the work did fill the tiers
    CHECK(host_meter.peak >= 5 * full_block);
    CHECK(st.ssd.bytes_in > 0);                     // and went past host DRAM
  }
  // Everything the store took, it gave back.
  CHECK(device_meter.live == 0);
  CHECK(host_meter.live == 0);
}

TEST_CASE("tiered store: a configuration too small for a layer's working set fails naming the tier") {
  temp_dir d;
  device_meter.reset();
  host_meter.reset();
  store_t::options o;
  o.device.budget_bytes = device_block + 256;  // one block (rounded to 256 bytes); two are used at once below
  o.host.budget_bytes = 16 * full_block;
  o.ssd.dir = d.path;
  store_t s(o);
  s.add_layer(experts, elems);
  [[maybe_unused]] auto a = s.acquire(0, 0);
  CHECK_THROWS_WITH_AS(s.acquire(0, 1), doctest::Contains("the device budget"), error);
  s.release(0, 0);
  CHECK(device_meter.peak <= o.device.budget_bytes);  // the failed request took nothing
}
