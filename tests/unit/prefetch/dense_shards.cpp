// The horizontal half of 2D prefetch on two thread-ranks: each layer's dense
// parameters are sharded, and the all-gather of layer i+1 runs on the
// progress thread while layer i computes. Checked with trace timestamps, not
// by counting requests: every rank's gather of layer k started after layer
// k-1 was made whole and ended before the forward of the later rank reached
// layer k, so it ran during layer k-1's forward. The parameters the forward used are every rank's shards, whole.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <unistd.h>

#include "semoe/comm/local.hpp"
#include "semoe/core/blas.hpp"
#include "semoe/core/trace.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/prefetch/dense_shards.hpp"

using namespace semoe;

namespace {

constexpr index_t width = 384, rows = 1536, units = 4;
using model_t = layer::sequential<float, layer::linear<float>, layer::linear<float>, layer::linear<float>,
                                  layer::linear<float>>;

model_t make_model(cpu_executor& ex) {
  auto l = [&](std::uint64_t seed) { return layer::linear<float>(ex, {.in = width, .out = width}, seed); };
  return model_t(l(1), l(2), l(3), l(4));
}

struct interval {
  double begin = 0, end = 0;
};

}  // namespace

TEST_CASE("dense_shards: layer i+1's all-gather finishes while layer i computes, on two thread-ranks") {
  blas::set_num_threads(1);
  auto& rec = trace::recorder::instance();
  const auto path = std::filesystem::temp_directory_path() / ("semoe-test-shards-" + std::to_string(::getpid()));
  rec.start(path.string());
  std::mutex m;
  std::vector<std::vector<float>> out(2), reference(2);
  comm::local::run(2, [&](comm::local& world) {
    cpu_executor ex({.threads = 1});
    model_t model = make_model(ex);
    matrix<float> x(rows, width);
    for (index_t i = 0; i < rows * width; ++i) x.data()[i] = static_cast<float>((i * 7919) % 997) / 997.0f - 0.5f;
    const auto whole = model.forward(x.view());  // replicated: the reference output
    std::vector<float> ref(whole.data(), whole.data() + rows * width);

    prefetch::dense_shards<float, comm::local> shards(world);
    shards.install(model);
    REQUIRE(shards.size() == units);
    // As after an optimizer step: the parameters outside this rank's shard
    // are garbage until gathered back.
    for (auto& p : model.parameters()) std::fill(p.value.begin(), p.value.end(), 1e30f);
    shards.shards_updated();  // every layer stale; layer 0's gather starts now
    const auto y = model.forward(x.view());
    std::lock_guard lk(m);
    out[static_cast<std::size_t>(world.rank())].assign(y.data(), y.data() + rows * width);
    reference[static_cast<std::size_t>(world.rank())] = std::move(ref);
  });
  rec.stop();
  std::filesystem::remove(path);
  for (int r = 0; r < 2; ++r) {
    CAPTURE(r);
    CHECK(std::memcmp(out[r].data(), reference[r].data(), out[r].size() * sizeof(float)) == 0);
  }

  // Per rank: the gathers on its progress thread (issue k gathers layer k:
  // nothing else runs on this world) and the waits for them on its compute thread.
  std::map<int, std::vector<interval>> gather, wait;
  for (const auto& e : rec.events()) {
    const interval iv{e.begin_us, e.begin_us + e.duration_us};
    if (e.tid == comm::local::progress_lane && e.name.starts_with("all_gather #")) {
      const auto k = std::stoul(e.name.substr(12));
      auto& v = gather[e.pid];
      if (v.size() <= k) v.resize(k + 1);
      v[k] = iv;
    } else if (e.name.starts_with("gather wait ")) {
      const auto k = std::stoul(e.name.substr(12));
      auto& v = wait[e.pid];
      if (v.size() <= k) v.resize(k + 1);
      v[k] = iv;
    }
  }
  for (int r = 0; r < 2; ++r) {
    REQUIRE(gather[r].size() == units);
    REQUIRE(wait[r].size() == units);
  }
  for (std::size_t k = 1; k < units; ++k) {
    // A rank ahead of its peer waits for the peer to post, not for a copy:
    // the gather must be done by the time the later rank reaches layer k.
    const double last_arrival = std::max(wait[0][k].begin, wait[1][k].begin);
    for (int r = 0; r < 2; ++r) {
      CAPTURE(r);
      CAPTURE(k);
      const double whole = wait[r][k - 1].end;  // layer k-1 made whole: its forward starts
      MESSAGE("rank ", r, " layer ", k - 1, " forward ", (wait[r][k].begin - whole) / 1e3, " ms; gather of layer ", k,
              " from +", (gather[r][k].begin - whole) / 1e3, " to +", (gather[r][k].end - whole) / 1e3, " ms");
      CHECK(gather[r][k].begin >= whole);        // started once layer k-1 was whole ...
      CHECK(gather[r][k].end <= last_arrival);   // ... and done while layer k-1 still computed
    }
  }
}
