// SE-MoE's DRAM admission rule in the tiered store: with host DRAM full, a
// block hit fewer than theta times is read SSD -> staging buffer -> device
// and displaces no cached block; once its count reaches theta it is admitted
// like any other. A prefetch to DRAM gives up on such a block; backward,
// whose gradients need a home in DRAM, always admits. The staging buffer is
// one block of the host budget.
#include <doctest/doctest.h>

#include <filesystem>
#include <string>

#include <unistd.h>

#include "semoe/storage/tiered_store.hpp"

using namespace semoe;

namespace {

using ssd_store = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;
using store_t = ssd_store::store<float>;

constexpr index_t elems = 1024;
constexpr std::size_t host_block = 4 * elems * sizeof(float);    // weights, grads, two moments
constexpr std::size_t device_block = 2 * elems * sizeof(float);  // weights, grads

struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(const char* tag)
      : path(std::filesystem::temp_directory_path() /
             (std::string("semoe-test-") + tag + "-" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
  }
  ~temp_dir() { std::filesystem::remove_all(path); }
};

float weight(index_t e, index_t i) { return static_cast<float>(100 * e + i); }

/// Acquire expert e's weights, check every one, release.
void use(store_t& s, index_t e, bool grads = false) {
  auto r = s.acquire(0, e, grads);
  bool same = true;
  for (index_t i = 0; i < elems; ++i) same = same && r.params[static_cast<std::size_t>(i)] == weight(e, i);
  CHECK_MESSAGE(same, "expert ", e, "'s weights");
  s.release(0, e);
}

}  // namespace

TEST_CASE("tiered store: a block below the LFU threshold is read through, displacing no cached block") {
  temp_dir d("admission");
  store_t::options o;
  o.ssd.dir = d.path;
  o.host.budget_bytes = 3 * host_block;  // two cached blocks once the staging buffer takes its one
  o.device.budget_bytes = device_block;  // one block: each use of another evicts it
  o.cache = storage::cache_kind::lfu;
  o.lfu_options = {.decay = 1.0, .decay_every = 1, .threshold = 3.0};
  store_t s(o);
  s.add_layer(4, elems);
  for (index_t e : {3, 2, 0, 1})  // one hit each; DRAM keeps the last three, 3 goes to SSD
    s.visit(0, e, [&](storage::block_ref<float> r) {
      for (index_t i = 0; i < elems; ++i) r.params[static_cast<std::size_t>(i)] = weight(e, i);
    });
  s.drain();  // the eager write-backs land: 0 and 1 are in DRAM and on SSD, and load from DRAM
  for (int k = 0; k < 2; ++k)  // experts 0 and 1 reach three hits
    for (index_t e : {0, 1}) use(s, e);
  REQUIRE(s.in_host(0, 0));
  REQUIRE(s.in_host(0, 1));
  REQUIRE_FALSE(s.in_host(0, 3));

  use(s, 3);  // one hit: read through (the staging buffer takes the least-hit slot, expert 2's)
  CHECK(s.stats().read_through == 1);
  CHECK_FALSE(s.in_host(0, 3));
  use(s, 2);  // one hit: read through; 0 and 1 keep their places
  CHECK(s.stats().read_through == 2);
  CHECK_FALSE(s.in_host(0, 2));
  CHECK(s.in_host(0, 0));
  CHECK(s.in_host(0, 1));
  CHECK(s.stats().host.peak_bytes <= o.host.budget_bytes);

  s.prefetch(0, 3, storage::tier_level::host);  // two hits: a prefetch does not displace for it
  s.drain();
  CHECK_FALSE(s.in_host(0, 3));

  use(s, 2);  // still on the device: a hit, loading nothing; its count reaches three
  CHECK(s.stats().read_through == 2);
  CHECK_FALSE(s.in_host(0, 2));
  use(s, 0);  // takes the device slot, so the next use of 2 loads again
  use(s, 2);  // three hits: admitted, displacing the least-hit cached block (1)
  CHECK(s.in_host(0, 2));
  CHECK_FALSE(s.in_host(0, 1));
  CHECK(s.stats().read_through == 2);

  use(s, 3, true);  // backward: its gradients need a DRAM home, whatever its count
  CHECK(s.in_host(0, 3));
  CHECK(s.stats().read_through == 2);
}

TEST_CASE("tiered store: under lru every block is admitted (nothing is read through)") {
  temp_dir d("admission-lru");
  store_t::options o;
  o.ssd.dir = d.path;
  o.host.budget_bytes = 2 * host_block;
  o.device.budget_bytes = device_block;
  o.cache = storage::cache_kind::lru;
  store_t s(o);
  s.add_layer(3, elems);
  for (index_t e : {2, 0, 1})
    s.visit(0, e, [&](storage::block_ref<float> r) {
      for (index_t i = 0; i < elems; ++i) r.params[static_cast<std::size_t>(i)] = weight(e, i);
    });
  use(s, 2);
  CHECK(s.in_host(0, 2));
  CHECK(s.stats().read_through == 0);
}
