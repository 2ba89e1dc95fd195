// 2D prefetch: with prefetch::two_d the trainer keeps dense parameters sharded
// over the ranks (each owns 1/P of them and of their AdamW state), gathers
// each layer's just ahead of its forward and reduce-scatters its gradients
// after its backward. The parameters after training equal those of the
// replicated trainer bit for bit, on 1 and 2 ranks, with experts offloaded.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <mutex>
#include <vector>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/repeated.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/prefetch/two_d.hpp"
#include "semoe/storage/tiered_store.hpp"
#include "semoe/train/checkpoint.hpp"
#include "semoe/train/trainer.hpp"

using namespace semoe;

namespace {

constexpr index_t in = 12, hidden = 16, ffn = 64, classes = 5, batch = 32, experts = 4, depth = 4;
constexpr std::size_t elems = 2 * hidden * ffn;
using tiers = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;

template <class Prefetch>
using moe_t = basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, tiers, Prefetch>;
template <class Prefetch>
using block_t = layer::residual<float, layer::layer_norm<float>, moe_t<Prefetch>>;
template <class Prefetch>
using model_t = layer::sequential<float, layer::linear<float>, layer::repeated<float, block_t<Prefetch>>,
                                  layer::linear<float>>;

struct outcome {
  std::vector<std::vector<float>> params;  // per rank: dense, then its expert blocks
  std::vector<std::size_t> shard_bytes;
  bool sharded = false;
};

/// A run may save a checkpoint per rank after `save_after` steps, or start
/// from the ones in `load_from`.
struct checkpoints {
  int save_after = -1;
  std::filesystem::path save_to = {}, load_from = {};
  bool model_and_optimizer = false;  ///< save with save_checkpoint(path, model, opt, step)
};

std::filesystem::path rank_file(const std::filesystem::path& dir, int rank) {
  return dir / ("ckpt." + std::to_string(rank));
}

template <class Prefetch>
outcome run_training(int ranks, int steps, const std::filesystem::path& dir, const checkpoints& ck = {}) {
  outcome out;
  out.params.resize(static_cast<std::size_t>(ranks));
  out.shard_bytes.resize(static_cast<std::size_t>(ranks));
  std::mutex m;
  comm::local::run(ranks, [&](comm::local& world) {
    auto groups = train::make_groups(world);
    cpu_executor ex({.threads = 1});
    typename tiers::store<float>::options o;
    o.device.budget_bytes = 2 * (experts / ranks) * 2 * elems * sizeof(float);
    o.host.budget_bytes = 3 * 4 * elems * sizeof(float);
    o.ssd.dir = dir;
    o.ssd.rank = world.rank();
    auto store = std::make_shared<tiers::store<float>>(o);
    using M = model_t<Prefetch>;
    M model(layer::linear<float>(ex, {.in = in, .out = hidden}, 1),
            layer::repeated<float, block_t<Prefetch>>(depth, [&](index_t i) {
              return block_t<Prefetch>(ex, layer::layer_norm<float>(ex, {.dim = hidden}),
                                       moe_t<Prefetch>(ex, groups.expert,
                                                       {.hidden = hidden, .ffn = ffn, .experts = experts,
                                                        .seed = 60 + std::uint64_t(i)},
                                                       store));
            }),
            layer::linear<float>(ex, {.in = hidden, .out = classes}, 2));
    train::adamw<float> opt(ex, {.lr = 3e-3});
    train::trainer tr(model, opt, world, groups, {.clip_norm = 0, .update_experts_in_backward = true});
    layer::softmax_cross_entropy<float> ce(ex);
    const index_t n = batch / ranks, t0 = world.rank() * n;
    matrix<float> x(batch, in), dlogits(n, classes);
    std::vector<std::int32_t> y(batch);
    int first = 0;
    if (!ck.load_from.empty()) {
      first = static_cast<int>(train::load_checkpoint(rank_file(ck.load_from, world.rank()), tr));
      CHECK(tr.steps() == static_cast<std::uint64_t>(first));
    }
    for (int s = first; s < steps; ++s) {
      if (s == ck.save_after && ck.model_and_optimizer)
        train::save_checkpoint(rank_file(ck.save_to, world.rank()), model, opt, std::uint64_t(s));
      else if (s == ck.save_after)
        train::save_checkpoint(rank_file(ck.save_to, world.rank()), tr);
      const philox rng(4, std::uint64_t(s));
      for (index_t i = 0; i < batch * in; ++i) x.data()[i] = 2 * rng.uniform(std::uint64_t(i)) - 1;
      for (index_t i = 0; i < batch; ++i) y[i] = static_cast<std::int32_t>((x(i, 1) + 1) * 2.49f);
      tr.step([&](M& mm) {
        auto logits = mm.forward(as_matrix<const float>(x.data() + t0 * in, n, in));
        const double l = ce.forward(logits, std::span<const std::int32_t>(y.data() + t0, n), batch);
        ce.backward(dlogits.view());
        mm.backward(dlogits.view());
        return l;
      });
    }
    tr.gather_dense();  // make the sharded dense parameters whole before reading them
    std::vector<float> p;
    for (auto& q : model.parameters()) p.insert(p.end(), q.value.begin(), q.value.end());
    train::for_each_expert_block(
        model, [&](auto& b, auto&) { p.insert(p.end(), b.params.begin(), b.params.end()); },
        train::block_access::read);
    std::lock_guard lk(m);
    out.params[static_cast<std::size_t>(world.rank())] = std::move(p);
    out.shard_bytes[static_cast<std::size_t>(world.rank())] = tr.dense_shard_bytes();
    out.sharded = tr.shards_dense();
  });
  return out;
}

/// Every rank's parameters (dense, then its expert blocks) equal bit for bit.
void check_same_bits(const outcome& ref, const outcome& got) {
  REQUIRE(ref.params.size() == got.params.size());
  for (std::size_t r = 0; r < ref.params.size(); ++r) {
    CAPTURE(r);
    const auto& x = ref.params[r];
    const auto& y = got.params[r];
    REQUIRE(x.size() == y.size());
    CHECK(std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0);
  }
}

struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(const char* tag)
      : path(std::filesystem::temp_directory_path() / (std::string("semoe-2d-") + tag + "-" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
  }
  ~temp_dir() { std::filesystem::remove_all(path); }
};

}  // namespace

TEST_CASE("two_d: sharded dense parameters with layer-ahead gathers train bit for bit like replicated ones") {
  for (int ranks : {1, 2}) {
    CAPTURE(ranks);
    temp_dir a("vertical"), b("two-d");
    const auto ref = run_training<prefetch::vertical<2>>(ranks, 20, a.path);
    const auto got = run_training<prefetch::two_d<2>>(ranks, 20, b.path);
    CHECK_FALSE(ref.sharded);
    CHECK(got.sharded);
    check_same_bits(ref, got);
    // Each rank keeps 1/P of the dense parameters (and so of their AdamW state).
    const std::size_t dense = (in * hidden + hidden) + depth * (2 * hidden + hidden * experts) + (hidden * classes + classes);
    std::size_t sum = 0;
    for (auto v : got.shard_bytes) sum += v;
    CHECK(sum >= dense * sizeof(float));
    CHECK(got.shard_bytes[0] <= (dense / static_cast<std::size_t>(ranks) + 8 * (depth + 2)) * sizeof(float));
  }
}

TEST_CASE("two_d: a checkpoint of sharded dense parameters restores on every rank and continues bit for bit") {
  for (int ranks : {1, 2}) {
    CAPTURE(ranks);
    temp_dir a("ckpt-ref"), b("ckpt-save"), c("ckpt-load"), ck("ckpt-files");
    std::filesystem::create_directories(ck.path);
    const auto ref = run_training<prefetch::two_d<2>>(ranks, 8, a.path);
    // Saved after 4 steps, in the middle of a run that goes on (its gathers
    // are in flight then, and its SSD blocks are written again afterwards).
    run_training<prefetch::two_d<2>>(ranks, 6, b.path, {.save_after = 4, .save_to = ck.path});
    const auto got = run_training<prefetch::two_d<2>>(ranks, 8, c.path, {.load_from = ck.path});
    REQUIRE(got.sharded);
    check_same_bits(ref, got);
  }
}

TEST_CASE("two_d: a sharded run's checkpoint refuses the wrong rank count and the model-and-optimizer overload") {
  temp_dir b("ckpt-save2"), c("ckpt-load2"), ck("ckpt-files2");
  std::filesystem::create_directories(ck.path);
  run_training<prefetch::two_d<2>>(2, 3, b.path, {.save_after = 2, .save_to = ck.path});
  // Rank 0's file holds the AdamW state of a 2-way shard: a 1-rank run's shards are twice as long.
  CHECK_THROWS_WITH_AS(run_training<prefetch::two_d<2>>(1, 3, c.path, {.load_from = ck.path}),
                       doctest::Contains("optimizer state of tensor 'shard.0' has"), error);
  // The model-and-optimizer overload cannot know the shards: it says what to call instead.
  CHECK_THROWS_WITH_AS(run_training<prefetch::two_d<2>>(
                           1, 3, c.path, {.save_after = 2, .save_to = ck.path, .model_and_optimizer = true}),
                       doctest::Contains("save_checkpoint(path, trainer)"), error);
}
