// elastic_train: a training job that survives losing a rank.
//
//   semoe-run -n 4 --elastic --min-ranks 3 elastic_train --checkpoints ckpt --steps 400
//
// A small MoE classifier (12 experts: any of 1, 2, 3, 4 ranks shard them
// evenly) learns a synthetic rule, data + expert parallel. Every
// --checkpoint-every steps it saves a portable checkpoint under --checkpoints
// (root/step-N); on start it resumes from the newest complete one, on
// whatever number of ranks it now has. The data order is a fixed shuffle per
// epoch and the checkpoint records how many samples were consumed, so after
// a restart no step is taken twice and no sample is skipped. Without the
// launcher, --ranks P runs P thread-ranks in this process.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "semoe/comm/local.hpp"
#include "semoe/comm/tcp.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/train/portable_checkpoint.hpp"
#include "semoe/train/trainer.hpp"

using namespace semoe;

namespace {

struct config {
  long steps = 200;
  index_t batch = 48, samples = 1920, experts = 12, hidden = 32, ffn = 64;
  int ranks = 1, expert_parallel = 0, checkpoint_every = 20, print_every = 20, keep = 2;
  double lr = 3e-3;
  std::uint64_t seed = 1;
  std::string checkpoints, final_dir;
};

constexpr index_t in = 16, classes = 6;

[[noreturn]] void usage(const std::string& why, bool help = false) {
  std::fprintf(help ? stdout : stderr,
               "%s\nusage: elastic_train [--steps N] [--batch B] [--samples N] [--experts E] [--hidden H] [--ffn F]\n"
               "                     [--lr X] [--seed S] [--ranks P] [--expert-parallel EP]\n"
               "                     [--checkpoints DIR] [--checkpoint-every N] [--keep N] [--final DIR] [--print-every N]\n"
               "Under semoe-run each process is one rank (comm::tcp); otherwise --ranks P thread-ranks.\n"
               "--checkpoints DIR: save DIR/step-N every --checkpoint-every steps (keeping the newest --keep,\n"
               "default 2) and resume from the newest.\n"
               "--final DIR: save the trained run there (a portable checkpoint) at the end.\n"
               "B must be a multiple of the ranks and E of the expert-parallel size (default: all ranks).\n",
               why.c_str());
  std::exit(help ? 0 : 2);
}

config parse(int argc, char** argv) {
  config c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + a);
      return argv[++i];
    };
    try {
      if (a == "--steps") c.steps = std::stol(value());
      else if (a == "--batch") c.batch = std::stol(value());
      else if (a == "--samples") c.samples = std::stol(value());
      else if (a == "--experts") c.experts = std::stol(value());
      else if (a == "--hidden") c.hidden = std::stol(value());
      else if (a == "--ffn") c.ffn = std::stol(value());
      else if (a == "--lr") c.lr = std::stod(value());
      else if (a == "--seed") c.seed = std::stoull(value());
      else if (a == "--ranks") c.ranks = std::stoi(value());
      else if (a == "--expert-parallel") c.expert_parallel = std::stoi(value());
      else if (a == "--checkpoints") c.checkpoints = value();
      else if (a == "--checkpoint-every") c.checkpoint_every = std::stoi(value());
      else if (a == "--keep") c.keep = std::stoi(value());
      else if (a == "--final") c.final_dir = value();
      else if (a == "--print-every") c.print_every = std::stoi(value());
      else if (a == "--help" || a == "-h") usage("Train a small MoE model that resumes on any number of ranks.", true);
      else usage("unknown argument " + a);
    } catch (const std::logic_error&) {
      usage("bad value for " + a);
    }
  }
  if (c.steps < 1 || c.batch < 1 || c.samples < 1 || c.ranks < 1 || c.checkpoint_every < 1 || c.print_every < 1 ||
      c.keep < 1)
    usage("steps, batch, samples, ranks, checkpoint-every, keep and print-every must be >= 1");
  return c;
}

/// The data order: epoch e visits the samples in a fixed shuffle of e.
/// Sample i's features and label are a function of i alone.
struct dataset {
  index_t n;
  std::uint64_t seed;
  std::vector<index_t> order;
  std::uint64_t epoch = ~std::uint64_t{0};

  index_t at(std::uint64_t position) {
    const std::uint64_t e = position / static_cast<std::uint64_t>(n);
    if (e != epoch) {  // Fisher-Yates keyed by (seed, epoch): the same on every rank and every run
      order.resize(static_cast<std::size_t>(n));
      std::iota(order.begin(), order.end(), index_t{0});
      const philox rng(seed ^ 0xe90c4ull, e);
      for (index_t i = n - 1; i > 0; --i)
        std::swap(order[i], order[static_cast<index_t>(rng.uniform(static_cast<std::uint64_t>(i)) * (i + 1)) % (i + 1)]);
      epoch = e;
    }
    return order[position % static_cast<std::uint64_t>(n)];
  }
  void sample(index_t i, float* x, std::int32_t& y) const {
    const philox rng(seed, static_cast<std::uint64_t>(i));
    float s = 0;
    for (index_t j = 0; j < in; ++j) s += (x[j] = 2 * rng.uniform(static_cast<std::uint64_t>(j)) - 1) * (j % 3 - 1.0f);
    y = static_cast<std::int32_t>(std::clamp<index_t>(static_cast<index_t>((s + 3.0f) / 6.0f * classes), 0, classes - 1));
  }
};

template <class Comm>
using moe_t = moe_layer<cpu, gate::top_k<2>, expert::ffn<act::gelu>, Comm>;
template <class Comm>
using block_t = layer::residual<float, layer::layer_norm<float>, moe_t<Comm>>;
template <class Comm>
using model_t = layer::sequential<float, layer::linear<float>, block_t<Comm>, block_t<Comm>, layer::linear<float>>;

template <class Comm>
int run_training(Comm& world, const config& cfg) {
  const int W = world.size(), rank = world.rank();
  SEMOE_CHECK(cfg.batch % W == 0, "--batch ", cfg.batch, " must be a multiple of the ", W, " ranks");
  auto groups = train::make_groups(world, cfg.expert_parallel);
  cpu_executor ex({.threads = 1});
  auto block = [&](std::uint64_t seed) {
    return block_t<Comm>(ex, layer::layer_norm<float>(ex, {.dim = cfg.hidden}),
                         moe_t<Comm>(ex, groups.expert,
                                     {.hidden = cfg.hidden, .ffn = cfg.ffn, .experts = cfg.experts,
                                      .gate = {.capacity_factor = 1.5}, .seed = cfg.seed + seed}));
  };
  model_t<Comm> model(layer::linear<float>(ex, {.in = in, .out = cfg.hidden}, cfg.seed + 10), block(20), block(30),
                      layer::linear<float>(ex, {.in = cfg.hidden, .out = classes}, cfg.seed + 40));
  train::adamw<float> opt(ex, {.lr = cfg.lr});
  train::trainer tr(model, opt, world, groups, {.clip_norm = 1.0});
  layer::softmax_cross_entropy<float> ce(ex);

  std::uint64_t position = 0;  // samples of the data order consumed
  if (!cfg.checkpoints.empty())
    if (auto last = train::latest_checkpoint(cfg.checkpoints)) {
      const auto info = train::load_portable_checkpoint(*last, tr);
      position = info.data_position;
      if (rank == 0)
        std::printf("resuming from step %llu (%s, saved on %d ranks, expert-parallel %d) on %d ranks, expert-parallel "
                    "%d, at sample %llu\n",
                    static_cast<unsigned long long>(info.step), last->string().c_str(), info.world_size,
                    info.expert_parallel, W, groups.expert.size(), static_cast<unsigned long long>(position));
    }
  if (rank == 0 && tr.steps() == 0)
    std::printf("training %ld steps on %d ranks (expert-parallel %d): %lld experts per MoE layer, batch %lld\n",
                cfg.steps, W, groups.expert.size(), static_cast<long long>(cfg.experts),
                static_cast<long long>(cfg.batch));
  std::fflush(stdout);

  dataset data{cfg.samples, cfg.seed, {}};
  const index_t n = cfg.batch / W;
  matrix<float> x(n, in), dlogits(n, classes);
  std::vector<std::int32_t> y(static_cast<std::size_t>(n));
  while (tr.steps() < static_cast<std::uint64_t>(cfg.steps)) {
    for (index_t i = 0; i < n; ++i)  // this rank's slice of the global batch
      data.sample(data.at(position + static_cast<std::uint64_t>(rank * n + i)), &x(i, 0), y[static_cast<std::size_t>(i)]);
    const double loss = tr.step([&](model_t<Comm>& m) {
      auto logits = m.forward(x.view());
      const double l = ce.forward(logits, std::span<const std::int32_t>(y), cfg.batch);
      ce.backward(dlogits.view());
      m.backward(dlogits.view());
      return l;
    });
    position += static_cast<std::uint64_t>(cfg.batch);
    const std::uint64_t s = tr.steps();
    if (rank == 0 && (s % static_cast<std::uint64_t>(cfg.print_every) == 0 || s == static_cast<std::uint64_t>(cfg.steps))) {
      std::printf("step %llu loss %.6f samples %llu..%llu\n", static_cast<unsigned long long>(s), loss,
                  static_cast<unsigned long long>(position - static_cast<std::uint64_t>(cfg.batch)),
                  static_cast<unsigned long long>(position));
      std::fflush(stdout);
    }
    if (!cfg.checkpoints.empty() && s % static_cast<std::uint64_t>(cfg.checkpoint_every) == 0) {
      train::save_portable_checkpoint(train::checkpoint_dir(cfg.checkpoints, s), tr, position);
      if (rank == 0) {
        train::prune_checkpoints(cfg.checkpoints, static_cast<std::size_t>(cfg.keep));
        std::printf("saved checkpoint step %llu\n", static_cast<unsigned long long>(s));
        std::fflush(stdout);
      }
    }
  }
  double busiest = 0;
  train::for_each_moe_layer(model, [&](auto& l) { busiest = std::max(busiest, l.gather_load().max_rank_share()); });
  if (!cfg.final_dir.empty()) train::save_portable_checkpoint(cfg.final_dir, tr, position);
  if (rank == 0)
    std::printf("done: %llu steps, %llu samples, busiest rank's share of expert rows %.3f\n",
                static_cast<unsigned long long>(tr.steps()), static_cast<unsigned long long>(position), busiest);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const config cfg = parse(argc, argv);
  int rank = 0;
  try {
    if (std::getenv("SEMOE_WORLD_SIZE") || std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("SLURM_NTASKS")) {
      auto world = comm::tcp::from_env();
      rank = world.rank();
      blas::set_num_threads(1);
      return run_training(world, cfg);
    }
    blas::set_num_threads(1);
    comm::local::run(cfg.ranks, [&](comm::local& c) { run_training(c, cfg); });
  } catch (const semoe::error& e) {
    std::fprintf(stderr, "elastic_train: rank %d: %s\n", rank, e.what());
    return 1;
  }
  return 0;
}
