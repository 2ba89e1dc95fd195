// Runs the MoE blocks of a Hugging Face checkpoint (Mixtral, OLMoE or
// Qwen3-MoE layout: softmax top-k, no shared experts) on random input, one
// block after another with a residual (h += block(h)), under a storage
// policy of your choice, and prints tokens per second:
//
//   hf_moe_block <checkpoint-dir> [--storage resident|ssd|ring|all]
//                [--tokens N] [--batches B] [--ssd-dir D] [--slots K]
//
// resident keeps every expert in memory; ssd keeps a quarter of the experts'
// bytes in DRAM and the rest in an SSD file (storage::tiered); ring streams
// the layers' experts through K slots (infer::ring, SE-MoE's ring memory).
// With --storage all it runs each and says whether their outputs equal the
// resident ones bit for bit. Only the MoE blocks are read: attention and
// embeddings are not part of this program.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "semoe/comm/local.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/infer/ring_engine.hpp"
#include "semoe/io/hf_moe.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/storage/tiered_store.hpp"

using namespace semoe;
namespace hf = semoe::io::hf;
namespace fs = std::filesystem;

namespace {

struct args {
  fs::path dir, ssd_dir;
  std::string storage = "resident";
  index_t tokens = 512, batches = 5, slots = 2;
};

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: hf_moe_block <checkpoint-dir> [--storage resident|ssd|ring|all] [--tokens N] [--batches B]\n"
               "                    [--ssd-dir D] [--slots K]\n"
               "Loads the MoE blocks of a Hugging Face checkpoint (Mixtral, OLMoE or Qwen3-MoE layout) and runs\n"
               "them on random input under the storage policy given, printing tokens/s.\n"
               "  --storage  resident (default): all experts in memory; ssd: a quarter in DRAM, the rest on SSD;\n"
               "             ring: SE-MoE's ring memory with K layer slots; all: each, outputs compared\n"
               "  --tokens   tokens per batch (default 512)     --batches  timed batches (default 5)\n"
               "  --ssd-dir  where SSD files go (default: the temporary directory)\n"
               "  --slots    ring slots K (default 2)\n");
}

args parse(int argc, char** argv) {
  args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "hf_moe_block: %s needs a value\n", s.c_str());
        usage(stderr);
        std::exit(2);
      }
      return argv[++i];
    };
    auto number = [&]() -> index_t {
      const std::string v = value();
      char* end = nullptr;
      const long long n = std::strtoll(v.c_str(), &end, 10);
      if (end == v.c_str() || *end || n < 1) {
        std::fprintf(stderr, "hf_moe_block: %s = '%s': expected a positive integer\n", s.c_str(), v.c_str());
        std::exit(2);
      }
      return static_cast<index_t>(n);
    };
    if (s == "--help" || s == "-h") {
      usage(stdout);
      std::exit(0);
    } else if (s == "--storage") {
      a.storage = value();
    } else if (s == "--tokens") {
      a.tokens = number();
    } else if (s == "--batches") {
      a.batches = number();
    } else if (s == "--slots") {
      a.slots = number();
    } else if (s == "--ssd-dir") {
      a.ssd_dir = value();
    } else if (!s.empty() && s[0] == '-') {
      std::fprintf(stderr, "hf_moe_block: unknown option %s\n", s.c_str());
      usage(stderr);
      std::exit(2);
    } else if (a.dir.empty()) {
      a.dir = s;
    } else {
      std::fprintf(stderr, "hf_moe_block: one checkpoint directory, got a second: %s\n", s.c_str());
      std::exit(2);
    }
  }
  if (a.dir.empty()) {
    usage(stderr);
    std::exit(2);
  }
  if (a.storage != "resident" && a.storage != "ssd" && a.storage != "ring" && a.storage != "all") {
    std::fprintf(stderr, "hf_moe_block: --storage %s: expected resident, ssd, ring or all\n", a.storage.c_str());
    std::exit(2);
  }
  if (a.ssd_dir.empty()) a.ssd_dir = fs::temp_directory_path() / ("semoe-hf-moe-block-" + std::to_string(::getpid()));
  return a;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

using ssd_tiered = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;

struct result {
  double tokens_per_s = 0;
  std::vector<float> output;
};

/// Every MoE block of the checkpoint as a layer over one shared store, run
/// on the same random batch `batches` times after one warm-up batch.
template <int K, class Storage, class Prefetch>
result run(const hf::checkpoint& ck, const args& a, typename Storage::template store<float>::options so) {
  using moe_t = basic_moe_layer<float, cpu, gate::top_k<K>, expert::ffn<act::swiglu>, comm::local, Storage, Prefetch>;
  const auto& c = ck.config();
  cpu_executor ex;
  auto comms = comm::local::make_world(1);
  auto store = std::make_shared<typename Storage::template store<float>>(so);
  std::vector<moe_t> blocks;
  blocks.reserve(c.moe_layers.size());
  for (index_t l : c.moe_layers) {
    blocks.emplace_back(
        ex, comms[0],
        typename moe_t::options{
            .hidden = c.hidden, .ffn = c.ffn, .experts = c.experts, .gate = hf::gate_options<gate::top_k<K>>(c)},
        store);
    hf::load_moe_block(ck, l, blocks.back());
    blocks.back().train(false);
  }
  const index_t n = a.tokens, H = c.hidden;
  matrix<float> x(n, H), h(n, H), out(n, H);
  const philox rng(2026, 0);
  for (index_t i = 0; i < n * H; ++i) x.data()[i] = 2 * rng.uniform(static_cast<std::uint64_t>(i)) - 1;
  auto batch = [&] {
    std::copy(x.span().begin(), x.span().end(), h.span().begin());
    for (auto& b : blocks) {
      b.forward(h.view(), out.view());
      for (index_t i = 0; i < n * H; ++i) h.data()[i] += out.data()[i];
    }
  };
  batch();  // warm-up: first touch, the SSD copy, the ring's loader
  const double t0 = now();
  for (index_t b = 0; b < a.batches; ++b) batch();
  const double dt = now() - t0;
  return {static_cast<double>(n * a.batches) / dt, std::vector<float>(h.span().begin(), h.span().end())};
}

template <int K>
int main_k(const hf::checkpoint& ck, const args& a) {
  const auto& c = ck.config();
  const double layer_mib = static_cast<double>(c.experts * 3 * c.hidden * c.ffn * 4) / (1 << 20);
  std::printf(
      "%s checkpoint %s: %zu MoE blocks, hidden %lld, %lld experts of width %lld, top-%d (%.1f MiB of experts "
      "per block); %lld tokens a batch\n",
      hf::family_name(c.family), a.dir.c_str(), c.moe_layers.size(), static_cast<long long>(c.hidden),
      static_cast<long long>(c.experts), static_cast<long long>(c.ffn), K, layer_mib, static_cast<long long>(a.tokens));
  nlohmann::json rows = nlohmann::json::array();
  std::vector<float> resident;
  bool equal = true;
  auto report = [&](const char* name, const result& r) {
    const bool same = resident.empty() || r.output == resident;
    if (resident.empty()) resident = r.output;
    equal = equal && same;
    std::printf(
        "  %-9s %10.0f tokens/s%s\n", name, r.tokens_per_s,
        a.storage == "all" ? (same ? "   output = resident, bit for bit" : "   output DIFFERS from resident") : "");
    rows.push_back({{"storage", name}, {"tokens_per_s", r.tokens_per_s}});
  };
  if (a.storage == "resident" || a.storage == "all")
    report("resident", run<K, storage::resident, prefetch::on_demand>(ck, a, {}));
  if (a.storage == "ssd" || a.storage == "all") {
    ssd_tiered::store<float>::options o;
    const auto expert_bytes = static_cast<std::size_t>(layer_mib * (1 << 20)) * c.moe_layers.size();
    o.device.budget_bytes = std::max<std::size_t>(expert_bytes / 4, static_cast<std::size_t>(layer_mib * (1 << 20)));
    o.host.budget_bytes = o.device.budget_bytes;
    o.ssd.dir = a.ssd_dir / "tiered";
    report("ssd", run<K, ssd_tiered, prefetch::on_demand>(ck, a, o));
  }
  if (a.storage == "ring" || a.storage == "all") {
    infer::ring::store_options o;
    o.slots = a.slots;
    o.source = infer::ring_source::ssd;
    o.ssd.dir = a.ssd_dir / "ring";
    report("ring", run<K, infer::ring, infer::ring_release>(ck, a, o));
  }
  std::error_code ec;
  fs::remove_all(a.ssd_dir, ec);
  nlohmann::json j{{"example", "hf_moe_block"}, {"family", hf::family_name(c.family)}, {"results", rows}};
  if (a.storage == "all") j["bitwise_equal"] = equal;
  std::printf("%s\n", j.dump().c_str());
  return equal ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const args a = parse(argc, argv);
  try {
    const auto ck = hf::checkpoint::open(a.dir);
    const auto& c = ck.config();
    if (c.sigmoid || c.shared_ffn > 0) {
      std::fprintf(stderr,
                   "hf_moe_block: %s blocks have %s; this program runs softmax top-k blocks without shared "
                   "experts (Mixtral, OLMoE, Qwen3-MoE)\n",
                   hf::family_name(c.family), c.sigmoid ? "sigmoid routing" : "shared experts");
      return 2;
    }
    switch (c.top_k) {
      case 1: return main_k<1>(ck, a);
      case 2: return main_k<2>(ck, a);
      case 4: return main_k<4>(ck, a);
      case 8: return main_k<8>(ck, a);
      default:
        std::fprintf(stderr, "hf_moe_block: num_experts_per_tok = %lld; this program is built for 1, 2, 4 or 8\n",
                     static_cast<long long>(c.top_k));
        return 2;
    }
  } catch (const semoe::error& e) {
    std::fprintf(stderr, "hf_moe_block: %s\n", e.what());
    return 1;
  }
}
