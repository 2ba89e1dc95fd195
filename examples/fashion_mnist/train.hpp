// The Fashion-MNIST MoE classifier and its training loop, generic over the
// backend: main.cpp runs it on the cpu backend (threads or processes), and
// cuda.cu on the cuda backend when the build has CUDA.
#pragma once

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

namespace fashion_mnist {

using namespace semoe;

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
  std::string backend = "cpu";  // cpu or cuda
  std::string comm = "tcp";     // a launched job's transport: tcp or mpi
  bool offload() const { return device_budget || host_budget || !ssd_dir.empty(); }
};


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
template <class B, class Comm, class Where>
using moe_t = basic_moe_layer<float, B, gate_t, expert::ffn<act::gelu>, Comm, typename Where::storage,
                              typename Where::prefetch>;
template <class B, class Comm, class Where>
using model_t = layer::sequential<float, layer::linear<float, B>, layer::activation<float, act::gelu, B>,
                                  layer::residual<float, layer::layer_norm<float, B>, moe_t<B, Comm, Where>>,
                                  layer::layer_norm<float, B>, layer::linear<float, B>>;

template <class B, class Comm, class Where>
model_t<B, Comm, Where> make_model(typename B::executor& ex, Comm& c, const config& cfg,
                                   std::shared_ptr<typename moe_t<B, Comm, Where>::store_type> store) {
  const index_t H = cfg.hidden;
  using moe = moe_t<B, Comm, Where>;
  using linear = layer::linear<float, B>;
  using norm = layer::layer_norm<float, B>;
  return model_t<B, Comm, Where>(
      linear(ex, {.in = 784, .out = H}, cfg.seed), layer::activation<float, act::gelu, B>(ex),
      layer::residual<float, norm, moe>(ex, norm(ex, {.dim = H}),
                                        moe(ex, c,
                                            {.hidden = H, .ffn = cfg.ffn, .experts = cfg.experts,
                                             .gate = {.capacity_factor = 1.25, .aux_loss_coef = 5e-2,
                                                      .z_loss_coef = 1e-3},
                                             .expert = {.bias = true}, .seed = cfg.seed + 7},
                                            std::move(store))),
      norm(ex, {.dim = H}), linear(ex, {.in = H, .out = 10}, cfg.seed + 3));
}

template <class M>
auto& moe_of(M& m) {
  return m.template get<2>().template get<1>();
}

template <class Store, class Where>
std::shared_ptr<Store> make_store(const config& cfg, int rank) {
  using store_t = Store;
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
inline void flip_row(float* img) {
  for (int r = 0; r < 28; ++r) std::reverse(img + r * 28, img + r * 28 + 28);
}

struct outcome {
  double accuracy = 0;
  std::size_t parameters = 0;
  index_t steps = 0;
  int epochs = 0;
};

/// The executor of backend B for one rank: cfg.threads host threads, or the
/// rank's GPU.
template <class B>
typename B::executor::options executor_options(const config& cfg) {
  typename B::executor::options o{};
  if constexpr (requires { o.threads; }) o.threads = std::max(1, cfg.threads);
  return o;
}

/// x where backend B's kernels can read it: x itself on the host, else a
/// copy in `staging` (device memory).
template <class B>
matrix_view<const float> on_backend(typename B::executor& ex, matrix_view<const float> x,
                                    matrix<float, typename B::memory_space>& staging) {
  if constexpr (B::memory_space::host_accessible) {
    return x;
  } else {
    staging.resize(x.rows(), x.cols());
    ex.copy(staging.data(), x.data(), staging.bytes());
    return staging.view();
  }
}

/// logits where the host can read them (for the accuracy count).
template <class B>
matrix_view<const float> on_host(typename B::executor& ex, matrix_view<const float> x, matrix<float>& staging) {
  if constexpr (B::memory_space::host_accessible) {
    return x;
  } else {
    staging.resize(x.rows(), x.cols());
    ex.copy(staging.data(), x.data(), staging.bytes());
    return staging.view();
  }
}

template <class B, class Comm, class Where>
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
  typename B::executor ex(executor_options<B>(cfg));
  using moe = moe_t<B, Comm, Where>;
  auto store = make_store<typename moe::store_type, Where>(cfg, c.rank());
  auto model = make_model<B, Comm, Where>(ex, groups.expert, cfg, store);
  train::adamw<float, B> opt(ex, {.lr = cfg.lr, .weight_decay = cfg.weight_decay});
  // Offloaded experts are updated right after their backward, while their
  // blocks are still in fast memory; that leaves no room for clipping, which
  // needs every gradient first.
  constexpr bool offloaded = !std::is_same_v<Where, resident_experts>;
  train::trainer tr(model, opt, c, groups,
                    {.clip_norm = offloaded ? 0.0 : 1.0, .update_experts_in_backward = offloaded});
  layer::softmax_cross_entropy<float, B> loss(ex, {.label_smoothing = 0.1});
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
  matrix<float> xb(local_batch, 784), logits_host;
  matrix<float, typename B::memory_space> x_dev, dlogits(local_batch, 10);
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
      const double l = tr.step([&](model_t<B, Comm, Where>& m) {
        auto logits = m.forward(on_backend<B>(ex, xb.view(), x_dev));
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
    const auto balance = moe_of(model).gather_load();  // the last steps' rows and expert seconds per rank

    // Test accuracy: each rank classifies its share of the test set.
    model.train(false);
    const index_t eval_batch = 1000, n_test = test.size(), per_rank = n_test / P;
    double correct = 0;
    for (index_t b = rank * per_rank; b < (rank + 1) * per_rank; b += eval_batch) {
      const index_t n = std::min(eval_batch, (rank + 1) * per_rank - b);
      auto logits = model.forward(on_backend<B>(ex, as_matrix<const float>(test.images.data() + b * 784, n, 784), x_dev));
      correct += static_cast<double>(
          layer::count_correct(on_host<B>(ex, logits, logits_host), std::span<const std::int32_t>(test.labels.data() + b, n)));
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
      if (P > 1) {
        std::printf("  busiest rank %.0f %% of expert rows (balanced: %.0f %%); expert ms per step by rank:",
                    100.0 * balance.max_rank_share(), 100.0 / P);
        for (double s : balance.rank_seconds) std::printf(" %.1f", 1e3 * s);
        std::printf("\n");
      }
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
    if constexpr (B::memory_space::host_accessible)
      io::save_model(cfg.save, model);
    else
      SEMOE_CHECK(false, "fashion_mnist: --save reads the weights on the host; use --backend cpu to save");
    std::printf("saved the weights to %s\n", cfg.save.c_str());
  }
  return out;
}

#if defined(FASHION_MNIST_WITH_CUDA)
/// train_and_test on the cuda backend, one rank (cuda.cu).
outcome train_and_test_cuda(const config& cfg, const io::mnist_split& train, const io::mnist_split& test);
#endif

}  // namespace fashion_mnist
