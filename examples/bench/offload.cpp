// Benchmark: data + expert parallel training with expert state offloaded to
// SSD under SE-MoE's hierarchical storage, against the same model with all
// of it resident, on N thread-ranks (default 2) in one run.
//
//   16 MoE layers x 8 experts, hidden 512, ffn 1024, top-2, 2048 tokens a
//   step (2048 / N per rank), AdamW; the experts are sharded over the ranks
//   expert state (weights + grads + 2 moments) = 128 blocks x 16 MiB = 2 GiB
//   per rank: device budget 2 layers of its experts (weights + grads), host
//   budget 25 % of its expert state, the rest on SSD (one file per rank)
//   AdamW on the host copy of each layer's experts as soon as its backward
//   ends (trainer option update_experts_in_backward), no clipping
//
// Per prefetch policy (on_demand, vertical<1>, vertical<2>, two_d; two_d's
// trace is recorded) it measures the offloaded step and, as its floor, the
// I/O alone: the SSD bytes that policy's step moved, on every rank at once,
// by the same SSD engine with 32 operations in flight per rank and no
// compute. overlap_ratio = offloaded / max(resident step, io floor): 1.0 is
// perfect overlap of SSD traffic with compute. vs_resident = offloaded /
// resident. Both ratios assume compute and I/O cost each other nothing; to
// see what they cost each other here, the resident step is also run with
// two_d's SSD traffic replayed beside it, the two uncoordinated (both_s;
// vs_both = offloaded / both_s; not a floor: a store that schedules its I/O
// can beat it), and every run reports
// the process's CPU seconds (cpu_s; a step near cores x step_s is CPU-bound).
// comm::local's progress threads carry two_d's layer-ahead gathers
// of the sharded dense parameters while layers compute, as comm::tcp's io
// thread does across processes.
//
// Usage: bench_offload [--ranks N] [--steps S] [--movers M] [--dir PATH]
//   defaults: 2 ranks, 3 measured steps, 1 mover thread per store (the
//   store's default), a directory under the temp dir.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/repeated.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/prefetch/two_d.hpp"
#include "semoe/prefetch/vertical.hpp"
#include "semoe/storage/ssd_tier.hpp"
#include "semoe/storage/tiered_store.hpp"
#include "semoe/train/trainer.hpp"

using namespace semoe;

namespace {

constexpr index_t H = 512, F = 1024, E = 8, depth = 16, tokens = 2048, classes = 16;
constexpr std::size_t elems = 2 * H * F;  // ffn<gelu> block
constexpr std::size_t full_block = 4 * elems * sizeof(float), device_block = 2 * elems * sizeof(float);
constexpr std::size_t expert_state = depth * E * full_block;  // over all ranks

template <class Storage, class Prefetch>
using moe_t = basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, Storage, Prefetch>;
template <class Storage, class Prefetch>
using block_t = layer::residual<float, layer::layer_norm<float>, moe_t<Storage, Prefetch>>;
template <class Storage, class Prefetch>
using model_t = layer::sequential<float, layer::repeated<float, block_t<Storage, Prefetch>>, layer::linear<float>>;
using ssd_store = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// CPU seconds (user + system) of every thread of this process so far.
double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  const auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + 1e-6 * static_cast<double>(t.tv_usec); };
  return sec(u.ru_utime) + sec(u.ru_stime);
}

/// One rank's budgets: two layers of its experts on the device, a quarter
/// of its expert state in DRAM.
int movers = 1;  // --movers: the store's mover threads (copy engines)

ssd_store::store<float>::options offload_options(const std::filesystem::path& dir, int ranks, int rank) {
  ssd_store::store<float>::options o;
  o.movers = movers;
  o.device.budget_bytes = 2 * (E / ranks) * device_block;
  o.host.budget_bytes = expert_state / ranks / 4;
  o.ssd.dir = dir;
  o.ssd.rank = rank;
  o.rank = rank;
  return o;
}

/// The SSD traffic of one step replayed with no compute: every rank at once
/// reads and writes the blocks its step moved (per_step[r]: SSD bytes read
/// and written) with the store's SSD engine, `in_flight` operations at once
/// per rank. The files are written once; each start() replays the traffic
/// on one thread per rank and wait() returns the seconds from start to the
/// last rank's last operation. Alone it is the I/O floor; started beside the
/// resident step it shows what compute and I/O cost each other here.
class io_replay {
 public:
  static constexpr std::size_t in_flight = 32;
  static constexpr std::size_t block = full_block;  // the store's SSD block: weights, grads, two moments

  io_replay(const std::vector<storage::store_stats>& per_step, std::filesystem::path dir) : dir_(std::move(dir)) {
    const int ranks = static_cast<int>(per_step.size());
    for (int r = 0; r < ranks; ++r) {
      auto& rk = ranks_.emplace_back();
      const auto& s = per_step[static_cast<std::size_t>(r)].ssd;
      rk.reads = (s.bytes_out + block - 1) / block;
      rk.writes = (s.bytes_in + block - 1) / block;
      rk.blocks = std::max<std::size_t>(1, std::min<std::size_t>(rk.reads, depth * E / ranks));  // the rank's file
      rk.tier = std::make_unique<storage::ssd_tier>(storage::ssd_options{.dir = dir_, .rank = r}, block,
                                                    rk.blocks + in_flight);
      for (std::size_t i = 0; i < in_flight; ++i) {
        rk.buf.emplace_back(static_cast<std::byte*>(std::aligned_alloc(storage::ssd_tier::alignment, block)),
                            &std::free);
        std::memset(rk.buf.back().get(), int(i), block);
      }
      for (std::size_t b = 0; b < rk.blocks; ++b) rk.tier->write(b, rk.buf[b % in_flight].get()).wait();  // to read back
    }
    for (int r = 0; r < ranks; ++r) threads_.emplace_back([this, r] { serve(static_cast<std::size_t>(r)); });
  }
  io_replay(const io_replay&) = delete;
  io_replay& operator=(const io_replay&) = delete;
  ~io_replay() {
    {
      std::lock_guard lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    ranks_.clear();
    std::filesystem::remove_all(dir_);
  }

  void start() {
    std::lock_guard lk(m_);
    begin_ = end_ = now();
    done_ = 0;
    ++round_;
    cv_.notify_all();
  }
  double wait() {
    std::unique_lock lk(m_);
    cv_.wait(lk, [&] { return done_ == ranks_.size(); });
    return end_ - begin_;
  }

 private:
  struct rank_files {
    std::size_t reads = 0, writes = 0, blocks = 0;
    std::unique_ptr<storage::ssd_tier> tier;
    std::vector<std::unique_ptr<std::byte[], decltype(&std::free)>> buf;
  };

  void serve(std::size_t r) {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock lk(m_);
        cv_.wait(lk, [&] { return stop_ || round_ != seen; });
        if (stop_) return;
        seen = round_;
      }
      replay(ranks_[r]);
      {
        std::lock_guard lk(m_);
        end_ = std::max(end_, now());
        ++done_;
      }
      cv_.notify_all();
    }
  }

  static void replay(rank_files& rk) {
    std::deque<storage::io_handle> pending;
    for (std::size_t i = 0; i < rk.reads + rk.writes; ++i) {
      if (pending.size() == in_flight) {
        pending.front().wait();
        pending.pop_front();
      }
      // Writes go to blocks no read touches; each buffer is reused only
      // after the operation in flight on it (in_flight ago) is done.
      std::byte* b = rk.buf[i % in_flight].get();
      pending.push_back(i < rk.reads ? rk.tier->read(i % rk.blocks, b)
                                     : rk.tier->write(rk.blocks + i % in_flight, b));
    }
    for (auto& h : pending) h.wait();
  }

  std::filesystem::path dir_;
  std::deque<rank_files> ranks_;  // stable addresses for the threads
  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable cv_;
  std::uint64_t round_ = 0;
  std::size_t done_ = 0;
  double begin_ = 0, end_ = 0;
  bool stop_ = false;
};

struct measured {
  double step_s = 0;  // median over the measured steps (rank 0's clock; steps end in collectives)
  double cpu_s = 0;   // process CPU seconds per step (all ranks, movers, SSD engine)
  double both_s = 0;  // with an I/O replay beside each step: median of max(step, replay) from one start
  std::vector<storage::store_stats> per_step;  // per rank, bytes divided by the steps
};

/// Train `steps` measured steps after one warm-up on `ranks` thread-ranks.
template <class Storage, class Prefetch>
measured train_steps(int ranks, int steps, const std::filesystem::path& dir, const char* name, bool trace_last = false,
                     io_replay* beside = nullptr) {
  using store_t = typename Storage::template store<float>;
  using M = model_t<Storage, Prefetch>;
  measured out;
  out.per_step.resize(static_cast<std::size_t>(ranks));
  std::mutex m;
  comm::local::run(ranks, [&](comm::local& world) {
    const int rank = world.rank();
    std::shared_ptr<store_t> store;
    if constexpr (std::is_same_v<Storage, ssd_store>)
      store = std::make_shared<store_t>(offload_options(dir, ranks, rank));
    else
      store = std::make_shared<store_t>();
    auto groups = train::make_groups(world);
    cpu_executor ex({.threads = std::max(1, 2 / ranks)});
    if (rank == 0) {
      std::printf("  %-11s building the model (expert state %.2f GiB per rank) ...\n", name,
                  double(expert_state) / ranks / (1 << 30));
      std::fflush(stdout);
    }
    M model(layer::repeated<float, block_t<Storage, Prefetch>>(depth, [&](index_t i) {
              return block_t<Storage, Prefetch>(
                  ex, layer::layer_norm<float>(ex, {.dim = H}),
                  moe_t<Storage, Prefetch>(ex, groups.expert,
                                           {.hidden = H, .ffn = F, .experts = E, .seed = 10 + std::uint64_t(i)},
                                           store));
            }),
            layer::linear<float>(ex, {.in = H, .out = classes}, 3));
    train::adamw<float> opt(ex, {.lr = 1e-3});
    // Experts are updated as each layer's backward ends, where their state is.
    train::trainer tr(model, opt, world, groups, {.clip_norm = 0, .update_experts_in_backward = true});
    layer::softmax_cross_entropy<float> ce(ex);
    const index_t n = tokens / ranks;
    matrix<float> x(n, H), dlogits(n, classes);
    std::vector<std::int32_t> y(static_cast<std::size_t>(n));
    const philox rng(3, static_cast<std::uint64_t>(rank));
    for (index_t i = 0; i < n * H; ++i) x.data()[i] = 2 * rng.uniform(std::uint64_t(i)) - 1;
    for (index_t i = 0; i < n; ++i) y[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i + rank * n) % classes);
    auto step = [&] {
      tr.step([&](M& mm) {
        auto logits = mm.forward(x.view());
        const double l = ce.forward(logits, std::span<const std::int32_t>(y), tokens);
        ce.backward(dlogits.view());
        mm.backward(dlogits.view());
        return l;
      });
    };
    step();  // warm-up: the first step fills caches and predictions
    if constexpr (requires { store->reset_stats(); }) {
      store->drain();
      store->reset_stats();
    }
    world.barrier();
    std::vector<double> t, both;
    double cpu = 0;
    auto& rec = trace::recorder::instance();
    const std::string trace_path = rec.path();
    for (int s = 0; s < steps; ++s) {
      // SEMOE_TRACE=file.json: the timeline of the last step of the last policy.
      const bool traced = !trace_path.empty() && trace_last && s + 1 == steps;
      if (traced && rank == 0) rec.start(trace_path);
      world.barrier();
      const double c0 = cpu_seconds();
      if (beside && rank == 0) beside->start();
      const double t0 = now();
      step();
      t.push_back(now() - t0);
      world.barrier();
      if (rank == 0) {
        if (beside) both.push_back(std::max(t.back(), beside->wait()));
        cpu += cpu_seconds() - c0;
      }
      if (traced && rank == 0) {
        rec.stop();
        rec.write();
      }
      if (rank == 0) {
        std::printf("  %-11s step %d: %.2f s\n", name, s + 1, t.back());
        std::fflush(stdout);
      }
    }
    if constexpr (requires { store->stats(); }) {
      store->drain();  // the step's write-backs count in its bytes
      auto st = store->stats();
      const auto div = [&](std::uint64_t& v) { v /= static_cast<std::uint64_t>(steps); };
      for (auto* ts : {&st.device, &st.host, &st.ssd}) {
        div(ts->bytes_in);
        div(ts->bytes_out);
      }
      std::lock_guard lk(m);
      out.per_step[static_cast<std::size_t>(rank)] = st;
    }
    if (rank == 0) {
      std::sort(t.begin(), t.end());
      out.step_s = t[t.size() / 2];
      out.cpu_s = cpu / steps;
      if (!both.empty()) {
        std::sort(both.begin(), both.end());
        out.both_s = both[both.size() / 2];
      }
    }
  });
  return out;
}

/// The I/O floor: median seconds of `rounds` replays of a step's SSD traffic,
/// and the process CPU seconds of one.
std::pair<double, double> io_floor(const std::vector<storage::store_stats>& per_step, const std::filesystem::path& dir,
                                   int rounds) {
  io_replay io(per_step, dir);
  std::vector<double> t;
  const double c0 = cpu_seconds();
  for (int round = 0; round < rounds; ++round) {
    io.start();
    t.push_back(io.wait());
  }
  const double cpu = (cpu_seconds() - c0) / rounds;
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], cpu};
}

double mib(std::uint64_t b) { return static_cast<double>(b) / (1 << 20); }

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: bench_offload [--ranks N] [--steps S] [--movers M] [--dir PATH]\n"
               "  Offloaded training per prefetch policy against the all-resident step and the\n"
               "  I/O floor, on N thread-ranks (default 2; 1, 2, 4 or 8), S measured steps\n"
               "  (default 3), M mover threads per store (default 1), SSD files under PATH\n"
               "  (default: a new directory in the temp dir).\n");
}

}  // namespace

int main(int argc, char** argv) {
  trace::recorder::instance().stop();  // only the traced step records (SEMOE_TRACE)
  int ranks = 2, steps = 3;
  std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("semoe-bench-offload-" + std::to_string(::getpid()));
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    }
    const std::string v = i + 1 < argc ? argv[i + 1] : "";
    const int n = std::atoi(v.c_str());
    if (a == "--dir" && !v.empty()) {
      dir = v;
    } else if (a == "--ranks" && (n == 1 || n == 2 || n == 4 || n == 8)) {
      ranks = n;
    } else if (a == "--steps" && n >= 1) {
      steps = n;
    } else if (a == "--movers" && n >= 1 && n <= 16) {
      movers = n;
    } else {
      std::fprintf(stderr, "bench_offload: bad argument '%s %s'\n", a.c_str(), v.c_str());
      usage(stderr);
      return 2;
    }
    ++i;
  }
  blas::set_num_threads(1);  // each rank's executor threads call BLAS
  std::printf("BLAS kernels: %s\n", blas::kernel_name().c_str());
  if (const auto w = blas::kernel_warning(); !w.empty()) std::printf("warning: %s\n", w.c_str());
  std::printf("offload benchmark: %lld MoE layers x %lld experts, hidden %lld, ffn %lld, %lld tokens, top-2, %d ranks\n",
              (long long)depth, (long long)E, (long long)H, (long long)F, (long long)tokens, ranks);
  std::printf("per rank: expert state %.0f MiB; device budget %.0f MiB (2 layers), host budget %.0f MiB (25 %%), "
              "%d mover thread(s)\nSSD: %s\n",
              mib(expert_state / ranks), mib(2 * (E / ranks) * device_block), mib(expert_state / ranks / 4), movers,
              dir.c_str());

  const auto resident = train_steps<storage::resident, prefetch::on_demand>(ranks, steps, {}, "resident");

  nlohmann::json policies = nlohmann::json::array();
  std::vector<storage::store_stats> two_d_traffic;
  auto run = [&]<class Prefetch>(const char* name, bool trace) {
    const auto sub = dir / name;
    const auto m = train_steps<ssd_store, Prefetch>(ranks, steps, sub, name, trace);
    std::filesystem::remove_all(sub);
    const auto [floor_s, floor_cpu_s] = io_floor(m.per_step, dir / "floor", 3);
    std::printf("  %-11s I/O floor %.2f s\n", name, floor_s);
    std::fflush(stdout);
    if (std::string(name) == "two_d") two_d_traffic = m.per_step;
    const auto& s = m.per_step[0];
    policies.push_back({{"policy", name},
                        {"step_s", m.step_s},
                        {"io_floor_s", floor_s},
                        {"overlap_ratio", m.step_s / std::max(resident.step_s, floor_s)},
                        {"vs_resident", m.step_s / resident.step_s},
                        {"cpu_s", m.cpu_s},
                        {"io_floor_cpu_s", floor_cpu_s},
                        {"hit_rate", s.hit_rate()},
                        {"wait_s", s.wait_seconds / steps},
                        {"read_through", s.read_through / static_cast<std::uint64_t>(steps)},
                        {"bytes_per_step",
                         {{"ssd_read", s.ssd.bytes_out}, {"ssd_write", s.ssd.bytes_in},
                          {"host_to_device", s.device.bytes_in}, {"device_to_host", s.device.bytes_out}}},
                        {"peak_bytes", {{"device", s.device.peak_bytes}, {"host", s.host.peak_bytes}}},
                        {"budget_bytes", {{"device", s.device.budget_bytes}, {"host", s.host.budget_bytes}}}});
  };
  run.operator()<prefetch::on_demand>("on_demand", false);
  run.operator()<prefetch::vertical<1>>("vertical<1>", false);
  run.operator()<prefetch::vertical<2>>("vertical<2>", false);
  run.operator()<prefetch::two_d<2>>("two_d", true);

  // The resident step with two_d's SSD traffic replayed beside it (full
  // queue depth, neither waiting on the other). Where compute and I/O share
  // cores, this is above max(resident, floor).
  double both_s = 0;
  {
    io_replay io(two_d_traffic, dir / "both");
    both_s = train_steps<storage::resident, prefetch::on_demand>(ranks, steps, {}, "both", false, &io).both_s;
  }
  std::printf("  resident step with two_d's I/O beside it: %.2f s\n", both_s);
  for (auto& p : policies) p["vs_both"] = p["step_s"].get<double>() / both_s;
  std::filesystem::remove_all(dir);

  std::printf("\nall-resident step %.2f s (%.2f CPU s) on %d ranks; with two_d's I/O beside it %.2f s; per rank 0 below "
              "(bytes per step, peaks and budgets in MiB)\n",
              resident.step_s, resident.cpu_s, ranks, both_s);
  std::printf("%-12s %7s %7s %8s %7s %7s %6s %6s %8s %8s %8s %8s %11s %11s\n", "policy", "step s", "floor s", "overlap",
              "vs res", "vs both", "CPU s", "hit", "SSD rd", "SSD wr", "H->D", "D->H", "dev peak", "host peak");
  for (const auto& p : policies) {
    const auto& b = p["bytes_per_step"];
    std::printf("%-12s %7.2f %7.2f %8.2f %7.2f %7.2f %6.2f %6.2f %7.0fM %7.0fM %7.0fM %7.0fM %5.0f/%-5.0f %5.0f/%-5.0f\n",
                p["policy"].get<std::string>().c_str(), p["step_s"].get<double>(), p["io_floor_s"].get<double>(),
                p["overlap_ratio"].get<double>(), p["vs_resident"].get<double>(), p["vs_both"].get<double>(),
                p["cpu_s"].get<double>(), p["hit_rate"].get<double>(),
                mib(b["ssd_read"]), mib(b["ssd_write"]), mib(b["host_to_device"]), mib(b["device_to_host"]),
                mib(p["peak_bytes"]["device"]), mib(p["budget_bytes"]["device"]), mib(p["peak_bytes"]["host"]),
                mib(p["budget_bytes"]["host"]));
  }
  std::printf("%s\n", nlohmann::json{{"benchmark", "offload"},
                                     {"ranks", ranks},
                                     {"movers", movers},
                                     {"resident_step_s", resident.step_s},
                                     {"resident_cpu_s", resident.cpu_s},
                                     {"both_s", both_s},
                                     {"policies", policies}}
                          .dump()
                          .c_str());
  return 0;
}
