// A byte-level Mixture-of-Experts language model on Debian's fortunes.
//
//   last 16 bytes -> partitioned embedding (32 per byte) -> linear 384 -> gelu
//   -> 2 x [x + MoE(layernorm x)] (8 experts, ffn 768, top-2) -> layernorm -> 256
//
// Run it on P processes with the launcher (`semoe-run -n 2 fortune_lm`): each
// process is a rank of comm::tcp (under mpirun or srun, `--comm mpi` makes it
// a rank of comm::mpi). Without a launcher, `--ranks P` runs P
// thread-ranks of comm::local in one process. Every 20th fortune of each file
// is held out; the program reports held-out bits per byte.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "semoe/comm/local.hpp"
#include "semoe/core/blas.hpp"
#include "semoe/core/progress.hpp"
#include "semoe/core/trace.hpp"
#include "semoe/core/units.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/activation.hpp"
#include "semoe/layer/embedding.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/infer/ring_engine.hpp"
#include "semoe/io/model_file.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/prefetch/vertical.hpp"
#include "semoe/storage/tiered_store.hpp"
#include "semoe/train/trainer.hpp"

#include "../common/launched_world.hpp"

using namespace semoe;

namespace {

struct config {
  std::string data = "/usr/share/games/fortunes";
  index_t steps = 7000, batch = 1024, context = 16, embed = 32, hidden = 384, ffn = 768, experts = 8;
  double lr = 2e-3;
  int ranks = 1, threads = 2, eval_every = 1000;
  std::string comm = "tcp";  // a launched job's transport: tcp or mpi
  double time_limit = 0;  // seconds; 0: none
  index_t eval_bytes = 0;  // held-out bytes scored; 0: all
  bool print_loss = false;
  std::uint64_t seed = 1;
  // Hierarchical storage: any of these moves the experts into a tiered store.
  std::size_t device_budget = 0, host_budget = 0;  // bytes, 0: unbounded
  std::string ssd_dir;
  std::string save;      // write the trained weights here (safetensors)
  // `fortune_lm generate MODEL`: sample text from MODEL served from a ring of
  // fast memory, from a small expert cache, and all resident, and compare.
  std::string generate;
  std::string prompt = "Q: What is ";
  index_t gen_bytes = 200;
  double temperature = 0.8;
  std::size_t ring_budget = 0;   // bytes; 0: a quarter of the model
  std::size_t cache_budget = 0;  // bytes of device tier for the expert cache; 0: half the model
  bool ring_from_ssd = false;
  bool offload() const { return device_budget || host_budget || !ssd_dir.empty(); }
};


struct corpus {
  std::string train, heldout;
  std::size_t files = 0, train_fortunes = 0, heldout_fortunes = 0;
};

/// The plain-text fortune files (no .dat / .u8), fortunes split at lines
/// holding a single '%'; the 20th, 40th, ... fortune of each file is held out.
corpus load_fortunes(const std::string& dir) {
  namespace fs = std::filesystem;
  SEMOE_CHECK(fs::is_directory(dir), "fortune_lm: '", dir, "' is not a directory (install Debian's fortunes package)");
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto ext = e.path().extension();
    if (e.is_regular_file() && ext != ".dat" && ext != ".u8") files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  corpus c;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    SEMOE_CHECK(in.good(), "fortune_lm: cannot read '", f.string(), "'");
    std::string line, fortune;
    std::size_t index = 0;
    auto flush = [&] {
      if (fortune.empty()) return;
      const bool held = ++index % 20 == 0;
      (held ? c.heldout : c.train) += fortune + "%\n";
      ++(held ? c.heldout_fortunes : c.train_fortunes);
      fortune.clear();
    };
    while (std::getline(in, line)) {
      if (line == "%") flush();
      else fortune += line + "\n";
    }
    flush();
    ++c.files;
  }
  SEMOE_CHECK(!c.train.empty() && !c.heldout.empty(), "fortune_lm: no fortunes found in '", dir, "'");
  return c;
}

[[noreturn]] void usage(const char* why, bool asked = false) {
  std::fprintf(asked ? stdout : stderr,
               "%s\nusage: fortune_lm [--steps N] [--batch B] [--lr X] [--ranks P] [--threads T] [--experts E]\n"
               "                  [--time-limit S] [--eval-every N] [--eval-bytes N] [--print-loss] [--seed S] [--data DIR]\n"
               "                  [--device-budget BYTES] [--host-budget BYTES] [--ssd-dir DIR]   (e.g. 40M, 1G)\n"
               "                  [--save MODEL.safetensors] [--comm %s]\n"
               "       fortune_lm generate MODEL.safetensors [--prompt TEXT] [--bytes N] [--temperature T]\n"
               "                  [--ring-budget BYTES] [--ring-source dram|ssd] [--cache-budget BYTES] [--seed S]\n"
               "Under semoe-run each process is one rank (comm::tcp; under mpirun or srun with --comm mpi,\n"
               "comm::mpi); otherwise --ranks P thread-ranks.\n"
               "A budget or --ssd-dir offloads the experts of both MoE blocks into one tiered store.\n",
               why, examples::comm_choices());
  std::exit(asked ? 0 : 2);
}

config parse(int argc, char** argv) {
  config c;
  int first = 1;
  if (argc > 1 && std::string(argv[1]) == "generate") {
    if (argc < 3) usage("generate needs a model file");
    c.generate = argv[2];
    first = 3;
  }
  for (int i = first; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + a).c_str());
      return argv[++i];
    };
    try {
      if (a == "--steps") c.steps = std::stol(value());
      else if (a == "--batch") c.batch = std::stol(value());
      else if (a == "--lr") c.lr = std::stod(value());
      else if (a == "--ranks") c.ranks = std::stoi(value());
      else if (a == "--comm") {
        c.comm = value();
        if (c.comm != "tcp" && c.comm != "mpi") usage("--comm is tcp or mpi");
      } else if (a == "--threads") c.threads = std::stoi(value());
      else if (a == "--experts") c.experts = std::stol(value());
      else if (a == "--time-limit") c.time_limit = std::stod(value());
      else if (a == "--eval-every") c.eval_every = std::stoi(value());
      else if (a == "--eval-bytes") c.eval_bytes = std::stol(value());
      else if (a == "--print-loss") c.print_loss = true;
      else if (a == "--seed") c.seed = std::stoull(value());
      else if (a == "--data") c.data = value();
      else if (a == "--device-budget") c.device_budget = parse_bytes(value());
      else if (a == "--host-budget") c.host_budget = parse_bytes(value());
      else if (a == "--ssd-dir") c.ssd_dir = value();
      else if (a == "--save") c.save = value();
      else if (a == "--prompt") c.prompt = value();
      else if (a == "--bytes") c.gen_bytes = std::stol(value());
      else if (a == "--temperature") c.temperature = std::stod(value());
      else if (a == "--ring-budget") c.ring_budget = parse_bytes(value());
      else if (a == "--cache-budget") c.cache_budget = parse_bytes(value());
      else if (a == "--ring-source") {
        const std::string v = value();
        if (v != "dram" && v != "ssd") usage("--ring-source is dram or ssd");
        c.ring_from_ssd = v == "ssd";
      }
      else if (a == "--help" || a == "-h") usage("Train a byte-level MoE language model on fortunes.", true);
      else usage(("unknown argument " + a).c_str());
    } catch (const std::logic_error&) {
      usage(("bad value for " + a).c_str());
    } catch (const semoe::error& e) {
      usage((a + ": " + e.what()).c_str());
    }
  }
  if (c.steps < 1 || c.batch < 1 || c.ranks < 1 || c.threads < 1) usage("steps, batch, ranks, threads must be >= 1");
  return c;
}

/// Where the experts live: all in memory, or offloaded (SSD-tiered store
/// shared by both MoE blocks, vertical prefetch of the next block's experts).
struct resident_experts {
  using storage = storage::resident;
  using prefetch = prefetch::on_demand;
};
struct offloaded_experts {
  using storage = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;
  using prefetch = prefetch::vertical<1>;
};
template <class Comm, class Where>
using moe_t = basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>, Comm, typename Where::storage,
                              typename Where::prefetch>;
template <class Comm, class Where>
using block_t = layer::residual<float, layer::layer_norm<float>, moe_t<Comm, Where>>;
template <class Comm, class Where>
using body_t = layer::sequential<float, layer::linear<float>, layer::activation<float, act::gelu>,
                                 block_t<Comm, Where>, block_t<Comm, Where>, layer::layer_norm<float>,
                                 layer::linear<float>>;

/// Embedding (ids) in front of a sequential body (vectors): the model the
/// trainer and the optimizers see.
template <class Comm, class Where>
struct lm {
  layer::partitioned_embedding<float, Comm> embed;
  body_t<Comm, Where> body;
  matrix<float> emb_out, d_emb;
  index_t context;

  matrix_view<const float> forward(std::span<const std::int32_t> ids, index_t rows) {
    const index_t D = embed.opts().dim;
    emb_out.resize(rows * context, D);
    embed.forward(ids, emb_out.view());
    return body.forward(as_matrix<const float>(emb_out.data(), rows, context * D));
  }
  void backward(matrix_view<const float> dlogits) {
    const index_t rows = dlogits.rows(), D = embed.opts().dim;
    d_emb.resize(rows * context, D);
    body.backward(dlogits, as_matrix(d_emb.data(), rows, context * D));
    embed.backward(d_emb.view());
  }
  param_list<float> parameters() {
    auto p = embed.parameters();
    for (auto& q : body.parameters()) p.push_back(q);
    return p;
  }
  template <class F>
  void for_each_layer(F&& f) { body.for_each_layer(f); }
  void zero_grad() {
    embed.zero_grad();
    body.zero_grad();
  }
  void end_step() { body.end_step(); }
  void train(bool on) { body.train(on); }
};

template <class Where>
std::shared_ptr<typename Where::storage::template store<float>> make_store(const config& cfg, int rank) {
  using store_t = typename Where::storage::template store<float>;
  typename store_t::options so;
  if constexpr (std::is_same_v<Where, offloaded_experts>) {
    so.device.budget_bytes = cfg.device_budget;
    so.host.budget_bytes = cfg.host_budget;
    if (!cfg.ssd_dir.empty()) so.ssd.dir = cfg.ssd_dir;
    so.ssd.rank = so.rank = rank;
  }
  (void)cfg;
  (void)rank;
  return std::make_shared<store_t>(so);
}

/// The language model with its experts in `store`.
template <class Comm, class Where>
lm<Comm, Where> make_lm(cpu_executor& ex, Comm& world, Comm& experts, const config& cfg,
                        std::shared_ptr<typename Where::storage::template store<float>> store) {
  const index_t C = cfg.context, D = cfg.embed, H = cfg.hidden;
  auto block = [&](std::uint64_t seed) {
    return block_t<Comm, Where>(ex, layer::layer_norm<float>(ex, {.dim = H}),
                                moe_t<Comm, Where>(ex, experts,
                                                   {.hidden = H, .ffn = cfg.ffn, .experts = cfg.experts,
                                                    .gate = {.capacity_factor = 1.25, .aux_loss_coef = 5e-2},
                                                    .expert = {.bias = true}, .seed = seed},
                                                   store));
  };
  return lm<Comm, Where>{layer::partitioned_embedding<float, Comm>(ex, world, {.vocab = 256, .dim = D}, cfg.seed),
                         body_t<Comm, Where>(layer::linear<float>(ex, {.in = C * D, .out = H}, cfg.seed + 1),
                                             layer::activation<float, act::gelu>(ex), block(cfg.seed + 2),
                                             block(cfg.seed + 3), layer::layer_norm<float>(ex, {.dim = H}),
                                             layer::linear<float>(ex, {.in = H, .out = 256}, cfg.seed + 4)),
                         {},
                         {},
                         C};
}

template <class Comm, class Where>
int train_lm(Comm& world, const config& cfg, const corpus& text) {
  const int P = world.size(), rank = world.rank();
  SEMOE_CHECK(cfg.batch % P == 0, "fortune_lm: --batch ", cfg.batch, " must be a multiple of the ", P, " ranks");
  auto groups = train::make_groups(world);
  cpu_executor ex({.threads = std::max(1, cfg.threads)});
  const index_t C = cfg.context, D = cfg.embed, H = cfg.hidden;
  auto store = make_store<Where>(cfg, rank);  // one store, one budget, for both MoE blocks
  auto model = make_lm<Comm, Where>(ex, world, groups.expert, cfg, store);
  train::adamw<float> opt(ex, {.lr = cfg.lr, .weight_decay = 0.01});
  train::trainer tr(model, opt, world, groups, {.clip_norm = 1.0});
  layer::softmax_cross_entropy<float> ce(ex);

  const index_t local = cfg.batch / P;
  std::vector<std::int32_t> ids(static_cast<std::size_t>(local * C)), target(static_cast<std::size_t>(local));
  matrix<float> dlogits(local, 256);
  auto fill = [&](const std::string& s, index_t pos, index_t i) {  // predict s[pos] from the C bytes before it
    for (index_t j = 0; j < C; ++j) {
      const index_t at = pos - C + j;
      ids[i * C + j] = at < 0 ? '\n' : static_cast<unsigned char>(s[at]);
    }
    target[i] = static_cast<unsigned char>(s[pos]);
  };

  // Held-out bits per byte: every byte of the held-out text, split over the ranks.
  auto evaluate = [&]() {
    model.train(false);
    const auto all = static_cast<index_t>(text.heldout.size());
    const index_t n = cfg.eval_bytes > 0 ? std::min(cfg.eval_bytes, all) : all;
    double nats = 0;
    for (index_t b = 0; b < n; b += cfg.batch) {
      const index_t begin = b + rank * local, rows = std::clamp<index_t>(n - begin, 0, local);
      // Every rank runs the same number of forwards (collectives); short ranks pad.
      for (index_t i = 0; i < local; ++i) fill(text.heldout, std::min(begin + i, n - 1), i);
      auto logits = model.forward(ids, local);
      for (index_t i = 0; i < rows; ++i) {
        const float* z = logits.row(i);
        float mx = z[0];
        for (int k = 1; k < 256; ++k) mx = std::max(mx, z[k]);
        double s = 0;
        for (int k = 0; k < 256; ++k) s += std::exp(static_cast<double>(z[k] - mx));
        nats += std::log(s) + mx - z[target[i]];
      }
    }
    comm::all_reduce(world, std::span<double>(&nats, 1));
    model.train(true);
    return nats / std::log(2.0) / static_cast<double>(n);
  };

  if (rank == 0) {
    std::printf("fortune_lm: %zu files, %zu train fortunes (%zu bytes), %zu held out (%zu bytes); %d rank(s)\n",
                text.files, text.train_fortunes, text.train.size(), text.heldout_fortunes, text.heldout.size(), P);
    std::printf("model: %lld-byte context -> embed %lld -> %lld -> 2 x MoE(%lld experts x ffn %lld, top-2) -> 256; "
                "batch %lld, %lld steps\n",
                static_cast<long long>(C), static_cast<long long>(D), static_cast<long long>(H),
                static_cast<long long>(cfg.experts), static_cast<long long>(cfg.ffn),
                static_cast<long long>(cfg.batch), static_cast<long long>(cfg.steps));
    std::fflush(stdout);
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  std::unique_ptr<progress_bar> bar;
  if (rank == 0 && !cfg.print_loss) bar = std::make_unique<progress_bar>("train", cfg.steps);
  const philox pick(cfg.seed, 0xb47c4);
  const auto train_n = static_cast<std::uint64_t>(text.train.size());
  index_t step = 0;
  double recent = 0, bpb = 0;
  for (; step < cfg.steps; ++step) {
    for (index_t i = 0; i < local; ++i) {
      const auto g = static_cast<std::uint64_t>(step * cfg.batch + rank * local + i);
      fill(text.train, static_cast<index_t>(pick(g)[0] % train_n), i);
    }
    opt.set_lr(train::cosine_lr(static_cast<std::uint64_t>(step), static_cast<std::uint64_t>(cfg.steps), cfg.lr,
                                static_cast<std::uint64_t>(cfg.steps / 50), 0.05));
    const double loss = tr.step([&](lm<Comm, Where>& m) {
      auto logits = m.forward(ids, local);
      const double l = ce.forward(logits, target, cfg.batch);
      ce.backward(dlogits.view());
      m.backward(dlogits.view());
      return l;
    });
    recent = step == 0 ? loss : 0.98 * recent + 0.02 * loss;
    if (rank == 0 && cfg.print_loss) std::printf("step %lld loss %.9g\n", static_cast<long long>(step), loss);
    if (bar) bar->tick(1, "train bits/byte " + std::to_string(recent / std::log(2.0)).substr(0, 5));
    double stop = cfg.time_limit > 0 && elapsed() > cfg.time_limit ? 1.0 : 0.0;
    comm::all_reduce(world, std::span<double>(&stop, 1), comm::reduce_op::max);  // all ranks stop together
    if ((cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0) || stop > 0) {
      bpb = evaluate();
      if (rank == 0) {
        if (bar) bar->finish();
        std::printf("step %lld  held-out %.3f bits/byte  (%.0f s)\n", static_cast<long long>(step + 1), bpb, elapsed());
        std::fflush(stdout);
      }
    }
    if (stop > 0) {
      ++step;
      break;
    }
  }
  if (bar) bar->finish();
  if (cfg.eval_every <= 0 || step % cfg.eval_every != 0) bpb = evaluate();
  if (rank == 0) {
    std::printf("held-out %.3f bits per byte after %lld steps (order-0 bytes: 4.81, order-4 Witten-Bell: 2.35)\n", bpb,
                static_cast<long long>(step));
    if constexpr (!std::is_same_v<Where, resident_experts>) {
      const auto st = store->stats();
      std::printf("rank 0 experts: %.0f %% of blocks already on device when needed; SSD read %.0f MiB, written %.0f "
                  "MiB; peak device %.1f / %.1f MiB, host %.1f / %.1f MiB\n",
                  100.0 * st.hit_rate(), double(st.ssd.bytes_out) / (1 << 20), double(st.ssd.bytes_in) / (1 << 20),
                  double(st.device.peak_bytes) / (1 << 20), double(st.device.budget_bytes) / (1 << 20),
                  double(st.host.peak_bytes) / (1 << 20), double(st.host.budget_bytes) / (1 << 20));
    }
    if (!cfg.save.empty()) {
      SEMOE_CHECK(P == 1, "fortune_lm: --save needs one rank (each rank holds only its experts); got ", P);
      io::save_model(cfg.save, model);
      std::printf("saved the weights to %s\n", cfg.save.c_str());
    }
    std::printf("%s\n", nlohmann::json{{"example", "fortune_lm"},
                                       {"bits_per_byte", bpb},
                                       {"steps", step},
                                       {"ranks", P},
                                       {"seconds", elapsed()}}
                            .dump()
                            .c_str());
  }
  return 0;
}

/// Experts served from a ring of fast memory, one expert a slot.
struct ring_served {
  using storage = infer::ring;
  using prefetch = infer::ring_release;
};
/// Experts cached in a small device tier over host DRAM, the next layer's
/// likely experts (the gate's recent choices) prefetched.
struct cached_experts {
  using storage = storage::tiered<storage::device_tier, storage::host_tier>;
  using prefetch = prefetch::vertical<1>;
};

/// Sample cfg.gen_bytes bytes after the prompt; the same seed gives the same
/// draws, so equal logits give equal text.
template <class Where>
std::string sample(const config& cfg, std::shared_ptr<typename Where::storage::template store<float>> store,
                   double& seconds) {
  auto comms = comm::local::make_world(1);
  auto groups = train::make_groups(comms[0]);
  cpu_executor ex({.threads = std::max(1, cfg.threads)});
  auto model = make_lm<comm::local, Where>(ex, comms[0], groups.expert, cfg, store);
  io::load_model(cfg.generate, model);
  model.train(false);
  const index_t C = cfg.context;
  std::string text = cfg.prompt;
  std::vector<std::int32_t> ids(static_cast<std::size_t>(C));
  const philox rng(cfg.seed, 0x6e7e);
  const auto t0 = std::chrono::steady_clock::now();
  for (index_t n = 0; n < cfg.gen_bytes; ++n) {
    for (index_t j = 0; j < C; ++j) {
      const auto at = static_cast<index_t>(text.size()) - C + j;
      ids[static_cast<std::size_t>(j)] = at < 0 ? '\n' : static_cast<unsigned char>(text[static_cast<std::size_t>(at)]);
    }
    auto logits = model.forward(ids, 1);
    const float* z = logits.row(0);
    double mx = z[0], total = 0;
    for (int k = 1; k < 256; ++k) mx = std::max<double>(mx, z[k]);
    std::array<double, 256> p{};
    for (int k = 0; k < 256; ++k) total += p[static_cast<std::size_t>(k)] = std::exp((z[k] - mx) / cfg.temperature);
    double u = rng.uniform(static_cast<std::uint64_t>(n)) * total;
    int pick = 255;
    for (int k = 0; k < 256; ++k)
      if ((u -= p[static_cast<std::size_t>(k)]) <= 0) {
        pick = k;
        break;
      }
    text.push_back(static_cast<char>(pick));
  }
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return text;
}

int generate(const config& cfg) {
  const auto file = io::safetensors_file::open(cfg.generate);
  std::size_t model_bytes = 0;
  for (const auto& t : file.tensors()) model_bytes += t.bytes();
  const std::size_t budget = cfg.ring_budget ? cfg.ring_budget : model_bytes / 4;

  double full_s = 0, ring_s = 0, cache_s = 0;
  const std::string full = sample<resident_experts>(cfg, std::make_shared<storage::resident::store<float>>(), full_s);
  infer::ring::store_options ro;
  ro.unit = infer::ring_unit::expert;
  ro.budget_bytes = budget;
  ro.source = cfg.ring_from_ssd ? infer::ring_source::ssd : infer::ring_source::dram;
  auto ring = std::make_shared<infer::ring::store<float>>(ro);
  const std::string from_ring = sample<ring_served>(cfg, ring, ring_s);
  cached_experts::storage::store<float>::options co;
  co.device.budget_bytes = cfg.cache_budget ? cfg.cache_budget : model_bytes / 2;
  co.device_cache = storage::cache_kind::lfu;  // keep the experts the gate picks most
  co.device_grads = false;                      // inference: device copies hold weights only
  auto cache = std::make_shared<cached_experts::storage::store<float>>(co);
  const std::string from_cache = sample<cached_experts>(cfg, cache, cache_s);

  const double n = static_cast<double>(cfg.gen_bytes);
  const auto rs = ring->stats();
  const auto cs = cache->stats();
  std::printf("%s\n\n", from_ring.c_str());
  std::printf("model %.1f MiB; ring %.1f MiB (%lld one-expert slots); expert cache %.1f MiB of device tier\n",
              double(model_bytes) / (1 << 20), double(budget) / (1 << 20), static_cast<long long>(ring->slots()),
              double(co.device.budget_bytes) / (1 << 20));
  std::printf("all resident: %.0f bytes/s\n", n / full_s);
  std::printf("ring (from %s): %.0f bytes/s, %llu expert loads\n", cfg.ring_from_ssd ? "SSD" : "DRAM", n / ring_s,
              static_cast<unsigned long long>(rs.loads));
  std::printf("expert cache (LFU): %.0f bytes/s, %.0f %% of expert uses found on the device\n", n / cache_s,
              100 * cs.hit_rate());
  const bool same = from_ring == full && from_cache == full;
  std::printf("the three texts are %s\n", same ? "identical" : "DIFFERENT");
  std::printf("%s\n", nlohmann::json{{"example", "fortune_lm"},
                                     {"mode", "generate"},
                                     {"bytes", cfg.gen_bytes},
                                     {"resident_bytes_per_s", n / full_s},
                                     {"ring_bytes_per_s", n / ring_s},
                                     {"cache_bytes_per_s", n / cache_s},
                                     {"cache_hit_rate", cs.hit_rate()},
                                     {"identical", same}}
                          .dump()
                          .c_str());
  return same ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const config cfg = parse(argc, argv);
  if (!cfg.generate.empty()) {
    try {
      blas::set_num_threads(cfg.threads);
      return generate(cfg);
    } catch (const semoe::error& e) {
      std::fprintf(stderr, "fortune_lm: %s\n", e.what());
      return 1;
    }
  }
  try {
    const corpus text = load_fortunes(cfg.data);
    if (examples::launched())
      return examples::with_launched_world(cfg.comm, [&]<class World>(World& world) {
        auto& rec = trace::recorder::instance();  // one trace file per process
        if (rec.enabled() && world.size() > 1) rec.start(rec.path() + ".rank" + std::to_string(world.rank()));
        config per_process = cfg;  // the host's cores are shared by its ranks
        per_process.threads = std::max(1, cfg.threads / world.local_size());
        blas::set_num_threads(per_process.threads);
        const int rc = cfg.offload() ? train_lm<World, offloaded_experts>(world, per_process, text)
                                     : train_lm<World, resident_experts>(world, per_process, text);
        if (rec.enabled()) rec.write();
        return rc;
      });
    int rc = 0;
    config per_rank = cfg;
    per_rank.threads = std::max(1, cfg.threads / cfg.ranks);
    blas::set_num_threads(per_rank.threads);
    comm::local::run(cfg.ranks, [&](comm::local& world) {
      rc |= cfg.offload() ? train_lm<comm::local, offloaded_experts>(world, per_rank, text)
                          : train_lm<comm::local, resident_experts>(world, per_rank, text);
    });
    if (trace::recorder::instance().enabled()) trace::recorder::instance().write();
    return rc;
  } catch (const semoe::error& e) {
    std::fprintf(stderr, "fortune_lm: %s\n", e.what());
    return 1;
  }
}
