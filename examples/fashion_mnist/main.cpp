// Fashion-MNIST with a Mixture-of-Experts classifier.
//
//   784 -> linear 512 -> gelu -> [x + MoE(layernorm x)] -> layernorm -> linear 10
//
// The MoE block has 8 GELU experts (ffn 1024) behind a top-2 gate with a
// capacity factor, trained with AdamW and a cosine schedule, data + expert
// parallel: each rank takes 1/P of every batch and owns 1/P of the experts,
// and the loss curve matches P = 1. Ranks are processes under the launcher
// (`semoe-run -n 2 fashion_mnist`, comm::tcp) or, with --ranks P, threads of
// this process (comm::local).
//
// Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "semoe/comm/local.hpp"
#include "semoe/core/blas.hpp"
#include "semoe/core/progress.hpp"
#include "semoe/core/trace.hpp"
#include "semoe/core/units.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/io/idx.hpp"
#include "semoe/layer/activation.hpp"
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
#if __has_include("semoe/comm/tcp.hpp")
#include "semoe/comm/tcp.hpp"
#define FASHION_MNIST_TCP 1
#endif

using namespace semoe;

namespace {

struct config {
  std::string data = "/usr/share/datasets/fashion-mnist";
  int epochs = 14;
  index_t batch = 128;
  double lr = 2e-3;
  double weight_decay = 0.05;
  int ranks = 1;
  int threads = 2;
  index_t hidden = 512, ffn = 1024, experts = 8;
  index_t limit = 0;  // use only the first N training images (smoke runs)
  index_t max_steps = 0;  // stop after this many steps (0: all epochs)
  bool print_loss = false;
  std::uint64_t seed = 1;
  // Hierarchical storage: any of these moves the experts into a tiered store.
  std::size_t device_budget = 0, host_budget = 0;  // bytes, 0: unbounded
  std::string ssd_dir;
  std::string save;  // write the trained weights here (safetensors)
  // `fashion_mnist evaluate MODEL`: classify the test set with the weights in
  // MODEL served from a ring of fast memory, and all resident, and compare.
  std::string evaluate;
  std::size_t ring_budget = 0;  // bytes; 0: a quarter of the model
  bool ring_from_ssd = false;
  bool offload() const { return device_budget || host_budget || !ssd_dir.empty(); }
};


[[noreturn]] void usage(const char* argv0, const std::string& why) {
  std::fprintf(stderr,
               "%s\nusage: %s [--epochs N] [--batch B] [--lr X] [--ranks P] [--threads T] [--experts E]\n"
               "          [--hidden H] [--ffn F] [--limit N] [--steps N] [--print-loss] [--seed S] [--data DIR]\n"
               "          [--device-budget BYTES] [--host-budget BYTES] [--ssd-dir DIR]   (e.g. 40M, 1G)\n"
               "          [--save MODEL.safetensors]\n"
               "       %s evaluate MODEL.safetensors [--ring-budget BYTES] [--ring-source dram|ssd] [--data DIR]\n"
               "          (with the --hidden, --ffn and --experts the model was trained with)\n"
               "Under semoe-run each process is one rank (comm::tcp); otherwise --ranks P thread-ranks.\n"
               "A budget or --ssd-dir offloads the experts: weights and gradients in a device tier\n"
               "(bounded), whole blocks with AdamW state cached in host DRAM, the rest on SSD.\n"
               "Set SEMOE_TRACE=trace.json to record a Chrome trace of the first 50 steps.\n",
               why.c_str(), argv0, argv0);
  std::exit(2);
}

config parse(int argc, char** argv) {
  config c;
  int first = 1;
  if (argc > 1 && std::string(argv[1]) == "evaluate") {
    if (argc < 3) usage(argv[0], "evaluate needs a model file");
    c.evaluate = argv[2];
    first = 3;
  }
  for (int i = first; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(argv[0], "missing value after " + a);
      return argv[++i];
    };
    try {
      if (a == "--epochs") c.epochs = std::stoi(value());
      else if (a == "--batch") c.batch = std::stol(value());
      else if (a == "--lr") c.lr = std::stod(value());
      else if (a == "--ranks") c.ranks = std::stoi(value());
      else if (a == "--threads") c.threads = std::stoi(value());
      else if (a == "--experts") c.experts = std::stol(value());
      else if (a == "--hidden") c.hidden = std::stol(value());
      else if (a == "--ffn") c.ffn = std::stol(value());
      else if (a == "--limit") c.limit = std::stol(value());
      else if (a == "--steps") c.max_steps = std::stol(value());
      else if (a == "--print-loss") c.print_loss = true;
      else if (a == "--seed") c.seed = std::stoull(value());
      else if (a == "--data") c.data = value();
      else if (a == "--device-budget") c.device_budget = parse_bytes(value());
      else if (a == "--host-budget") c.host_budget = parse_bytes(value());
      else if (a == "--ssd-dir") c.ssd_dir = value();
      else if (a == "--save") c.save = value();
      else if (a == "--ring-budget") c.ring_budget = parse_bytes(value());
      else if (a == "--ring-source") {
        const std::string v = value();
        if (v != "dram" && v != "ssd") usage(argv[0], "--ring-source is dram or ssd");
        c.ring_from_ssd = v == "ssd";
      }
      else if (a == "--help" || a == "-h") usage(argv[0], "Train an MoE classifier on Fashion-MNIST.");
      else usage(argv[0], "unknown argument " + a);
    } catch (const std::logic_error&) {
      usage(argv[0], "bad value for " + a);
    } catch (const semoe::error& e) {
      usage(argv[0], a + ": " + e.what());
    }
  }
  if (c.epochs < 1 || c.batch < 1 || c.ranks < 1 || c.threads < 1 || c.batch % c.ranks != 0)
    usage(argv[0], "need epochs, batch, ranks, threads >= 1 and batch divisible by ranks");
  return c;
}

using gate_t = gate::top_k<2>;
/// Where the experts live: all in memory, or offloaded (SSD-tiered store,
/// vertical prefetch of the next step's blocks).
struct resident_experts {
  using storage = storage::resident;
  using prefetch = prefetch::on_demand;
};
struct offloaded_experts {
  using storage = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;
  using prefetch = prefetch::vertical<1>;
};
template <class Comm, class Where>
using moe_t = basic_moe_layer<float, cpu, gate_t, expert::ffn<act::gelu>, Comm, typename Where::storage,
                              typename Where::prefetch>;
template <class Comm, class Where>
using model_t = layer::sequential<float, layer::linear<float>, layer::activation<float, act::gelu>,
                                  layer::residual<float, layer::layer_norm<float>, moe_t<Comm, Where>>,
                                  layer::layer_norm<float>, layer::linear<float>>;

template <class Comm, class Where>
model_t<Comm, Where> make_model(cpu_executor& ex, Comm& c, const config& cfg,
                                std::shared_ptr<typename moe_t<Comm, Where>::store_type> store) {
  const index_t H = cfg.hidden;
  using moe = moe_t<Comm, Where>;
  return model_t<Comm, Where>(layer::linear<float>(ex, {.in = 784, .out = H}, cfg.seed),
                 layer::activation<float, act::gelu>(ex),
                 layer::residual<float, layer::layer_norm<float>, moe>(
                     ex, layer::layer_norm<float>(ex, {.dim = H}),
                     moe(ex, c,
                           {.hidden = H, .ffn = cfg.ffn, .experts = cfg.experts,
                            .gate = {.capacity_factor = 1.25, .aux_loss_coef = 5e-2, .z_loss_coef = 1e-3},
                            .expert = {.bias = true}, .seed = cfg.seed + 7},
                           std::move(store))),
                 layer::layer_norm<float>(ex, {.dim = H}), layer::linear<float>(ex, {.in = H, .out = 10}, cfg.seed + 3));
}

template <class M>
auto& moe_of(M& m) {
  return m.template get<2>().template get<1>();
}

template <class Where>
std::shared_ptr<typename Where::storage::template store<float>> make_store(const config& cfg, int rank) {
  using store_t = typename Where::storage::template store<float>;
  typename store_t::options o;
  if constexpr (!std::is_same_v<Where, resident_experts>) {
    o.device.budget_bytes = cfg.device_budget;
    o.host.budget_bytes = cfg.host_budget;
    if (!cfg.ssd_dir.empty()) o.ssd.dir = cfg.ssd_dir;
    o.ssd.rank = rank;
    o.rank = rank;
  }
  (void)cfg;
  (void)rank;
  return std::make_shared<store_t>(o);
}

/// Random horizontal flip: clothes look the same mirrored, and it is the one
/// augmentation that reliably helps an MLP on this data set.
void flip_row(float* img) {
  for (int r = 0; r < 28; ++r) std::reverse(img + r * 28, img + r * 28 + 28);
}

struct outcome {
  double accuracy = 0;
  std::size_t parameters = 0;
  index_t steps = 0;
  int epochs = 0;
};

template <class Comm, class Where>
outcome train_and_test(Comm& c, const config& cfg, const io::mnist_split& train, const io::mnist_split& test) {
  const int P = c.size(), rank = c.rank();
  SEMOE_CHECK(cfg.batch % P == 0, "fashion_mnist: --batch ", cfg.batch, " must be a multiple of the ", P, " ranks");
  const index_t n_train = cfg.limit > 0 ? std::min(cfg.limit, train.size()) : train.size();
  const index_t steps_per_epoch = n_train / cfg.batch;
  const index_t total_steps = cfg.max_steps > 0 ? std::min(cfg.max_steps, steps_per_epoch * cfg.epochs)
                                                : steps_per_epoch * cfg.epochs;
  const int epochs = static_cast<int>((total_steps + steps_per_epoch - 1) / steps_per_epoch);
  if (rank == 0) {
    std::printf("fashion_mnist: %lld train / %lld test images, %d epoch(s) of %lld steps, batch %lld, %d rank(s)\n",
                static_cast<long long>(n_train), static_cast<long long>(test.size()), epochs,
                static_cast<long long>(steps_per_epoch), static_cast<long long>(cfg.batch), P);
    std::printf("model: 784 -> %lld -> MoE(%lld experts x ffn %lld, top-2, capacity 1.25) -> 10\n",
                static_cast<long long>(cfg.hidden), static_cast<long long>(cfg.experts),
                static_cast<long long>(cfg.ffn));
    std::fflush(stdout);
  }
  auto groups = train::make_groups(c);
  cpu_executor ex({.threads = std::max(1, cfg.threads)});
  auto store = make_store<Where>(cfg, c.rank());
  auto model = make_model<Comm, Where>(ex, groups.expert, cfg, store);
  train::adamw<float> opt(ex, {.lr = cfg.lr, .weight_decay = cfg.weight_decay});
  // Offloaded experts are updated right after their backward, while their
  // blocks are still in fast memory; that leaves no room for clipping, which
  // needs every gradient first.
  constexpr bool offloaded = !std::is_same_v<Where, resident_experts>;
  train::trainer tr(model, opt, c, groups,
                    {.clip_norm = offloaded ? 0.0 : 1.0, .update_experts_in_backward = offloaded});
  layer::softmax_cross_entropy<float> loss(ex, {.label_smoothing = 0.1});
  outcome out;
  {  // Dense parameters are replicated; experts are split over the ranks.
    double dense = 0, experts = 0;
    for (auto& p : model.parameters()) dense += static_cast<double>(p.value.size());
    train::for_each_expert_block(
        model, [&](auto& blk, auto&) { experts += static_cast<double>(blk.params.size()); }, train::block_access::read);
    comm::all_reduce(c, std::span<double>(&experts, 1));
    out.parameters = static_cast<std::size_t>(dense + experts);
  }

  const index_t local_batch = cfg.batch / P;
  matrix<float> xb(local_batch, 784), dlogits(local_batch, 10);
  std::vector<std::int32_t> yb(static_cast<std::size_t>(local_batch));
  std::vector<index_t> order(static_cast<std::size_t>(n_train));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 shuffle_rng(cfg.seed);
  index_t step = 0;

  for (int epoch = 1; epoch <= epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), shuffle_rng);  // same order on every rank
    model.train(true);
    const index_t steps_now = std::min(steps_per_epoch, total_steps - step);
    std::unique_ptr<progress_bar> bar;
    if (rank == 0 && !cfg.print_loss) bar = std::make_unique<progress_bar>("epoch " + std::to_string(epoch), steps_now);
    double loss_sum = 0;
    std::vector<double> load(static_cast<std::size_t>(cfg.experts), 0.0);
    double drop_frac = 0;
    for (index_t s = 0; s < steps_now; ++s, ++step) {
      if (step == 50 && rank == 0) trace::recorder::instance().stop();  // a timeline, not a log
      for (index_t i = 0; i < local_batch; ++i) {
        const index_t src = order[s * cfg.batch + rank * local_batch + i];
        std::copy_n(train.images.data() + src * 784, 784, xb.data() + i * 784);
        if (philox(cfg.seed, 0xf11b).uniform(step * cfg.batch + rank * local_batch + i) < 0.5f)
          flip_row(xb.data() + i * 784);
        yb[i] = train.labels[src];
      }
      opt.set_lr(train::cosine_lr(step, total_steps, cfg.lr, total_steps / 50, 0.02));
      const double l = tr.step([&](model_t<Comm, Where>& m) {
        auto logits = m.forward(xb.view());
        const double v = loss.forward(logits, yb, cfg.batch);
        loss.backward(dlogits.view());
        m.backward(dlogits.view());
        return v;
      });
      loss_sum += l;
      const auto& plan = moe_of(model).plan();
      for (index_t e = 0; e < cfg.experts; ++e) load[e] += plan.counts[e];
      drop_frac += static_cast<double>(plan.dropped) / static_cast<double>(std::max<index_t>(plan.tokens * plan.k, 1));
      if (rank == 0 && cfg.print_loss) std::printf("step %lld loss %.9g\n", static_cast<long long>(step), l);
      if (bar) bar->tick(1, "loss " + std::to_string(loss_sum / static_cast<double>(s + 1)).substr(0, 6));
    }
    if (bar) bar->finish();
    comm::all_reduce(c, std::span<double>(load));
    comm::all_reduce(c, std::span<double>(&drop_frac, 1));

    // Test accuracy: each rank classifies its share of the test set.
    model.train(false);
    const index_t eval_batch = 1000, n_test = test.size(), per_rank = n_test / P;
    double correct = 0;
    for (index_t b = rank * per_rank; b < (rank + 1) * per_rank; b += eval_batch) {
      const index_t n = std::min(eval_batch, (rank + 1) * per_rank - b);
      auto logits = model.forward(as_matrix<const float>(test.images.data() + b * 784, n, 784));
      correct += static_cast<double>(layer::count_correct(logits, std::span<const std::int32_t>(test.labels.data() + b, n)));
    }
    comm::all_reduce(c, std::span<double>(&correct, 1));
    out.accuracy = correct / static_cast<double>(P * per_rank);
    if (rank == 0) {
      const double total_load = std::accumulate(load.begin(), load.end(), 0.0);
      std::printf("epoch %2d  loss %.4f  test accuracy %.2f %%  dropped %.2f %%  expert load", epoch,
                  loss_sum / static_cast<double>(steps_now), 100.0 * out.accuracy,
                  100.0 * drop_frac / static_cast<double>(P * steps_now));
      for (double v : load) std::printf(" %.3f", v / total_load);
      std::printf("\n");
      if constexpr (requires { store->stats(); }) {
        const auto st = store->stats();
        std::printf("  rank 0 experts: %.0f %% of blocks already on device when needed; SSD read %.0f MiB, written "
                    "%.0f MiB; peak device %.1f / %.1f MiB, host %.1f / %.1f MiB\n",
                    100.0 * st.hit_rate(), double(st.ssd.bytes_out) / (1 << 20), double(st.ssd.bytes_in) / (1 << 20),
                    double(st.device.peak_bytes) / (1 << 20), double(st.device.budget_bytes) / (1 << 20),
                    double(st.host.peak_bytes) / (1 << 20), double(st.host.budget_bytes) / (1 << 20));
        store->reset_stats();
      }
      std::fflush(stdout);
    }
  }
  out.steps = step;
  out.epochs = epochs;
  if (!cfg.save.empty()) {
    SEMOE_CHECK(P == 1, "fashion_mnist: --save needs one rank (each rank holds only its experts); got ", P);
    io::save_model(cfg.save, model);
    std::printf("saved the weights to %s\n", cfg.save.c_str());
  }
  return out;
}

/// Test accuracy of a model whose weights come from `path`.
template <class Where>
double accuracy_of(const config& cfg, const std::string& path, const io::mnist_split& test,
                   std::shared_ptr<typename Where::storage::template store<float>> store) {
  auto comms = comm::local::make_world(1);
  cpu_executor ex({.threads = std::max(1, cfg.threads)});
  auto model = make_model<comm::local, Where>(ex, comms[0], cfg, store);
  io::load_model(path, model);
  model.train(false);
  double correct = 0;
  for (index_t b = 0; b < test.size(); b += 1000) {
    const index_t n = std::min<index_t>(1000, test.size() - b);
    auto logits = model.forward(as_matrix<const float>(test.images.data() + b * 784, n, 784));
    correct += static_cast<double>(layer::count_correct(logits, std::span<const std::int32_t>(test.labels.data() + b, n)));
  }
  return correct / static_cast<double>(test.size());
}

struct ring_served {
  using storage = infer::ring;
  using prefetch = infer::ring_release;
};

int evaluate(const config& cfg, const io::mnist_split& test) {
  const auto file = io::safetensors_file::open(cfg.evaluate);
  std::size_t model_bytes = 0, expert_bytes = 0;
  for (const auto& t : file.tensors()) {
    model_bytes += t.bytes();
    if (t.name.find(".experts.") != std::string::npos) expert_bytes += t.bytes();
  }
  const std::size_t budget = cfg.ring_budget ? cfg.ring_budget : model_bytes / 4;
  infer::ring::store_options o;
  o.unit = infer::ring_unit::expert;  // one MoE layer: a slot per expert
  o.budget_bytes = budget;
  o.source = cfg.ring_from_ssd ? infer::ring_source::ssd : infer::ring_source::dram;
  auto ring = std::make_shared<infer::ring::store<float>>(o);
  const auto t0 = std::chrono::steady_clock::now();
  const double ring_acc = accuracy_of<ring_served>(cfg, cfg.evaluate, test, ring);
  const double ring_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto t1 = std::chrono::steady_clock::now();
  const double full_acc =
      accuracy_of<resident_experts>(cfg, cfg.evaluate, test, std::make_shared<storage::resident::store<float>>());
  const double full_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  const auto st = ring->stats();
  std::printf("model %.1f MiB (experts %.1f MiB); ring of %lld slots in %.1f MiB of fast memory, from %s\n",
              double(model_bytes) / (1 << 20), double(expert_bytes) / (1 << 20), static_cast<long long>(ring->slots()),
              double(budget) / (1 << 20), cfg.ring_from_ssd ? "SSD" : "DRAM");
  std::printf("test accuracy: ring %.2f %% in %.2f s, all resident %.2f %% in %.2f s -> %s\n", 100 * ring_acc, ring_s,
              100 * full_acc, full_s, ring_acc == full_acc ? "identical" : "DIFFERENT");
  std::printf("ring: %llu loads, %.0f MiB moved, %.2f s loading, %.2f s waiting\n",
              static_cast<unsigned long long>(st.loads), double(st.bytes_loaded) / (1 << 20), st.load_seconds,
              st.wait_seconds);
  std::printf("%s\n", nlohmann::json{{"example", "fashion_mnist"},
                                     {"mode", "evaluate"},
                                     {"ring_accuracy", ring_acc},
                                     {"resident_accuracy", full_acc},
                                     {"identical", ring_acc == full_acc},
                                     {"model_bytes", model_bytes},
                                     {"ring_budget_bytes", budget},
                                     {"slots", ring->slots()},
                                     {"ring_seconds", ring_s},
                                     {"resident_seconds", full_s}}
                          .dump()
                          .c_str());
  return ring_acc == full_acc ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const config cfg = parse(argc, argv);
  io::mnist_split train, test;
  try {
    train = io::load_mnist_split(cfg.data, "train");
    test = io::load_mnist_split(cfg.data, "t10k");
  } catch (const semoe::error& e) {
    std::fprintf(stderr, "fashion_mnist: %s\n(install Debian's dataset-fashion-mnist, or pass --data DIR)\n", e.what());
    return 1;
  }
  if (!cfg.evaluate.empty()) {
    try {
      blas::set_num_threads(cfg.threads);
      return evaluate(cfg, test);
    } catch (const semoe::error& e) {
      std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
      return 1;
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  outcome result;
  int ranks = cfg.ranks, rank = 0;
  try {
#ifdef FASHION_MNIST_TCP
    if (std::getenv("SEMOE_WORLD_SIZE") || std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("SLURM_NTASKS")) {
      auto world = comm::tcp::from_env();
      ranks = world.size();
      rank = world.rank();
      config per_process = cfg;  // the host's cores are shared by its ranks
      per_process.threads = std::max(1, cfg.threads / world.local_size());
      blas::set_num_threads(per_process.threads);
      result = cfg.offload() ? train_and_test<comm::tcp, offloaded_experts>(world, per_process, train, test)
                             : train_and_test<comm::tcp, resident_experts>(world, per_process, train, test);
    } else
#endif
    {
      blas::set_num_threads(std::max(1, cfg.threads / cfg.ranks));
      config per_rank = cfg;
      per_rank.threads = std::max(1, cfg.threads / cfg.ranks);
      std::mutex m;
      comm::local::run(cfg.ranks, [&](comm::local& c) {
        auto r = cfg.offload() ? train_and_test<comm::local, offloaded_experts>(c, per_rank, train, test)
                               : train_and_test<comm::local, resident_experts>(c, per_rank, train, test);
        std::lock_guard lock(m);
        if (c.rank() == 0) result = r;
      });
    }
  } catch (const semoe::error& e) {
    std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
    return 1;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto& rec = trace::recorder::instance();
  if (rec.enabled() && rank == 0) rec.write();
  if (rank == 0)
    std::printf("%s\n", nlohmann::json{{"example", "fashion_mnist"},
                                       {"test_accuracy", result.accuracy},
                                       {"epochs", result.epochs},
                                       {"steps", result.steps},
                                       {"seconds", seconds},
                                       {"ranks", ranks},
                                       {"experts", cfg.experts},
                                       {"parameters", result.parameters}}
                            .dump()
                            .c_str());
  return 0;
}
