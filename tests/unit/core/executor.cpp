#include "semoe/core/executor.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <latch>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using semoe::cpu_executor;
using semoe::index_t;

namespace {

/// How often each index of [0, n) was visited.
std::vector<int> visit_counts(cpu_executor& ex, index_t n, index_t grain) {
  std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
  ex.parallel_for(n, [&](index_t i) { hits[static_cast<std::size_t>(i)].fetch_add(1); }, grain);
  std::vector<int> out;
  for (auto& h : hits) out.push_back(h.load());
  return out;
}

/// Sets an environment variable for one scope and restores it after.
class scoped_env {
 public:
  scoped_env(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value)
      ::setenv(name, value, 1);
    else
      ::unsetenv(name);
  }
  ~scoped_env() {
    if (old_)
      ::setenv(name_, old_->c_str(), 1);
    else
      ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

}  // namespace

TEST_CASE("cpu_executor: parallel_for visits every index exactly once") {
  for (int threads : {1, 2, 3, 8}) {
    cpu_executor ex({.threads = threads});
    CHECK(ex.concurrency() == threads);
    for (index_t n : {0, 1, 2, 5, 31, 32, 33, 1000, 1023, 1024, 1025, 4097, 100003}) {
      for (index_t grain : {-3, 0, 1, 7, 1024, 200000}) {
        CAPTURE(threads);
        CAPTURE(n);
        CAPTURE(grain);
        const auto hits = visit_counts(ex, n, grain);
        CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
      }
    }
  }
}

TEST_CASE("cpu_executor: at most grain indices run on the caller; chunks are never smaller than grain") {
  cpu_executor ex({.threads = 3});
  const auto me = std::this_thread::get_id();

  // n <= grain: no scheduling at all, the caller runs the loop in order.
  std::vector<index_t> order;
  ex.parallel_for(500, [&](index_t i) {
    CHECK(std::this_thread::get_id() == me);
    order.push_back(i);
  }, 500);
  REQUIRE(order.size() == 500);
  CHECK(std::is_sorted(order.begin(), order.end()));

  // n > grain: each maximal run of indices on one thread is a union of chunks,
  // so every run that does not reach the end holds at least `grain` indices.
  const index_t n = 20000, grain = 1500;
  std::vector<std::thread::id> who(n);
  ex.parallel_for(n, [&](index_t i) { who[static_cast<std::size_t>(i)] = std::this_thread::get_id(); }, grain);
  index_t run_begin = 0;
  for (index_t i = 1; i <= n; ++i) {
    if (i == n || who[i] != who[i - 1]) {
      CAPTURE(run_begin);
      if (i < n) CHECK(i - run_begin >= grain);
      run_begin = i;
    }
  }
}

namespace {
/// Chunks of `chunk` indices covering [0, n) exactly (the contract bodies
/// with per-chunk scratch of that size rely on).
template <class Exec>
void check_chunks(Exec& ex) {
  for (auto nc : {std::pair<index_t, index_t>{1, 1}, {10, 3}, {10, 10}, {10, 100}, {1000, 7}, {1000, 1}, {17, 0}}) {
    const index_t n = nc.first, chunk = nc.second;
    CAPTURE(n);
    CAPTURE(chunk);
    std::mutex m;
    std::vector<std::pair<index_t, index_t>> seen;
    ex.parallel_chunks(n, chunk, [&](index_t b, index_t e) {
      std::lock_guard lock(m);
      seen.emplace_back(b, e);
    });
    std::sort(seen.begin(), seen.end());
    const index_t c = std::max<index_t>(chunk, 1);
    REQUIRE(static_cast<index_t>(seen.size()) == (n + c - 1) / c);
    for (std::size_t k = 0; k < seen.size(); ++k) {
      CHECK(seen[k].first == static_cast<index_t>(k) * c);
      CHECK(seen[k].second == std::min(n, seen[k].first + c));
    }
  }
  bool called = false;
  ex.parallel_chunks(0, 4, [&](index_t, index_t) { called = true; });
  CHECK_FALSE(called);
}
}  // namespace

TEST_CASE("cpu_executor: parallel_chunks partitions [0, n) into chunks of the given size") {
  for (int threads : {1, 2, 3, 8}) {
    CAPTURE(threads);
    cpu_executor ex({.threads = threads});
    check_chunks(ex);
  }
}

TEST_CASE("sequential_executor: parallel_chunks partitions [0, n) into chunks of the given size") {
  semoe::sequential_executor ex;
  check_chunks(ex);
}

TEST_CASE("cpu_executor: every thread takes part") {
  // Each chunk blocks until all `threads` chunks have started, which can only
  // happen when that many threads run them at the same time.
  for (int threads : {2, 3, 8}) {
    cpu_executor ex({.threads = threads});
    std::latch all_started(threads);
    std::mutex m;
    std::set<std::thread::id> ids;
    ex.parallel_chunks(threads, 1, [&](index_t, index_t) {
      {
        std::lock_guard lock(m);
        ids.insert(std::this_thread::get_id());
      }
      all_started.arrive_and_wait();
    });
    CHECK(static_cast<int>(ids.size()) == threads);
  }
}

TEST_CASE("cpu_executor: an exception in a body reaches the caller and the pool stays usable") {
  for (int threads : {1, 2, 3, 8}) {
    CAPTURE(threads);
    cpu_executor ex({.threads = threads});
    SUBCASE("one failing index") {
      CHECK_THROWS_WITH_AS(ex.parallel_for(
                               10000, [](index_t i) {
                                 if (i == 7777) throw std::runtime_error("bad index 7777");
                               }, 16),
                           "bad index 7777", std::runtime_error);
    }
    SUBCASE("every chunk fails; the type survives") {
      CHECK_THROWS_AS(ex.parallel_chunks(64, 1, [](index_t, index_t) { semoe::detail::fail("chunk failed"); }),
                      semoe::error);
    }
    for (int again = 0; again < 3; ++again) {
      const auto hits = visit_counts(ex, 50000, 64);
      CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
    }
  }
}

TEST_CASE("cpu_executor: the thread count comes from options, then SEMOE_NUM_THREADS, then the hardware") {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  {
    scoped_env env("SEMOE_NUM_THREADS", "3");
    CHECK(cpu_executor().concurrency() == 3);
    CHECK(cpu_executor({.threads = 0}).concurrency() == 3);
    CHECK(cpu_executor({.threads = 2}).concurrency() == 2);
  }
  {
    scoped_env env("SEMOE_NUM_THREADS", nullptr);
    CHECK(cpu_executor().concurrency() == hw);
  }
  {
    scoped_env env("SEMOE_NUM_THREADS", "0");
    CHECK(cpu_executor().concurrency() == hw);
  }
  {
    scoped_env env("SEMOE_NUM_THREADS", "5000");
    CHECK_THROWS_AS(cpu_executor(), semoe::error);
  }
  CHECK_THROWS_AS(cpu_executor({.threads = 1025}), semoe::error);
}

// -- The Executor and MemorySpace concepts, both ways --------------------------

namespace concept_probe {
struct no_sync {  // everything but synchronize()
  using memory_space = semoe::host_space;
  using event = semoe::cpu_event;
  static constexpr bool on_device = false;
  template <class F>
  void parallel_for(index_t, const F&, index_t = 0) {}
  template <class F>
  void parallel_rows(index_t, index_t, const F&, index_t = 0) {}
  void record(event&) {}
  void wait(event&) {}
  void copy(void*, const void*, std::size_t) {}
  int concurrency() const { return 1; }
};
struct complete : no_sync {
  void synchronize() {}
};
struct no_space_copy {  // a memory space without copy()
  static constexpr const char* name = "x";
  static constexpr bool host_accessible = true, device_accessible = false;
  static void* allocate(std::size_t) { return nullptr; }
  static void deallocate(void*, std::size_t) {}
  static void zero(void*, std::size_t) {}
};
}  // namespace concept_probe

static_assert(semoe::Executor<cpu_executor> && semoe::ChunkedExecutor<cpu_executor>);
static_assert(semoe::Executor<concept_probe::complete> && !semoe::Executor<concept_probe::no_sync>);
static_assert(!semoe::ChunkedExecutor<concept_probe::complete>);
static_assert(semoe::MemorySpace<semoe::host_space> && !semoe::MemorySpace<concept_probe::no_space_copy>);
static_assert(semoe::accessible_from<semoe::host_space, cpu_executor>);

TEST_CASE("executor copy and the host space move bytes; copy_bytes picks the space that can") {
  cpu_executor ex({.threads = 2});
  std::vector<int> a(100), b(100, -1);
  for (int i = 0; i < 100; ++i) a[i] = i * i;
  ex.copy(b.data(), a.data(), a.size() * sizeof(int));
  CHECK(a == b);
  semoe::host_space::zero(b.data(), b.size() * sizeof(int));
  CHECK(std::all_of(b.begin(), b.end(), [](int v) { return v == 0; }));
  semoe::copy_bytes<semoe::host_space, semoe::host_space>(b.data(), a.data(), a.size() * sizeof(int));
  CHECK(a == b);
  semoe::cpu_event ev;
  ev.reset();
  CHECK(!ev.ready());
  ex.record(ev);
  CHECK(ev.ready());
  ex.wait(ev);  // returns: recorded
}
