// io::hf: the MoE blocks of tiny Mixtral, Qwen2-MoE, OLMoE and DeepSeek-V3
// checkpoints made by transformers (tests/fixtures/hf_moe, see
// make_fixtures.py) loaded into semoe layers give the outputs transformers
// recorded for them (1e-5 relative); written back, they are the same
// tensors and load to the same outputs; hostile or mismatched checkpoints
// are refused by name.
#include "semoe/io/hf_moe.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "semoe/comm/local.hpp"
#include "semoe/gate/sigmoid_top_k.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/shared_experts.hpp"
#include "support/files.hpp"

using namespace semoe;
namespace hf = semoe::io::hf;
namespace fs = std::filesystem;

namespace {

const fs::path fixtures = fs::path(__FILE__).parent_path() / ".." / ".." / "fixtures" / "hf_moe";

template <class Gate>
using moe_t = basic_moe_layer<float, cpu, Gate, expert::ffn<act::swiglu>>;

/// A layer for one block of `c`: the routed layer, wrapped when the block has
/// shared experts.
template <class Gate, bool Shared>
struct block_of {
  using moe = moe_t<Gate>;
  using type = std::conditional_t<Shared, layer::with_shared_experts<moe>, moe>;
  static type make(cpu_executor& ex, comm::local& comm, const hf::moe_config& c) {
    typename moe::options o{
        .hidden = c.hidden, .ffn = c.ffn, .experts = c.experts, .gate = hf::gate_options<Gate>(c), .seed = 1};
    if constexpr (Shared) return type(ex, comm, {.moe = o, .shared_ffn = c.shared_ffn, .gated = c.shared_gated});
    else return type(ex, comm, o);
  }
};

/// max |a - b| / max |b|.
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(double(a[i]) - double(b[i])));
    den = std::max(den, std::abs(double(b[i])));
  }
  return num / den;
}

/// Each MoE block of the checkpoint in `dir` on the recorded input; returns
/// the outputs, checked against the recorded ones.
template <class Gate, bool Shared>
std::vector<std::vector<float>> run_blocks(const fs::path& dir, const fs::path& recorded, int ranks = 1) {
  const auto ck = hf::checkpoint::open(dir);
  const auto& c = ck.config();
  const auto blocks = io::safetensors_file::open(recorded / "blocks.safetensors");
  std::vector<std::vector<float>> outs;
  for (index_t l : c.moe_layers) {
    const auto x = blocks.read_as<float>("layers." + std::to_string(l) + ".input");
    const auto want = blocks.read_as<float>("layers." + std::to_string(l) + ".output");
    const index_t n = static_cast<index_t>(x.size()) / c.hidden;
    std::vector<float> y(x.size());
    auto comms = comm::local::make_world(ranks);
    std::vector<std::jthread> threads;
    for (int r = 0; r < ranks; ++r)
      threads.emplace_back([&, r] {
        cpu_executor ex({.threads = 1});
        auto m = block_of<Gate, Shared>::make(ex, comms[r], c);
        hf::load_moe_block(ck, l, m);
        m.train(false);
        const index_t rows = n / ranks, first = r * rows;  // each rank its share of the tokens
        std::vector<float> out(static_cast<std::size_t>(rows * c.hidden));
        m.forward(as_matrix<const float>(x.data() + first * c.hidden, rows, c.hidden),
                  as_matrix(out.data(), rows, c.hidden));
        std::copy(out.begin(), out.end(), y.begin() + first * c.hidden);
      });
    threads.clear();
    INFO(dir.filename().string() << " layer " << l << " on " << ranks << " ranks");
    const double err = relative_error(y, want);
    CHECK(err < 1e-5);
    MESSAGE(dir.filename().string() << " layer " << l << " on " << ranks
                                    << " ranks: max |semoe - transformers| / max |transformers| = " << err);
    outs.push_back(std::move(y));
  }
  return outs;
}

template <class Gate, bool Shared>
void check_family(const std::string& family) {
  const fs::path dir = fixtures / family;
  const auto ours = run_blocks<Gate, Shared>(dir, dir);
  CHECK(ours.size() == 2);
  // Expert parallelism: two ranks with half the experts each, half the tokens each.
  const auto split = run_blocks<Gate, Shared>(dir, dir, 2);
  for (std::size_t i = 0; i < ours.size(); ++i) CHECK(split[i] == ours[i]);

  // Written back in the family's layout, then read again.
  testing::temp_dir tmp("hf-" + family);
  const auto ck = hf::checkpoint::open(dir);
  const auto& c = ck.config();
  hf::writer w(c);
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  std::vector<typename block_of<Gate, Shared>::type> layers;
  for (index_t l : c.moe_layers) {
    layers.push_back(block_of<Gate, Shared>::make(ex, comms[0], c));
    hf::load_moe_block(ck, l, layers.back());
    w.add_block(l, layers.back());
  }
  const auto files = w.write(tmp.path, 16 << 10);  // small shards: an index is written
  CHECK(std::find(files.begin(), files.end(), "model.safetensors.index.json") != files.end());
  const auto back = hf::checkpoint::open(tmp.path);
  index_t compared = 0;
  for (const auto& name : ck.names()) {
    if (name.find(".mlp.") == std::string::npos && name.find(".block_sparse_moe.") == std::string::npos) continue;
    INFO(name);
    REQUIRE(back.contains(name));
    const auto shape = ck.info(name).shape;
    CHECK(back.read<float>(name, shape) == ck.read<float>(name, shape));
    ++compared;
  }
  CHECK(compared == static_cast<index_t>(back.names().size()));  // nothing more, nothing less
  CHECK(back.config().raw == c.raw);
  CHECK(run_blocks<Gate, Shared>(tmp.path, dir) == ours);
}

void write_file(const fs::path& p, const std::string& text) { std::ofstream(p) << text; }

}  // namespace

TEST_CASE("Mixtral blocks (sharded checkpoint) match transformers") { check_family<gate::top_k<2>, false>("mixtral"); }
TEST_CASE("Qwen2-MoE blocks (gated shared expert, unnormalized top-k) match transformers") {
  check_family<gate::top_k<2>, true>("qwen2_moe");
}
TEST_CASE("OLMoE blocks (unnormalized top-4 of 8) match transformers") { check_family<gate::top_k<4>, false>("olmoe"); }
TEST_CASE("DeepSeek-V3 blocks (sigmoid, groups, selection bias, shared experts) match transformers") {
  check_family<gate::sigmoid_top_k<3>, true>("deepseek_v3");
}

TEST_CASE("the config's family fields are read") {
  const auto ds = hf::checkpoint::open(fixtures / "deepseek_v3").config();
  CHECK(ds.family == hf::moe_family::deepseek_v3);
  CHECK(ds.sigmoid);
  CHECK(ds.scaling == 2.5);
  CHECK(ds.groups == 4);
  CHECK(ds.top_groups == 2);
  CHECK(ds.shared_ffn == 2 * 16);
  CHECK(!ds.shared_gated);
  const auto q = hf::checkpoint::open(fixtures / "qwen2_moe").config();
  CHECK(q.shared_ffn == 40);
  CHECK(q.shared_gated);
  CHECK(!q.normalize);
  auto j = q.raw;
  j["mlp_only_layers"] = {0};
  CHECK(hf::parse_config(j).moe_layers == std::vector<index_t>{1});
  j["model_type"] = "llama";
  CHECK_THROWS_WITH_AS(hf::parse_config(j), doctest::Contains("model_type \"llama\""), semoe::error);
  j = q.raw;
  j["hidden_act"] = "gelu";
  CHECK_THROWS_WITH_AS(hf::parse_config(j), doctest::Contains("hidden_act \"gelu\""), semoe::error);
  j = q.raw;
  j.erase("num_experts");
  CHECK_THROWS_WITH_AS(hf::parse_config(j), doctest::Contains("no \"num_experts\""), semoe::error);
}

TEST_CASE("a layer that does not fit the checkpoint is refused by name") {
  const auto ck = hf::checkpoint::open(fixtures / "qwen2_moe");
  const auto& c = ck.config();
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  // No shared expert.
  auto plain = block_of<gate::top_k<2>, false>::make(ex, comms[0], c);
  CHECK_THROWS_WITH_AS(hf::load_moe_block(ck, 0, plain), doctest::Contains("layer::with_shared_experts"), semoe::error);
  // Normalization that differs from norm_topk_prob.
  auto o = hf::gate_options<gate::top_k<2>>(c);
  o.normalize = true;
  layer::with_shared_experts<moe_t<gate::top_k<2>>> m(
      ex, comms[0],
      {.moe = {.hidden = c.hidden, .ffn = c.ffn, .experts = c.experts, .gate = o},
       .shared_ffn = c.shared_ffn,
       .gated = true});
  CHECK_THROWS_WITH_AS(hf::load_moe_block(ck, 0, m), doctest::Contains("norm_topk_prob"), semoe::error);
  // The wrong width, the wrong k, a layer with no block.
  moe_t<gate::top_k<2>> narrow(ex, comms[0], {.hidden = c.hidden, .ffn = c.ffn + 1, .experts = c.experts});
  auto m2 = block_of<gate::top_k<2>, true>::make(ex, comms[0], c);
  CHECK_THROWS_WITH_AS(hf::load_moe_block(ck, 5, m2), doctest::Contains("has no MoE block"), semoe::error);
  auto m4 = block_of<gate::top_k<4>, true>::make(ex, comms[0], c);
  CHECK_THROWS_WITH_AS(hf::load_moe_block(ck, 0, m4), doctest::Contains("num_experts_per_tok = 2"), semoe::error);
  const auto mx = hf::checkpoint::open(fixtures / "mixtral");
  moe_t<gate::top_k<2>> wide(
      ex, comms[0], {.hidden = 32, .ffn = 47, .experts = 8, .gate = hf::gate_options<gate::top_k<2>>(mx.config())});
  CHECK_THROWS_WITH_AS(hf::load_moe_block(mx, 0, wide), doctest::Contains("ffn 47"), semoe::error);
}

TEST_CASE("hostile and damaged checkpoints are refused by name") {
  testing::temp_dir tmp("hf-hostile");
  const fs::path src = fixtures / "mixtral";
  for (const auto& e : fs::directory_iterator(src)) fs::copy_file(e.path(), tmp.path / e.path().filename());
  const fs::path index = tmp.path / "model.safetensors.index.json";
  std::ifstream in(index);
  auto j = nlohmann::json::parse(in);
  in.close();
  const auto original = j;
  j["weight_map"]["model.layers.0.block_sparse_moe.gate.weight"] = "../../etc/passwd";
  write_file(index, j.dump());
  CHECK_THROWS_WITH_AS(hf::checkpoint::open(tmp.path), doctest::Contains("expected a file name"), semoe::error);
  j = original;
  j["weight_map"]["model.layers.0.block_sparse_moe.gate.weight"] = "model-00001-of-00008.safetensors";
  const std::string holder = original["weight_map"]["model.layers.0.block_sparse_moe.gate.weight"];
  if (holder != "model-00001-of-00008.safetensors") {
    write_file(index, j.dump());
    CHECK_THROWS_WITH_AS(hf::checkpoint::open(tmp.path), doctest::Contains("does not hold it"), semoe::error);
  }
  j = original;
  j["weight_map"].erase("model.layers.1.block_sparse_moe.experts.3.w2.weight");
  write_file(index, j.dump());
  const auto ck = hf::checkpoint::open(tmp.path);
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  auto m = block_of<gate::top_k<2>, false>::make(ex, comms[0], ck.config());
  hf::load_moe_block(ck, 0, m);
  CHECK_THROWS_WITH_AS(hf::load_moe_block(ck, 1, m), doctest::Contains("experts.3.w2.weight"), semoe::error);
  write_file(index, "{\"weight_map\": ");
  CHECK_THROWS_WITH_AS(hf::checkpoint::open(tmp.path), doctest::Contains("not valid JSON"), semoe::error);
  fs::remove(index);
  CHECK_THROWS_WITH_AS(hf::checkpoint::open(tmp.path), doctest::Contains("neither model.safetensors"), semoe::error);
}

TEST_CASE("BF16, F16 and F64 tensors convert; non-finite values are refused") {
  testing::temp_dir tmp("hf-dtypes");
  auto cfg = nlohmann::json::parse(std::ifstream(fixtures / "olmoe" / "config.json"));
  write_file(tmp.path / "config.json", cfg.dump());
  io::safetensors_writer w;
  const std::vector<std::uint16_t> bf16{0x3f80, 0xc000, 0x3e80};  // 1, -2, 0.25
  const std::vector<std::uint16_t> f16{0x3c00, 0xc000, 0x0001};   // 1, -2, 2^-24
  const std::vector<double> f64{1.5, -0.125, 3.0};
  const std::vector<float> bad{1.0f, NAN, 0.0f};
  w.add("bf16", io::dtype::bf16, {3}, std::as_bytes(std::span(bf16)));
  w.add("f16", io::dtype::f16, {3}, std::as_bytes(std::span(f16)));
  w.add("f64", {3}, f64);
  w.add("bad", {3}, bad);
  w.add("i32", {3}, std::vector<std::int32_t>{1, 2, 3});
  w.write(tmp.path / "model.safetensors");
  const auto ck = hf::checkpoint::open(tmp.path);
  CHECK(ck.read<float>("bf16", {3}) == std::vector<float>{1.0f, -2.0f, 0.25f});
  CHECK(ck.read<float>("f16", {3}) == std::vector<float>{1.0f, -2.0f, std::ldexp(1.0f, -24)});
  CHECK(ck.read<double>("f64", {3}) == f64);
  CHECK_THROWS_WITH_AS(ck.read<float>("bad", {3}), doctest::Contains("element 1 is nan"), semoe::error);
  CHECK_THROWS_WITH_AS(ck.read<float>("i32", {3}), doctest::Contains("is I32"), semoe::error);
  CHECK_THROWS_WITH_AS(ck.read<float>("f64", {1, 3}), doctest::Contains("has shape [3]"), semoe::error);
}
