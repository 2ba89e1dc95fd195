// Fashion-MNIST with a Mixture-of-Experts classifier.
//
//   784 -> linear 512 -> gelu -> [x + MoE(layernorm x)] -> layernorm -> linear 10
//
// The MoE block has 8 GELU experts (ffn 1024) behind a top-2 gate with a
// capacity factor, trained with AdamW and a cosine schedule, data + expert
// parallel: each rank takes 1/P of every batch and owns 1/P of the experts,
// and the loss curve matches P = 1. Ranks are processes under the launcher
// (`semoe-run -n 2 fashion_mnist`, comm::tcp; `mpirun -n 2 fashion_mnist
// --comm mpi`, comm::mpi) or, with --ranks P, threads of this process
// (comm::local).
//
// Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

#include "../common/launched_world.hpp"
#include "train.hpp"

using namespace semoe;
using namespace fashion_mnist;

namespace {

[[noreturn]] void usage(const char* argv0, const std::string& why, bool help = false) {
  std::fprintf(help ? stdout : stderr,
               "%s\nusage: %s [--epochs N] [--batch B] [--lr X] [--ranks P] [--threads T] [--experts E]\n"
               "          [--hidden H] [--ffn F] [--limit N] [--steps N] [--print-loss] [--seed S] [--data DIR]\n"
               "          [--device-budget BYTES] [--host-budget BYTES] [--ssd-dir DIR]   (e.g. 40M, 1G)\n"
               "          [--save MODEL.safetensors] [--backend cpu|cuda] [--comm %s]\n"
               "       %s evaluate MODEL.safetensors [--ring-budget BYTES] [--ring-source dram|ssd] [--data DIR]\n"
               "          (with the --hidden, --ffn and --experts the model was trained with)\n"
               "Under semoe-run each process is one rank (comm::tcp; under mpirun or srun with --comm mpi,\n"
               "comm::mpi); otherwise --ranks P thread-ranks.\n"
               "A budget or --ssd-dir offloads the experts: weights and gradients in a device tier\n"
               "(bounded), whole blocks with AdamW state cached in host DRAM, the rest on SSD.\n"
               "--backend cuda trains on the GPU (one rank, experts resident; builds with CUDA only).\n"
               "Set SEMOE_TRACE=trace.json to record a Chrome trace of the first 50 steps.\n",
               why.c_str(), argv0, examples::comm_choices(), argv0);
  std::exit(help ? 0 : 2);
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
      else if (a == "--comm") {
        c.comm = value();
        if (c.comm != "tcp" && c.comm != "mpi") usage(argv[0], "--comm is tcp or mpi");
      } else if (a == "--backend") {
        c.backend = value();
        if (c.backend != "cpu" && c.backend != "cuda") usage(argv[0], "--backend is cpu or cuda");
      }
      else if (a == "--help" || a == "-h") usage(argv[0], "Train an MoE classifier on Fashion-MNIST.", true);
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

/// Test accuracy of a model whose weights come from `path`.
template <class Where>
double accuracy_of(const config& cfg, const std::string& path, const io::mnist_split& test,
                   std::shared_ptr<typename Where::storage::template store<float>> store) {
  auto comms = comm::local::make_world(1);
  cpu::executor ex({.threads = std::max(1, cfg.threads)});
  auto model = make_model<cpu, comm::local, Where>(ex, comms[0], cfg, store);
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
    if (cfg.backend == "cuda") {
#if defined(FASHION_MNIST_WITH_CUDA)
      SEMOE_CHECK(cfg.ranks == 1 && !std::getenv("SEMOE_WORLD_SIZE") && !cfg.offload(),
                  "--backend cuda trains on one rank with its experts resident (no --ranks, launcher or budgets)");
      blas::set_num_threads(cfg.threads);
      result = train_and_test_cuda(cfg, train, test);
#else
      SEMOE_CHECK(false, "--backend cuda: this build has no CUDA (configure with SEMOE_CUDA=ON)");
#endif
    } else
    if (examples::launched()) {
      result = examples::with_launched_world(cfg.comm, [&]<class World>(World& world) {
        ranks = world.size();
        rank = world.rank();
        config per_process = cfg;  // the host's cores are shared by its ranks
        per_process.threads = std::max(1, cfg.threads / world.local_size());
        blas::set_num_threads(per_process.threads);
        return cfg.offload() ? train_and_test<cpu, World, offloaded_experts>(world, per_process, train, test)
                             : train_and_test<cpu, World, resident_experts>(world, per_process, train, test);
      });
    } else
    {
      blas::set_num_threads(std::max(1, cfg.threads / cfg.ranks));
      config per_rank = cfg;
      per_rank.threads = std::max(1, cfg.threads / cfg.ranks);
      std::mutex m;
      comm::local::run(cfg.ranks, [&](comm::local& c) {
        auto r = cfg.offload() ? train_and_test<cpu, comm::local, offloaded_experts>(c, per_rank, train, test)
                               : train_and_test<cpu, comm::local, resident_experts>(c, per_rank, train, test);
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
                                       {"backend", cfg.backend},
                                       {"experts", cfg.experts},
                                       {"parameters", result.parameters}}
                            .dump()
                            .c_str());
  return 0;
}
