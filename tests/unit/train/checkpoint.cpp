// Checkpoints restore a run exactly: resident and SSD-offloaded stores, a
// training process SIGKILLed at random points while it writes blocks back,
// and damaged checkpoint or block files reported by name, never read as data.
#include <doctest/doctest.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/repeated.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/prefetch/vertical.hpp"
#include "semoe/storage/tiered_store.hpp"
#include "semoe/train/checkpoint.hpp"
#include "semoe/train/trainer.hpp"

using namespace semoe;

namespace {

constexpr index_t in = 12, hidden = 16, ffn = 240, classes = 5, batch = 32, experts = 4, depth = 4;
constexpr std::size_t elems = 2 * hidden * ffn;

using ssd_store = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;

template <class Storage>
using moe_t = basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, Storage,
                              prefetch::vertical<1>>;
template <class Storage>
using block_t = layer::residual<float, layer::layer_norm<float>, moe_t<Storage>>;
template <class Storage>
using model_t =
    layer::sequential<float, layer::linear<float>, layer::repeated<float, block_t<Storage>>, layer::linear<float>>;

struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(const std::string& tag)
      : path(std::filesystem::temp_directory_path() / ("semoe-ckpt-" + tag + "-" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~temp_dir() { std::filesystem::remove_all(path); }
};

ssd_store::store<float>::options offload(const std::filesystem::path& dir) {
  ssd_store::store<float>::options o;
  o.device.budget_bytes = 2 * experts * 2 * elems * sizeof(float);
  o.host.budget_bytes = depth * experts * 4 * elems * sizeof(float) / 4;
  o.ssd.dir = dir;
  return o;
}

/// One training run: a model, its optimizer and trainer over one rank.
template <class Storage>
struct run {
  using store_t = typename Storage::template store<float>;
  using M = model_t<Storage>;

  explicit run(typename store_t::options o = {})
      : world(comm::local::make_world(1)), groups(train::make_groups(world[0])), ex({.threads = 1}),
        store(std::make_shared<store_t>(o)),
        model(layer::linear<float>(ex, {.in = in, .out = hidden}, 1),
              layer::repeated<float, block_t<Storage>>(depth,
                                                       [&](index_t i) {
                                                         return block_t<Storage>(
                                                             ex, layer::layer_norm<float>(ex, {.dim = hidden}),
                                                             moe_t<Storage>(ex, groups.expert,
                                                                            {.hidden = hidden, .ffn = ffn,
                                                                             .experts = experts,
                                                                             .seed = 40 + std::uint64_t(i)},
                                                                            store));
                                                       }),
              layer::linear<float>(ex, {.in = hidden, .out = classes}, 2)),
        opt(ex, {.lr = 3e-3}), tr(model, opt, world[0], groups, {.clip_norm = 0.5}), ce(ex), x(batch, in),
        dlogits(batch, classes), y(batch) {}

  void step(std::uint64_t s) {
    const philox rng(8, s);
    for (index_t i = 0; i < batch * in; ++i) x.data()[i] = 2 * rng.uniform(std::uint64_t(i)) - 1;
    for (index_t i = 0; i < batch; ++i) y[i] = static_cast<std::int32_t>((x(i, 0) + 1) * 2.49f);
    tr.step([&](M& m) {
      auto logits = m.forward(x.view());
      const double l = ce.forward(logits, std::span<const std::int32_t>(y), batch);
      ce.backward(dlogits.view());
      m.backward(dlogits.view());
      return l;
    });
  }

  std::vector<float> params() {
    std::vector<float> out;
    for (auto& p : model.parameters()) out.insert(out.end(), p.value.begin(), p.value.end());
    train::for_each_expert_block(
        model, [&](auto& b, auto&) { out.insert(out.end(), b.params.begin(), b.params.end()); },
        train::block_access::read);
    return out;
  }

  std::vector<comm::local> world;
  train::parallel_groups<comm::local> groups;
  cpu_executor ex;
  std::shared_ptr<store_t> store;
  M model;
  train::adamw<float> opt;
  train::trainer<M, train::adamw<float>, comm::local> tr;
  layer::softmax_cross_entropy<float> ce;
  matrix<float> x, dlogits;
  std::vector<std::int32_t> y;
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::vector<float> uninterrupted(int steps) {
  run<storage::resident> r;
  for (int s = 0; s < steps; ++s) r.step(std::uint64_t(s));
  return r.params();
}

void flip_byte(const std::filesystem::path& p, std::uintmax_t at) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(at));
  char c;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5a);
  f.seekp(static_cast<std::streamoff>(at));
  f.write(&c, 1);
}

}  // namespace

TEST_CASE("checkpoint: a resident run saved and restored continues bit for bit") {
  const auto want = uninterrupted(8);
  temp_dir d("resident");
  {
    run<storage::resident> a;
    for (int s = 0; s < 4; ++s) a.step(std::uint64_t(s));
    train::save_checkpoint(d.path / "ckpt", a.model, a.opt, 4);
  }
  run<storage::resident> b;
  const auto s0 = train::load_checkpoint(d.path / "ckpt", b.model, b.opt);
  CHECK(s0 == 4);
  for (auto s = s0; s < 8; ++s) b.step(s);
  CHECK(same_bits(b.params(), want));
}

TEST_CASE("checkpoint: an SSD-offloaded run restores from the block records and continues bit for bit") {
  const auto want = uninterrupted(8);
  temp_dir d("ssd");
  {
    run<ssd_store> a(offload(d.path / "a"));
    for (int s = 0; s < 4; ++s) a.step(std::uint64_t(s));
    train::save_checkpoint(d.path / "ckpt", a.model, a.opt, 4);
    for (int s = 4; s < 6; ++s) a.step(std::uint64_t(s));  // writes after the checkpoint go to the other slots
  }
  run<ssd_store> b(offload(d.path / "b"));
  const auto s0 = train::load_checkpoint(d.path / "ckpt", b.model, b.opt);
  CHECK(s0 == 4);
  for (auto s = s0; s < 8; ++s) b.step(s);
  CHECK(same_bits(b.params(), want));
}

TEST_CASE("checkpoint: a restart into the same SSD directory leaves the checkpoint's file alone and resumes bit "
          "for bit") {
  // The restarted model is built (and spills blocks to SSD) before the load:
  // its new tier must not replace the file the checkpoint names.
  const auto want = uninterrupted(8);
  temp_dir d("same-dir");
  {
    run<ssd_store> a(offload(d.path / "ssd"));
    for (int s = 0; s < 4; ++s) a.step(std::uint64_t(s));
    train::save_checkpoint(d.path / "ckpt", a.model, a.opt, 4);
    for (int s = 4; s < 6; ++s) a.step(std::uint64_t(s));
  }
  for (int restart = 0; restart < 2; ++restart) {  // twice: the first restart's file is named by nothing
    CAPTURE(restart);
    run<ssd_store> b(offload(d.path / "ssd"));
    const auto s0 = train::load_checkpoint(d.path / "ckpt", b.model, b.opt);
    CHECK(s0 == 4);
    for (auto s = s0; s < 8; ++s) b.step(s);
    CHECK(same_bits(b.params(), want));
  }
  std::size_t files = 0;  // the fresh files of the restarts were removed once the checkpoint's file took over
  for (const auto& e : std::filesystem::directory_iterator(d.path / "ssd")) files += e.path().extension() == ".blocks";
  CHECK(files == 1);
}

TEST_CASE("checkpoint: a save that cannot write (a file size limit, as a full disk) names errno, leaves no .tmp, "
          "and the previous checkpoint stands") {
  temp_dir d("full");
  run<storage::resident> a;
  for (int s = 0; s < 2; ++s) a.step(std::uint64_t(s));
  train::save_checkpoint(d.path / "ckpt", a.model, a.opt, 2);
  const auto size_before = std::filesystem::file_size(d.path / "ckpt");
  REQUIRE(size_before > 8192);
  a.step(2);
  // Writes past 4 KiB fail with EFBIG (SIGXFSZ ignored), as a full disk fails with ENOSPC.
  struct rlimit old_limit {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = old_limit;
  small.rlim_cur = 4096;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  std::string what;
  try {
    train::save_checkpoint(d.path / "ckpt", a.model, a.opt, 3);
  } catch (const semoe::error& e) {
    what = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
  CHECK(what.find("ckpt.tmp' failed: File too large") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(d.path / "ckpt.tmp"));
  CHECK(std::filesystem::file_size(d.path / "ckpt") == size_before);
  run<storage::resident> b;
  CHECK(train::load_checkpoint(d.path / "ckpt", b.model, b.opt) == 2);
}

TEST_CASE("checkpoint: damaged checkpoint and block files are errors naming what is wrong") {
  temp_dir d("damaged");
  {
    run<ssd_store> a(offload(d.path / "a"));
    a.step(0);
    train::save_checkpoint(d.path / "ckpt", a.model, a.opt, 1);
  }
  const auto size = std::filesystem::file_size(d.path / "ckpt");
  std::filesystem::copy_file(d.path / "ckpt", d.path / "good");
  flip_byte(d.path / "ckpt", size / 2);
  {
    run<ssd_store> b(offload(d.path / "b"));
    CHECK_THROWS_WITH_AS(train::load_checkpoint(d.path / "ckpt", b.model, b.opt),
                         doctest::Contains("checksum mismatch"), error);
  }
  std::filesystem::resize_file(d.path / "ckpt", 20);
  {
    run<ssd_store> b(offload(d.path / "b"));
    CHECK_THROWS_WITH_AS(train::load_checkpoint(d.path / "ckpt", b.model, b.opt), doctest::Contains("too short"),
                         error);
  }
  // A block of the SSD file damaged: the restore names the file and the block.
  const auto blocks = d.path / "a" / "semoe-rank0.blocks";
  REQUIRE(std::filesystem::exists(blocks));
  constexpr std::uintmax_t slot_bytes = 4 * elems * sizeof(float) + 4096;  // payload + trailer page
  flip_byte(blocks, 4096 * 3 + 17);               // inside block 0's payload, in both of its slots
  flip_byte(blocks, slot_bytes + 4096 * 3 + 17);
  run<ssd_store> c(offload(d.path / "c"));
  try {
    train::load_checkpoint(d.path / "good", c.model, c.opt);
    FAIL("a damaged block was read as data");
  } catch (const error& e) {
    const std::string m = e.what();
    CHECK(m.find(blocks.string()) != std::string::npos);
    CHECK(m.find("block 0") != std::string::npos);
  }
}

TEST_CASE("checkpoint: SIGKILL at random points during write-back; restart finds every block valid and ends "
          "as an uninterrupted run") {
  constexpr int total = 12;
  const auto want = uninterrupted(total);
  std::mt19937 rng(2024);
  int restored = 0;
  for (int round = 0; round < 4; ++round) {
    temp_dir d("kill" + std::to_string(round));
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      // The child trains, checkpointing every other step, until it is killed.
      blas::set_num_threads(1);
      try {
        run<ssd_store> a(offload(d.path / "child"));
        train::save_checkpoint(d.path / "ckpt", a.model, a.opt, 0);
        for (int s = 0; s < total; ++s) {
          a.step(std::uint64_t(s));
          if (s % 2 == 1) train::save_checkpoint(d.path / "ckpt", a.model, a.opt, std::uint64_t(s + 1));
        }
      } catch (...) {
        ::_exit(3);
      }
      ::_exit(0);
    }
    const int delay_ms = std::uniform_int_distribution<int>(30, 400)(rng);
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    REQUIRE((WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) == 0)));
    if (!std::filesystem::exists(d.path / "ckpt")) {
      MESSAGE("round ", round, ": killed after ", delay_ms, " ms, before the first checkpoint");
      continue;
    }
    run<ssd_store> b(offload(d.path / "restart"));
    const auto s0 = train::load_checkpoint(d.path / "ckpt", b.model, b.opt);  // verifies every block
    MESSAGE("round ", round, ": killed after ", delay_ms, " ms; restarting from step ", s0);
    for (auto s = s0; s < static_cast<std::uint64_t>(total); ++s) b.step(s);
    CHECK(same_bits(b.params(), want));
    ++restored;
  }
  CHECK(restored >= 2);
}
