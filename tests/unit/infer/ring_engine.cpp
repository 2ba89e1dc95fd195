// Ring-memory inference gives bitwise the same outputs as all-resident
// inference, for K = 1..4 slots and both sources (host DRAM, SSD file), over
// several batches so the ring turns more than once.
#include <doctest/doctest.h>

#include <atomic>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <vector>

#include "semoe/gate/top_k.hpp"
#include "semoe/infer/ring_engine.hpp"
#include "semoe/io/model_file.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/repeated.hpp"
#include "semoe/layer/sequential.hpp"

using namespace semoe;

namespace {

constexpr index_t in = 12, hidden = 16, ffn = 48, experts = 4, depth = 6, batch = 40;

template <class Storage, class Prefetch>
using moe_t = basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, Storage, Prefetch>;
template <class Storage, class Prefetch>
using block_t = layer::residual<float, layer::layer_norm<float>, moe_t<Storage, Prefetch>>;
template <class Storage, class Prefetch>
using model_t = layer::sequential<float, layer::linear<float>, layer::repeated<float, block_t<Storage, Prefetch>>>;

/// Outputs of `batches` forward passes (eval mode).
template <class Storage, class Prefetch>
std::vector<float> run_inference(typename Storage::template store<float>::options o, int batches,
                                 infer::ring_stats* stats = nullptr, index_t rows = batch,
                                 const std::function<void(int)>& before_batch = {}) {
  cpu_executor ex({.threads = 2});
  auto comms = comm::local::make_world(1);
  auto store = std::make_shared<typename Storage::template store<float>>(o);
  using M = model_t<Storage, Prefetch>;
  M model(layer::linear<float>(ex, {.in = in, .out = hidden}, 1),
          layer::repeated<float, block_t<Storage, Prefetch>>(depth, [&](index_t i) {
            return block_t<Storage, Prefetch>(
                ex, layer::layer_norm<float>(ex, {.dim = hidden}),
                moe_t<Storage, Prefetch>(ex, comms[0],
                                         {.hidden = hidden, .ffn = ffn, .experts = experts,
                                          .seed = 90 + std::uint64_t(i)},
                                         store));
          }));
  model.train(false);
  std::vector<float> out;
  matrix<float> x(rows, in);
  for (int b = 0; b < batches; ++b) {
    if (before_batch) before_batch(b);
    const philox rng(12, std::uint64_t(b));
    for (index_t i = 0; i < rows * in; ++i) x.data()[i] = 2 * rng.uniform(std::uint64_t(i)) - 1;
    auto y = model.forward(x.view());
    for (index_t r = 0; r < y.rows(); ++r) out.insert(out.end(), y.row(r), y.row(r) + y.cols());
  }
  if constexpr (requires { store->stats(); })
    if (stats) *stats = store->stats();
  return out;
}

}  // namespace

TEST_CASE("ring: outputs equal all-resident inference bit for bit, for K = 1..4 and both sources") {
  const auto want = run_inference<storage::resident, prefetch::on_demand>({}, 3);
  for (auto source : {infer::ring_source::dram, infer::ring_source::ssd})
    for (index_t k = 1; k <= 4; ++k) {
      CAPTURE(k);
      CAPTURE(static_cast<int>(source));
      infer::ring::store_options o;
      o.slots = k;
      o.source = source;
      infer::ring_stats st;
      const auto got = run_inference<infer::ring, infer::ring_release>(o, 3, &st);
      REQUIRE(got.size() == want.size());
      CHECK(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)) == 0);
      // The ring turned: every layer loaded once per batch, plus what the loader
      // had already brought in for a next batch (at most K layers).
      CHECK(st.loads >= 3 * depth);
      CHECK(st.loads <= static_cast<std::uint64_t>(3 * depth + k));
    }
}

TEST_CASE("ring: one expert a slot serves a layer larger than the budget, skipping experts without rows") {
  const auto want = run_inference<storage::resident, prefetch::on_demand>({}, 3);
  for (auto source : {infer::ring_source::dram, infer::ring_source::ssd})
    for (index_t k : {1, 2, 3, 5}) {
      CAPTURE(k);
      infer::ring::store_options o;
      o.slots = k;
      o.unit = infer::ring_unit::expert;
      o.source = source;
      infer::ring_stats st;
      const auto got = run_inference<infer::ring, infer::ring_release>(o, 3, &st);
      REQUIRE(got.size() == want.size());
      CHECK(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)) == 0);
      CHECK(st.loads <= static_cast<std::uint64_t>(3 * depth * experts + k));
      // One token a batch: top-2 of 4 experts leaves two idle in every layer.
      const auto want1 = run_inference<storage::resident, prefetch::on_demand>({}, 4, nullptr, 1);
      const auto got1 = run_inference<infer::ring, infer::ring_release>(o, 4, &st, 1);
      CHECK(got1 == want1);
    }
}

TEST_CASE("ring: K from a byte budget; more slots than layers load each layer once") {
  infer::ring::store<float> probe;
  probe.add_layer(experts, 2 * hidden * ffn);
  const std::size_t slot = probe.slot_bytes();
  CHECK(slot >= experts * 2 * hidden * ffn * sizeof(float));

  infer::ring::store_options o;
  o.budget_bytes = 3 * slot + slot / 2;  // room for 3 slots
  infer::ring_stats st;
  const auto want = run_inference<storage::resident, prefetch::on_demand>({}, 2);
  CHECK(run_inference<infer::ring, infer::ring_release>(o, 2, &st) == want);
  CHECK(st.loads >= 2 * depth);
  CHECK(st.loads <= 2 * depth + 3);
  o.budget_bytes = 0;
  o.slots = depth + 2;
  CHECK(run_inference<infer::ring, infer::ring_release>(o, 2, &st) == want);
  CHECK(st.loads == depth);  // every layer has a slot of its own: loaded once
}

TEST_CASE("ring: forward-only, fixed weights, and budgets too small for a slot are errors") {
  infer::ring::store<float> s;
  s.add_layer(2, 64);
  s.visit(0, 1, [](storage::block_ref<float> b) { b.params[3] = 5; });
  CHECK_THROWS_WITH_AS(s.acquire(0, 0, true), doctest::Contains("forward-only"), error);
  auto b = s.acquire(0, 1);
  CHECK(b.params[3] == 5.0f);
  s.release(0, 1);
  CHECK_THROWS_WITH_AS(s.visit(0, 0, [](storage::block_ref<float>) {}), doctest::Contains("after inference started"),
                       error);
  CHECK_THROWS_WITH_AS(s.add_layer(1, 8), doctest::Contains("after inference started"), error);

  infer::ring::store_options o;
  o.budget_bytes = 100;
  infer::ring::store<float> tiny(o);
  tiny.add_layer(2, 4096);
  CHECK_THROWS_WITH_AS(tiny.acquire(0, 0), doctest::Contains("cannot hold one slot"), error);
}

TEST_CASE("ring: a model trained with one store and saved as safetensors is served by the ring as it was") {
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  const auto path = std::filesystem::temp_directory_path() / ("semoe-model-" + std::to_string(::getpid()) + ".safetensors");
  using R = model_t<storage::resident, prefetch::on_demand>;
  using G = model_t<infer::ring, infer::ring_release>;
  auto make = [&]<class M, class Store>(std::shared_ptr<Store> store, std::uint64_t seed) {
    using B = std::remove_cvref_t<decltype(std::declval<M&>().template get<1>()[0])>;
    using Moe = std::remove_cvref_t<decltype(std::declval<B&>().template get<1>())>;
    return M(layer::linear<float>(ex, {.in = in, .out = hidden}, seed),
             layer::repeated<float, B>(depth, [&](index_t i) {
               return B(ex, layer::layer_norm<float>(ex, {.dim = hidden}),
                        Moe(ex, comms[0], {.hidden = hidden, .ffn = ffn, .experts = experts, .seed = seed + 10 + i},
                            store));
             }));
  };
  auto trained = make.template operator()<R>(std::make_shared<storage::resident::store<float>>(), 1);
  // Make the weights differ from any fresh init: a few plain SGD-like nudges.
  for (auto& p : trained.parameters())
    for (auto& v : p.value) v += 0.01f;
  train::for_each_expert_block(trained, [](auto& b, auto&) {
    for (auto& v : b.params) v *= 1.01f;
  });
  trained.train(false);
  matrix<float> x(batch, in);
  x.fill(0.3f);
  x(0, 0) = -1;
  std::vector<float> want;
  {
    auto y = trained.forward(x.view());
    want.assign(y.data(), y.data() + y.rows() * y.cols());
  }
  io::save_model(path, trained);

  infer::ring::store_options o;
  o.slots = 2;
  auto served = make.template operator()<G>(std::make_shared<infer::ring::store<float>>(o), 99);  // other init
  io::load_model(path, served);
  served.train(false);
  auto y = served.forward(x.view());
  CHECK(std::memcmp(y.data(), want.data(), want.size() * sizeof(float)) == 0);

  auto other = make.template operator()<G>(std::make_shared<infer::ring::store<float>>(o), 99);
  io::safetensors_writer w;  // a file of some other model
  w.add("embedding", {1}, std::vector<float>{1.0f});
  w.write(path);
  CHECK_THROWS_WITH_AS(io::load_model(path, other), doctest::Contains("has no tensor '0.weight'"), error);
  io::save_model(path, trained);  // the right model, one tensor resized: named with both sizes
  {
    io::safetensors_writer w2;
    for (auto& p : trained.parameters()) w2.add(p.name, {std::int64_t(p.value.size())}, std::span<const float>(p.value));
    w2.write(path);
  }
  CHECK_THROWS_WITH_AS(io::load_model(path, other), doctest::Contains("model.layers.0.mlp.experts.0.block"), error);
  std::filesystem::remove(path);
}

TEST_CASE("ring: the README's options compile and serve") {
  // --- as in README.md, "Serving a model bigger than fast memory" ---
  semoe::infer::ring::store_options o;
  o.budget_bytes = 128 << 20;                   // K = as many slots as fit (or o.slots = K)
  o.source = semoe::infer::ring_source::ssd;    // or dram
  auto ring = std::make_shared<semoe::infer::ring::store<float>>(o);
  // ---
  ring->add_layer(2, 1024);
  ring->visit(0, 1, [](storage::block_ref<float> b) { b.params[7] = 3; });
  CHECK(ring->acquire(0, 1).params[7] == 3.0f);
  ring->release(0, 1);
  CHECK(ring->slots() >= 1);
}

TEST_CASE("ring: one-expert slots refuse an expert the forward already passed over, instead of waiting forever") {
  infer::ring::store_options o;
  o.slots = 2;
  o.unit = infer::ring_unit::expert;
  infer::ring::store<float> s(o);
  s.add_layer(4, 256);
  s.add_layer(4, 256);
  s.acquire(0, 2);
  s.release(0, 2);
  CHECK_THROWS_WITH_AS(s.acquire(0, 1), doctest::Contains("increasing order"), error);
  s.acquire(0, 3);  // going on in order still works
  s.release(0, 3);
  s.end_layer(0);
  CHECK(s.acquire(1, 0).params.size() == 256);
  s.release(1, 0);
}

TEST_CASE("ring: SSD payloads are hashed on a block's first read and every verify_every-th; corruption is caught") {
  const auto dir = std::filesystem::temp_directory_path() / ("semoe-ring-verify-" + std::to_string(::getpid()));
  infer::ring::store_options o;
  o.slots = 2;
  o.source = infer::ring_source::ssd;
  o.ssd.dir = dir;
  const auto want = run_inference<storage::resident, prefetch::on_demand>({}, 8);
  for (std::uint32_t every : {1u, 4u, 0u}) {
    CAPTURE(every);
    o.verify_every = every;
    infer::ring_stats st;
    const auto got = run_inference<infer::ring, infer::ring_release>(o, 8, &st);
    CHECK(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)) == 0);
    REQUIRE(st.bytes_loaded > 0);
    if (every == 1) CHECK(st.bytes_verified == st.bytes_loaded);
    // Each block is read 8-9 times: hashed on reads 0 and 4 (and 8), or on read 0 only.
    if (every == 4) CHECK((st.bytes_verified * 5 >= st.bytes_loaded && st.bytes_verified * 2 < st.bytes_loaded));
    if (every == 0) CHECK((st.bytes_verified > 0 && st.bytes_verified * 7 <= st.bytes_loaded));
  }

  // A byte of block 0 changes on disk after two batches (both of its slots,
  // behind the ring's back): a read that hashes it fails naming the block.
  o.verify_every = 3;
  int failed_at = -1;
  std::string what;
  try {
    (void)run_inference<infer::ring, infer::ring_release>(o, 9, nullptr, batch, [&](int b) {
      if (b != 2) return;
      const auto file = dir / "semoe-rank0.blocks";
      const auto slot_bytes = std::filesystem::file_size(file) / (2 * depth * experts);
      std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
      for (std::uintmax_t at : {std::uintmax_t{100}, slot_bytes + 100}) {
        char c = 0;
        f.seekg(static_cast<std::streamoff>(at));
        f.read(&c, 1);
        c = static_cast<char>(c ^ 0x5a);
        f.seekp(static_cast<std::streamoff>(at));
        f.write(&c, 1);
      }
      f.flush();
      failed_at = b;
    });
    failed_at = -1;
  } catch (const semoe::error& e) {
    what = e.what();
  }
  INFO(what);
  CHECK(what.find("payload checksum mismatch") != std::string::npos);
  CHECK(what.find("block 0") != std::string::npos);
  CHECK(failed_at == 2);  // the corruption happened, and the run did not finish after it
  std::filesystem::remove_all(dir);
}

TEST_CASE("ring: the loader waits for a released slot's compute before it loads the next item into it") {
  infer::ring::store_options o;
  o.slots = 2;
  o.unit = infer::ring_unit::expert;
  infer::ring::store<float> s(o);
  s.add_layer(2, 256);
  s.add_layer(2, 256);
  std::atomic<int> waited{0};
  s.acquire(0, 0);
  s.release(0, 0, [&] { ++waited; });  // slot 0 is free for item 2 (layer 1, expert 0) once this returns
  s.acquire(0, 1);
  s.release(0, 1);
  s.end_layer(0);
  CHECK(s.acquire(1, 0).params.size() == 256);  // loaded into slot 0: after the wait
  CHECK(waited == 1);
  s.release(1, 0);
}
