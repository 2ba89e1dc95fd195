// Benchmark: elastic expert placement under skewed routing. Two processes
// over comm::tcp, each pinned to its own core with one BLAS thread, train one
// MoE layer of 8 experts (4 per rank, top-2, dropless) on 2048 tokens per
// rank a step. The gate's routing is either as learned from an even start
// ("uniform") or skewed by a Zipf(1.2) prior on the experts ("zipf":
// gate::with_prior), and the experts are placed statically or by
// placement::replicate_hot<2> (two replica slots per rank). Training
// tokens/s of the four, measured in interleaved rounds after a warm-up that
// lets replicate_hot place its copies; each figure is the median over the
// rounds, each ratio the median of the rounds' ratios. The busiest rank's
// share of the expert rows comes from the layers' load monitors.
//
// Usage: bench_elastic [--rounds N] [--steps S] [--tokens T]
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "semoe/comm/tcp.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/gate/with_prior.hpp"
#include "semoe/launch/launcher.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/placement/replicate_hot.hpp"
#include "semoe/train/trainer.hpp"

using namespace semoe;

namespace {

constexpr index_t in = 64, hidden = 256, ffn = 512, experts = 8, classes = 8;
constexpr double zipf_s = 1.2;

using gate_t = gate::with_prior<gate::top_k<2>>;
template <class Placement>
using moe_t = moe_layer<cpu, gate_t, expert::ffn<act::gelu>, comm::tcp, storage::resident, prefetch::on_demand,
                        Placement>;
template <class Placement>
using model_t = layer::sequential<float, layer::linear<float>, layer::residual<float, layer::layer_norm<float>,
                                                                               moe_t<Placement>>,
                                  layer::linear<float>>;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct config {
  int rounds = 5, steps = 3;
  index_t tokens = 2048;  ///< per rank and step
};

/// One training setup: a model, its optimizer and trainer, and a fixed batch.
struct setup {
  virtual ~setup() = default;
  virtual double step() = 0;  ///< one training step, seconds
  virtual double busiest_share() = 0;
  std::string routing, placement;
};

template <class Placement>
struct setup_of : setup {
  setup_of(comm::tcp& world, const config& c, bool skewed, std::string p)
      : groups(train::make_groups(world)), ex({.threads = 1}),
        model(layer::linear<float>(ex, {.in = in, .out = hidden}, 1),
              layer::residual<float, layer::layer_norm<float>, moe_t<Placement>>(
                  ex, layer::layer_norm<float>(ex, {.dim = hidden}),
                  moe_t<Placement>(ex, groups.expert,
                                   {.hidden = hidden, .ffn = ffn, .experts = experts,
                                    .gate = {.gate = {.dropless = true},
                                             .prior = skewed ? gate::zipf_prior(experts, zipf_s)
                                                             : std::vector<double>(experts, 1.0)},
                                    .seed = 7, .placement = placement_options()})),
              layer::linear<float>(ex, {.in = hidden, .out = classes}, 2)),
        opt(ex, {.lr = 1e-4}), tr(model, opt, world, groups, {.clip_norm = 1.0}), ce(ex), x(c.tokens, in),
        dlogits(c.tokens, classes), y(static_cast<std::size_t>(c.tokens)), world_(&world) {
    routing = skewed ? "zipf" : "uniform";
    placement = std::move(p);
    const philox rng(3, static_cast<std::uint64_t>(world.rank()));
    for (index_t i = 0; i < c.tokens * in; ++i) x.data()[i] = 2 * rng.uniform(static_cast<std::uint64_t>(i)) - 1;
    for (index_t i = 0; i < c.tokens; ++i) y[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i % classes);
  }
  static typename Placement::options placement_options() {
    typename Placement::options o{};
    if constexpr (Placement::replica_slots > 0) o.interval = 4;
    return o;
  }
  double step() override {
    world_->barrier();
    const auto t0 = std::chrono::steady_clock::now();
    tr.step([&](model_t<Placement>& m) {
      auto logits = m.forward(x.view());
      const double l = ce.forward(logits, std::span<const std::int32_t>(y), x.rows() * world_->size());
      ce.backward(dlogits.view());
      m.backward(dlogits.view());
      return l;
    });
    world_->barrier();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  double busiest_share() override {
    double s = 0;
    train::for_each_moe_layer(model, [&](auto& l) { s = l.gather_load().max_rank_share(); });
    return s;
  }

  train::parallel_groups<comm::tcp> groups;
  cpu_executor ex;
  model_t<Placement> model;
  train::adamw<float> opt;
  train::trainer<model_t<Placement>, train::adamw<float>, comm::tcp> tr;
  layer::softmax_cross_entropy<float> ce;
  matrix<float> x, dlogits;
  std::vector<std::int32_t> y;
  comm::tcp* world_;
};

int worker(const config& c) {
  auto world = comm::tcp::from_env();
  cpu_set_t one;  // each rank on its own core
  CPU_ZERO(&one);
  CPU_SET(world.local_rank() % static_cast<int>(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN))), &one);
  SEMOE_CHECK(::sched_setaffinity(0, sizeof one, &one) == 0, "bench_elastic: sched_setaffinity: ", std::strerror(errno));
  blas::set_num_threads(1);
  std::vector<std::unique_ptr<setup>> setups;
  for (bool skewed : {false, true}) {
    setups.push_back(std::make_unique<setup_of<placement::static_placement>>(world, c, skewed, "static_placement"));
    setups.push_back(std::make_unique<setup_of<placement::replicate_hot<2>>>(world, c, skewed, "replicate_hot"));
  }
  for (auto& s : setups)  // warm-up: buffers sized, load windows filled, copies placed
    for (int i = 0; i < 12; ++i) s->step();
  const double tokens = static_cast<double>(c.tokens) * world.size();
  std::vector<std::vector<double>> rate(setups.size());
  std::vector<double> skew_ratio, even_ratio;
  for (int r = 0; r < c.rounds; ++r) {
    for (std::size_t i = 0; i < setups.size(); ++i) {
      double t = 0;
      for (int s = 0; s < c.steps; ++s) t += setups[i]->step();
      rate[i].push_back(tokens * c.steps / t);
    }
    even_ratio.push_back(rate[1].back() / rate[0].back());
    skew_ratio.push_back(rate[3].back() / rate[2].back());
    if (world.rank() == 0) {
      std::fprintf(stderr, "round %d of %d: replicate_hot / static %.3f (uniform), %.3f (zipf)\n", r + 1, c.rounds,
                   even_ratio.back(), skew_ratio.back());
    }
  }
  for (std::size_t i = 0; i < setups.size(); ++i) {
    const double share = setups[i]->busiest_share();  // collective: every rank
    if (world.rank() == 0)
      std::printf("RESULT %s\n", nlohmann::json{{"routing", setups[i]->routing},
                                                {"placement", setups[i]->placement},
                                                {"tokens_per_s", median(rate[i])},
                                                {"max_rank_load_share", share}}
                                     .dump()
                                     .c_str());
  }
  if (world.rank() == 0)
    std::printf("RATIOS %s\n", nlohmann::json{{"uniform", median(even_ratio)}, {"zipf", median(skew_ratio)}}.dump().c_str());
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  config c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("usage: bench_elastic [--rounds N] [--steps S] [--tokens T]\n"
                  "Training tokens/s of one MoE layer (8 experts, top-2, dropless) on 2 tcp processes, one core\n"
                  "each, under uniform and Zipf(1.2)-skewed routing, with static_placement and replicate_hot<2>.\n");
      return 0;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "bench_elastic: %s needs a value (see --help)\n", a.c_str());
      return 2;
    }
    if (a == "--rounds") c.rounds = std::max(1, std::atoi(argv[++i]));
    else if (a == "--steps") c.steps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--tokens") c.tokens = std::max<index_t>(8, std::atol(argv[++i]));
    else {
      std::fprintf(stderr, "bench_elastic: unknown argument %s (see --help)\n", a.c_str());
      return 2;
    }
  }
  try {
    if (std::getenv("SEMOE_WORLD_SIZE")) return worker(c);
    std::printf("bench_elastic: 2 tcp ranks, one core each; %d rounds x %d steps of %lld tokens per rank\n", c.rounds,
                c.steps, static_cast<long long>(c.tokens));
    std::fflush(stdout);
    std::FILE* out = std::tmpfile();
    launch::options o;
    o.ranks_per_node = 2;
    o.out = out;
    o.prefix = false;
    const auto r = launch::run({argv[0], "--rounds", std::to_string(c.rounds), "--steps", std::to_string(c.steps),
                                "--tokens", std::to_string(c.tokens)},
                               o);
    std::fflush(out);
    std::rewind(out);
    nlohmann::json results = nlohmann::json::array(), ratios;
    char line[4096];
    while (std::fgets(line, sizeof line, out)) {
      if (std::strncmp(line, "RESULT ", 7) == 0) results.push_back(nlohmann::json::parse(line + 7));
      else if (std::strncmp(line, "RATIOS ", 7) == 0) ratios = nlohmann::json::parse(line + 7);
      else std::fputs(line, stdout);
    }
    std::fclose(out);
    SEMOE_CHECK(r.exit_code == 0, "bench_elastic: the 2-rank run failed (rank ", r.failed_rank, ")");
    std::printf("%-9s %-17s %12s %22s\n", "routing", "placement", "tokens/s", "busiest rank's share");
    for (const auto& j : results)
      std::printf("%-9s %-17s %12.0f %22.3f\n", j["routing"].get<std::string>().c_str(),
                  j["placement"].get<std::string>().c_str(), j["tokens_per_s"].get<double>(),
                  j["max_rank_load_share"].get<double>());
    std::printf("replicate_hot / static_placement tokens/s: zipf %.3f, uniform %.3f (medians of per-round ratios)\n",
                ratios["zipf"].get<double>(), ratios["uniform"].get<double>());
    std::printf("%s\n", nlohmann::json{{"benchmark", "elastic"},
                                       {"results", results},
                                       {"replicate_vs_static", ratios}}
                            .dump()
                            .c_str());
  } catch (const semoe::error& e) {
    std::fprintf(stderr, "bench_elastic: %s\n", e.what());
    return 1;
  }
  return 0;
}
