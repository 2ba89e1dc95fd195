// A portable checkpoint saved on W ranks with expert-parallel size EP loads on
// any other layout and the run goes on as if it had never stopped: the next
// two steps' losses equal those of the run that kept going, for every pair of
// 1..4 ranks, with experts resident and with experts on SSD. Damaged,
// incomplete and mismatched checkpoints are refused by name.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/repeated.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/prefetch/vertical.hpp"
#include "semoe/storage/tiered_store.hpp"
#include "semoe/train/portable_checkpoint.hpp"
#include "semoe/train/trainer.hpp"
#include "support/files.hpp"

using namespace semoe;

namespace {

// 12 experts: a multiple of every expert-parallel size from 1 to 4.
constexpr index_t in = 10, hidden = 16, classes = 5, batch = 24, experts = 12, depth = 2;

using ssd_store = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;

template <class Storage>
using moe_t = basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, Storage,
                              prefetch::vertical<1>>;
template <class Storage>
using block_t = layer::residual<float, layer::layer_norm<float>, moe_t<Storage>>;
template <class Storage>
using model_t =
    layer::sequential<float, layer::linear<float>, layer::repeated<float, block_t<Storage>>, layer::linear<float>>;

using semoe::testing::temp_dir;

void make_batch(std::uint64_t step, matrix<float>& x, std::vector<std::int32_t>& y) {
  const philox rng(31, step);
  for (index_t i = 0; i < batch; ++i) {
    float s = 0;
    for (index_t j = 0; j < in; ++j) s += (x(i, j) = 2 * rng.uniform(std::uint64_t(i * in + j)) - 1) * (j % 3 - 1.0f);
    y[i] = static_cast<std::int32_t>(std::clamp<index_t>(static_cast<index_t>((s + 2.5f) / 5.0f * classes), 0, classes - 1));
  }
}

struct plan {
  int ranks = 1, expert_parallel = 1;
  index_t ffn = 24;
  index_t out = classes;  ///< width of the last linear layer
  bool dropless = false;  ///< routing with no per-group statistics (no capacity, no balance losses)
  std::filesystem::path ssd{};  ///< empty: experts resident
  std::filesystem::path load_from{}, save_to{};
  int steps_before_save = 0, steps_after = 0;
};

struct outcome {
  std::vector<double> losses;  ///< the steps after the save (or the load)
  train::checkpoint_info loaded;
};

/// W thread-ranks train on `batch` rows split evenly (rank r: rows r*n..),
/// optionally load a checkpoint first and save one after some steps.
template <class Storage>
outcome run(const plan& p) {
  outcome out;
  std::mutex m;
  comm::local::run(p.ranks, [&](comm::local& world) {
    auto groups = train::make_groups(world, p.expert_parallel);
    cpu_executor ex({.threads = 1});
    using store_t = typename Storage::template store<float>;
    typename store_t::options so{};
    if constexpr (!std::is_same_v<Storage, storage::resident>) {
      const std::size_t elems = 2 * hidden * p.ffn;
      const index_t local = experts / p.expert_parallel;
      so.device.budget_bytes = 2 * 2 * elems * sizeof(float);
      so.host.budget_bytes = depth * local * 4 * elems * sizeof(float) / 3;
      so.ssd.dir = p.ssd;
      so.ssd.rank = world.rank();
    }
    auto store = std::make_shared<store_t>(so);
    using M = model_t<Storage>;
    gate::top_k_options<2> g;
    g.balance = gate::balance_mode::aux_free;  // gate state that moves every step
    g.bias_rate = 1e-2;
    // Capacity and balance statistics are per expert group: only routing
    // without them is the same function of the batch for every group size.
    if (p.dropless) g = {.dropless = true, .balance = gate::balance_mode::none, .z_loss_coef = 0};
    M model(layer::linear<float>(ex, {.in = in, .out = hidden}, 1),
            layer::repeated<float, block_t<Storage>>(depth, [&](index_t i) {
              return block_t<Storage>(ex, layer::layer_norm<float>(ex, {.dim = hidden}),
                                      moe_t<Storage>(ex, groups.expert,
                                                     {.hidden = hidden, .ffn = p.ffn, .experts = experts, .gate = g,
                                                      .seed = 70 + std::uint64_t(i)},
                                                     store));
            }),
            layer::linear<float>(ex, {.in = hidden, .out = p.out}, 2));
    train::adamw<float> opt(ex, {.lr = 1e-2});
    train::trainer tr(model, opt, world, groups, {.clip_norm = 0.5});
    layer::softmax_cross_entropy<float> ce(ex);
    const index_t n = batch / p.ranks, r0 = world.rank() * n;
    matrix<float> x(batch, in), dlogits(n, p.out);
    std::vector<std::int32_t> y(batch);
    train::checkpoint_info info;
    if (!p.load_from.empty()) {
      info = train::load_portable_checkpoint(p.load_from, tr);
      // The steps that key gate noise and jitter go on from the saved one.
      train::for_each_moe_layer(model, [&](auto& l) {
        if (l.step() != info.step) throw std::runtime_error("a MoE layer's step was not restored");
      });
    }
    std::vector<double> losses;
    const int total = p.steps_before_save + p.steps_after;
    for (int s = 0; s < total; ++s) {
      if (s == p.steps_before_save && !p.save_to.empty())
        train::save_portable_checkpoint(p.save_to, tr, std::uint64_t(tr.steps()) * batch);
      make_batch(tr.steps(), x, y);
      const double loss = tr.step([&](M& mod) {
        auto logits = mod.forward(as_matrix<const float>(x.data() + r0 * in, n, in));
        const double l = ce.forward(logits, std::span<const std::int32_t>(y).subspan(r0, n), batch);
        ce.backward(dlogits.view());
        mod.backward(dlogits.view());
        return l;
      });
      if (s >= p.steps_before_save) losses.push_back(loss);
    }
    if (p.steps_after == 0 && !p.save_to.empty()) train::save_portable_checkpoint(p.save_to, tr, tr.steps() * batch);
    if (world.rank() == 0) {
      std::lock_guard lk(m);
      out.losses = losses;
      out.loaded = info;
    }
  });
  return out;
}

constexpr int before = 3, after = 2;

template <class Storage>
void every_pair(const std::filesystem::path& root) {
  for (int a = 1; a <= 4; ++a) {
    const auto ckpt = root / ("saved-on-" + std::to_string(a));
    plan save{.ranks = a, .expert_parallel = a, .save_to = ckpt, .steps_before_save = before, .steps_after = after};
    if constexpr (!std::is_same_v<Storage, storage::resident>) save.ssd = root / ("ssd-save-" + std::to_string(a));
    const outcome kept = run<Storage>(save);
    REQUIRE(kept.losses.size() == after);
    for (int b = 1; b <= 4; ++b) {
      if (b == a) continue;
      CAPTURE(a);
      CAPTURE(b);
      plan load{.ranks = b, .expert_parallel = b, .load_from = ckpt, .steps_after = after};
      if constexpr (!std::is_same_v<Storage, storage::resident>) load.ssd = root / ("ssd-load-" + std::to_string(b));
      const outcome resumed = run<Storage>(load);
      CHECK(resumed.loaded.step == before);
      CHECK(resumed.loaded.world_size == a);
      CHECK(resumed.loaded.data_position == std::uint64_t(before) * batch);
      REQUIRE(resumed.losses.size() == after);
      for (int s = 0; s < after; ++s) CHECK(resumed.losses[s] == doctest::Approx(kept.losses[s]).epsilon(1e-5));
    }
  }
}

void rewrite_manifest(const std::filesystem::path& dir, const std::function<void(nlohmann::json&)>& f) {
  nlohmann::json m;
  {
    std::ifstream in(dir / "manifest.json");
    m = nlohmann::json::parse(in);
  }
  f(m);
  std::ofstream(dir / "manifest.json") << m.dump(1);
}

std::string load_error(const plan& p) {
  try {
    run<storage::resident>(p);
  } catch (const semoe::error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("a checkpoint saved on 1-4 ranks resumes on every other number of ranks with the same losses (experts resident)") {
  temp_dir root("portable-resident");
  every_pair<storage::resident>(root.path);
}

TEST_CASE("a checkpoint saved on 1-4 ranks resumes on every other number of ranks with the same losses (experts on SSD)") {
  temp_dir root("portable-ssd");
  every_pair<ssd_store>(root.path);
}

TEST_CASE("a portable checkpoint moves between expert-parallel sizes with expert replicas") {
  temp_dir root("portable-replicas");
  const auto ckpt = root.path / "ckpt";
  // Saved on 4 ranks as 2 replicas of 2 expert shards, loaded as 1 replica of 4 and as 4 replicas of 1.
  const outcome kept = run<storage::resident>({.ranks = 4, .expert_parallel = 2, .dropless = true, .save_to = ckpt,
                                               .steps_before_save = before, .steps_after = after});
  CHECK(std::filesystem::exists(ckpt / "experts-00001-of-00002.safetensors"));
  CHECK(!std::filesystem::exists(ckpt / "experts-00002-of-00002.safetensors"));
  for (int ep : {4, 1}) {
    CAPTURE(ep);
    const outcome resumed =
        run<storage::resident>({.ranks = 4, .expert_parallel = ep, .dropless = true, .load_from = ckpt, .steps_after = after});
    CHECK(resumed.loaded.expert_parallel == 2);
    for (int s = 0; s < after; ++s) CHECK(resumed.losses[s] == doctest::Approx(kept.losses[s]).epsilon(1e-5));
  }
}

TEST_CASE("a damaged, incomplete or mismatched portable checkpoint is refused by name") {
  temp_dir root("portable-bad");
  const auto ckpt = train::checkpoint_dir(root.path, 3);
  run<storage::resident>({.ranks = 2, .expert_parallel = 2, .save_to = ckpt, .steps_before_save = 3});
  REQUIRE(std::filesystem::exists(ckpt / "manifest.json"));
  CHECK(train::latest_checkpoint(root.path) == ckpt);

  SUBCASE("saving over a complete checkpoint is refused") {
    const std::string e = [&] {
      try {
        run<storage::resident>({.ranks = 2, .expert_parallel = 2, .save_to = ckpt, .steps_before_save = 1});
      } catch (const semoe::error& x) {
        return std::string(x.what());
      }
      return std::string();
    }();
    CHECK(e.find("already holds a complete checkpoint") != std::string::npos);
  }
  SUBCASE("a flipped byte in an expert file") {
    const auto f = ckpt / "experts-00001-of-00002.safetensors";
    std::fstream s(f, std::ios::in | std::ios::out | std::ios::binary);
    s.seekp(static_cast<std::streamoff>(std::filesystem::file_size(f) - 5));
    s.put('\x7f');
    s.close();
    const std::string e = load_error({.ranks = 2, .expert_parallel = 2, .load_from = ckpt, .steps_after = 1});
    CHECK(e.find("experts-00001-of-00002.safetensors' does not match its checksum") != std::string::npos);
  }
  SUBCASE("an expert missing from the file the manifest names") {
    rewrite_manifest(ckpt, [](nlohmann::json& m) { m["moe_layers"][1]["expert_file"][9] = 1; });
    const std::string e = load_error({.ranks = 1, .expert_parallel = 1, .load_from = ckpt, .steps_after = 1});
    CHECK(e.find("tensor 'model.layers.1.mlp.experts.9.block' is not in") != std::string::npos);
    CHECK(e.find("experts-00000-of-00002.safetensors") != std::string::npos);
  }
  SUBCASE("expert blocks of another shape") {
    const std::string e =
        load_error({.ranks = 1, .expert_parallel = 1, .ffn = 20, .load_from = ckpt, .steps_after = 1});
    CHECK(e.find("MoE layer 0 was saved with expert blocks of") != std::string::npos);
    CHECK(e.find("elements, the model's have") != std::string::npos);
  }
  SUBCASE("a dense tensor of another shape") {
    const std::string e =
        load_error({.ranks = 1, .expert_parallel = 1, .out = classes + 1, .load_from = ckpt, .steps_after = 1});
    CHECK(e.find("dense.safetensors': tensor '2.weight' holds") != std::string::npos);
  }
  SUBCASE("a save that never wrote its manifest is not a checkpoint") {
    std::filesystem::remove(ckpt / "manifest.json");
    CHECK(!train::latest_checkpoint(root.path));
    const std::string e = load_error({.ranks = 2, .expert_parallel = 2, .load_from = ckpt, .steps_after = 1});
    CHECK(e.find("save did not finish") != std::string::npos);
  }
}

TEST_CASE("latest_checkpoint picks the highest complete step") {
  temp_dir root("portable-latest");
  for (std::uint64_t s : {5u, 40u, 7u}) {
    std::filesystem::create_directories(train::checkpoint_dir(root.path, s));
    std::ofstream(train::checkpoint_dir(root.path, s) / "manifest.json") << "{}";
  }
  std::filesystem::create_directories(train::checkpoint_dir(root.path, 99));  // no manifest: incomplete
  std::filesystem::create_directories(root.path / "step-12x");
  CHECK(train::latest_checkpoint(root.path) == train::checkpoint_dir(root.path, 40));
  CHECK(!train::latest_checkpoint(root.path / "absent"));

  // Pruning keeps the newest complete ones and an incomplete one newer than them (a save in progress).
  std::filesystem::create_directories(train::checkpoint_dir(root.path, 3));  // a save a crash cut short
  train::prune_checkpoints(root.path, 2);
  std::vector<std::string> left;
  for (const auto& e : std::filesystem::directory_iterator(root.path)) left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  CHECK(left == std::vector<std::string>{"step-000000000007", "step-000000000040", "step-000000000099", "step-12x"});
  CHECK_THROWS_WITH_AS(train::prune_checkpoints(root.path, 0), doctest::Contains("keep = 0"), semoe::error);
}
