// Optimizers against scalar references, clipping by the global norm, and the
// gradient reduction, on one rank and over several.
#include <doctest/doctest.h>

#include <cmath>
#include <mutex>
#include <random>
#include <vector>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/train/optimizer.hpp"

using namespace semoe;

namespace {

// A model with one dense parameter vector: enough for the optimizer contract.
struct tiny_model {
  std::vector<double> w, g;
  param_list<double> parameters() { return {{"w", w, g, param_kind::dense}}; }
};

using moe_t = basic_moe_layer<double, cpu, gate::top_k<2>>;

}  // namespace

TEST_CASE("adamw follows the reference update, with decoupled weight decay") {
  cpu_executor ex({.threads = 2});
  tiny_model m{{0.5, -1.0, 2.0}, {0.1, -0.2, 0.3}};
  train::adamw<double> opt(ex, {.lr = 0.1, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.01});
  std::vector<double> w = m.w, mm(3, 0.0), vv(3, 0.0);
  for (int t = 1; t <= 3; ++t) {
    for (std::size_t i = 0; i < 3; ++i) m.g[i] = 0.1 * t * (static_cast<double>(i) - 1.0) + 0.05;
    opt.step(m);
    for (std::size_t i = 0; i < 3; ++i) {
      const double g = m.g[i];
      mm[i] = 0.9 * mm[i] + 0.1 * g;
      vv[i] = 0.99 * vv[i] + 0.01 * g * g;
      const double mh = mm[i] / (1 - std::pow(0.9, t)), vh = vv[i] / (1 - std::pow(0.99, t));
      w[i] -= 0.1 * (mh / (std::sqrt(vh) + 1e-8) + 0.01 * w[i]);
      CHECK(m.w[i] == doctest::Approx(w[i]).epsilon(1e-14));
    }
  }
  CHECK_THROWS_WITH_AS(train::adamw<double>(ex, {.lr = -1}), doctest::Contains("options.lr"), semoe::error);
}

TEST_CASE("sgd with momentum follows the reference update") {
  cpu_executor ex({.threads = 1});
  tiny_model m{{1.0, 2.0}, {0.5, -0.5}};
  train::sgd<double> opt(ex, {.lr = 0.1, .momentum = 0.9});
  double v0 = 0, w0 = 1.0;
  for (int t = 0; t < 3; ++t) {
    opt.step(m);
    v0 = 0.9 * v0 + 0.5;
    w0 -= 0.1 * v0;
    CHECK(m.w[0] == doctest::Approx(w0).epsilon(1e-14));
  }
}

TEST_CASE("adamw updates expert blocks with their state kept in the store") {
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  moe_t moe(ex, comms[0], {.hidden = 4, .ffn = 3, .experts = 2, .gate = {.dropless = true}});
  auto blk = moe.store().acquire(moe.layer_id(), 1);
  std::vector<double> before(blk.params.begin(), blk.params.end());
  std::fill(blk.grads.begin(), blk.grads.end(), 0.25);
  train::adamw<double> opt(ex, {.lr = 0.01, .weight_decay = 0});
  opt.step(moe);
  blk = moe.store().acquire(moe.layer_id(), 1);
  REQUIRE(moe.store().state_slots() == 2);
  for (std::size_t i = 0; i < before.size(); ++i) {
    // First AdamW step: m-hat = g, v-hat = g^2, so the move is lr * g / (|g| + eps).
    CHECK(blk.params[i] == doctest::Approx(before[i] - 0.01 * 0.25 / (0.25 + 1e-8)).epsilon(1e-12));
    CHECK(blk.state[i] == doctest::Approx(0.1 * 0.25));                 // m
    CHECK(blk.state[before.size() + i] == doctest::Approx(0.001 * 0.0625));  // v
  }
}

TEST_CASE("clip_grad_norm scales dense and expert gradients to the global norm") {
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  moe_t moe(ex, comms[0], {.hidden = 2, .ffn = 2, .experts = 2, .gate = {.dropless = true}});
  moe.zero_grad();
  double sq = 0;
  auto dense = moe.parameters();  // range-for over a temporary's member would dangle
  for (auto& g : dense[0].grad) sq += 1.0, g = 1.0;
  train::for_each_expert_block(moe, [&](auto& blk, auto&) {
    for (auto& g : blk.grads) sq += 4.0, g = 2.0;
  });
  const double norm = train::clip_grad_norm(moe, comms[0], 1.0);
  CHECK(norm == doctest::Approx(std::sqrt(sq)));
  CHECK(train::grad_norm(moe, comms[0]) == doctest::Approx(1.0).epsilon(1e-5));
  CHECK(train::clip_grad_norm(moe, comms[0], 10.0) == doctest::Approx(1.0).epsilon(1e-5));  // under: unchanged
  CHECK(train::grad_norm(moe, comms[0]) == doctest::Approx(1.0).epsilon(1e-5));
  moe.parameters()[0].grad[0] = std::nan("");
  CHECK_THROWS_WITH_AS(train::clip_grad_norm(moe, comms[0], 1.0), doctest::Contains("NaN or Inf"), semoe::error);
}

TEST_CASE("over 2 and 4 ranks, reduced gradients, the global norm and one AdamW step equal one rank") {
  const index_t T = 32, H = 8, F = 12, E = 4;
  moe_t::options opt{.hidden = H, .ffn = F, .experts = E, .gate = {.capacity_factor = 1.0}, .seed = 2};
  matrix<double> x(T, H), dy(T, H);
  std::mt19937_64 g(5);
  std::uniform_real_distribution<double> d(-1, 1);
  for (auto& v : x.span()) v = d(g);
  for (auto& v : dy.span()) v = d(g);

  auto run = [&](int P, double& norm, std::vector<double>& router, std::vector<std::vector<double>>& experts) {
    experts.assign(E, {});
    std::mutex m;
    comm::local::run(P, [&](comm::local& c) {
      cpu_executor ex({.threads = 1});
      moe_t moe(ex, c, opt);
      const index_t n = T / P, t0 = c.rank() * n;
      matrix<double> y(n, H), dx(n, H);
      moe.forward(as_matrix<const double>(x.data() + t0 * H, n, H), y.view());
      moe.backward(as_matrix<const double>(dy.data() + t0 * H, n, H), dx.view());
      train::reduce_dense_grads(moe, c);
      const double nrm = train::clip_grad_norm(moe, c, 0.5);
      train::adamw<double> adam(ex, {.lr = 0.01});
      adam.step(moe);
      std::lock_guard lock(m);
      if (c.rank() == 0) {
        norm = nrm;
        router.assign(moe.parameters()[0].value.begin(), moe.parameters()[0].value.end());
      }
      for (index_t i = 0; i < moe.local_experts(); ++i) {
        auto blk = moe.store().acquire(moe.layer_id(), i);
        experts[moe.first_expert() + i].assign(blk.params.begin(), blk.params.end());
      }
    });
  };
  double n1 = 0;
  std::vector<double> r1;
  std::vector<std::vector<double>> e1;
  run(1, n1, r1, e1);
  for (int P : {2, 4}) {
    double nP = 0;
    std::vector<double> rP;
    std::vector<std::vector<double>> eP;
    run(P, nP, rP, eP);
    INFO("P = " << P);
    CHECK(nP == doctest::Approx(n1).epsilon(1e-12));
    for (std::size_t i = 0; i < r1.size(); ++i) CHECK(rP[i] == doctest::Approx(r1[i]).epsilon(1e-12));
    for (index_t e = 0; e < E; ++e)
      for (std::size_t i = 0; i < e1[e].size(); ++i) CHECK(eP[e][i] == doctest::Approx(e1[e][i]).epsilon(1e-12));
  }
}

TEST_CASE("cosine schedule: warm-up, peak, floor") {
  CHECK(train::cosine_lr(0, 100, 1.0, 10) == doctest::Approx(0.1));
  CHECK(train::cosine_lr(9, 100, 1.0, 10) == doctest::Approx(1.0));
  CHECK(train::cosine_lr(10, 100, 1.0, 10) == doctest::Approx(1.0));
  CHECK(train::cosine_lr(55, 100, 1.0, 10) == doctest::Approx(0.5));
  CHECK(train::cosine_lr(100, 100, 1.0, 10, 0.1) == doctest::Approx(0.1));
}

TEST_CASE("sharded parameters are not all-reduced and their norms are summed over the ranks") {
  comm::local::run(2, [](comm::local& c) {
    struct model {
      std::vector<double> rw{1, 2}, rg{0.5, 1.5}, sw{3}, sg{0};
      param_list<double> parameters() {
        return {{"replicated", rw, rg, param_kind::dense},
                {"shard", sw, sg, param_kind::dense, param_scope::sharded}};
      }
    } m;
    m.sg[0] = c.rank() == 0 ? 3.0 : 4.0;  // this rank's complete shard gradient
    train::reduce_dense_grads(m, c);
    CHECK(m.rg[0] == 1.0);  // summed over 2 ranks
    CHECK(m.rg[1] == 3.0);
    CHECK(m.sg[0] == (c.rank() == 0 ? 3.0 : 4.0));  // untouched
    CHECK(train::grad_norm(m, c) == doctest::Approx(std::sqrt(1.0 + 9.0 + 9.0 + 16.0)));
  });
}
