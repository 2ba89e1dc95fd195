// The layer reaches expert weights only through its storage policy and calls
// the prefetcher at its fixed points: custom policies plugged
// in are the ones that run, and see the calls they should.
#include <doctest/doctest.h>

#include <map>
#include <vector>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"

using namespace semoe;

namespace {

struct call_log {
  std::vector<std::string> events;
  int acquired = 0, released = 0, visited = 0;
};
call_log* g_log = nullptr;

// A resident store that records every acquire and release.
struct counting_storage {
  using policy_kind = storage::storage_tag;
  template <class T>
  class store : public storage::resident::store<T> {
   public:
    storage::block_ref<T> acquire(index_t layer, index_t expert) {
      if (g_log) ++g_log->acquired;
      return storage::resident::store<T>::acquire(layer, expert);
    }
    void release(index_t, index_t) {
      if (g_log) ++g_log->released;
    }
    template <class F>
    void visit(index_t layer, index_t expert, F&& f) {
      if (g_log) ++g_log->visited;
      storage::resident::store<T>::visit(layer, expert, std::forward<F>(f));
    }
  };
};

// A prefetcher that logs its hooks and the per-expert counts it is given.
struct logging_prefetch {
  using policy_kind = prefetch::prefetch_tag;
  template <class Store>
  void before(Store&, index_t layer, prefetch::phase ph, std::span<const std::int32_t> counts) {
    std::string s = std::string("before ") + (ph == prefetch::phase::forward ? "fwd" : "bwd") + " L" +
                    std::to_string(layer) + " counts";
    for (auto c : counts) s += " " + std::to_string(c);
    g_log->events.push_back(s);
  }
  template <class Store>
  void after(Store&, index_t layer, prefetch::phase ph) {
    g_log->events.push_back(std::string("after ") + (ph == prefetch::phase::forward ? "fwd" : "bwd") + " L" +
                            std::to_string(layer));
  }
  template <class Store>
  void end_step(Store&) {
    g_log->events.push_back("end_step");
  }
};

}  // namespace

TEST_CASE("resident store: blocks, state slots and bad keys") {
  storage::resident::store<float> s;
  const index_t l0 = s.add_layer(3, 10), l1 = s.add_layer(2, 4);
  CHECK(l0 == 0);
  CHECK(l1 == 1);
  CHECK(s.experts(0) == 3);
  CHECK(s.block_elems(1) == 4);
  auto b = s.acquire(0, 2);
  CHECK(b.params.size() == 10);
  CHECK(b.grads.size() == 10);
  CHECK(b.state.empty());
  b.params[0] = 7;
  s.reserve_state(2);
  b = s.acquire(0, 2);
  CHECK(b.state.size() == 20);
  CHECK(b.params[0] == 7);  // reserving state keeps the weights
  CHECK(s.bytes() == sizeof(float) * (3 * 10 + 2 * 4) * 4);
  CHECK_THROWS_WITH_AS(s.acquire(0, 3), doctest::Contains("expert 3"), semoe::error);
  CHECK_THROWS_WITH_AS(s.acquire(2, 0), doctest::Contains("no layer 2"), semoe::error);
}

TEST_CASE("a custom storage policy and prefetcher are the ones the layer uses") {
  call_log log;
  g_log = &log;
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  using layer_t =
      moe_layer<cpu, gate::top_k<2>, expert::ffn<act::relu>, comm::local, counting_storage, logging_prefetch>;
  static_assert(std::is_same_v<layer_t::store_type, counting_storage::store<float>>);
  layer_t moe(ex, comms[0], {.hidden = 4, .ffn = 4, .experts = 3, .gate = {.dropless = true}});
  CHECK(log.visited == 3);  // init writes each block once, where its optimizer state lives
  CHECK(log.acquired == 0);
  matrix<float> x(5, 4), y(5, 4), dx(5, 4);
  x.fill(0.25f);
  x(0, 0) = -1.0f;
  moe.forward(x.view(), y.view());
  moe.backward(y.view(), dx.view());
  moe.end_step();
  std::string counts;
  for (index_t e = 0; e < 3; ++e) counts += " " + std::to_string(moe.plan().counts[e]);
  const std::vector<std::string> want = {"before fwd L0 counts" + counts, "after fwd L0",
                                         "before bwd L0 counts" + counts, "after bwd L0", "end_step"};
  CHECK(log.events == want);
  int routed = 0;  // experts with rows: only they are brought to fast memory
  for (index_t e = 0; e < 3; ++e) routed += moe.plan().counts[e] > 0;
  CHECK(routed >= 2);
  CHECK(log.acquired == 2 * routed);  // once in forward and once in backward
  CHECK(log.acquired == log.released);
  g_log = nullptr;
}
