// The MoE layer: a dense reference, finite differences in double, and the
// same outputs and gradients over 1, 2 and 4 expert-parallel ranks.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <random>
#include <vector>

#include "semoe/gate/expert_choice.hpp"
#include "semoe/gate/gshard.hpp"
#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "gradcheck.hpp"

using namespace semoe;

namespace {

template <class T>
void fill(std::span<T> v, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> d(-scale, scale);
  for (auto& x : v) x = static_cast<T>(d(g));
}

double rel(double a, double b) { return std::abs(a - b) / std::max({1e-3, std::abs(a), std::abs(b)}); }

template <class Layer>
std::vector<typename Layer::value_type> expert_params(Layer& l, index_t i) {
  auto b = l.store().acquire(l.layer_id(), i);
  return {b.params.begin(), b.params.end()};
}

}  // namespace

TEST_CASE("moe_layer forward equals a dense reference (top-2, dropless, gelu, bias)") {
  using gate_t = gate::top_k<2>;
  using layer_t = basic_moe_layer<double, cpu, gate_t, expert::ffn<act::gelu>>;
  const index_t T = 9, H = 6, F = 7, E = 4;
  cpu_executor ex({.threads = 2});
  auto comms = comm::local::make_world(1);
  layer_t moe(ex, comms[0], {.hidden = H, .ffn = F, .experts = E, .gate = {.dropless = true}, .expert = {.bias = true},
                             .seed = 3});
  matrix<double> x(T, H), y(T, H);
  fill(x.span(), 1);
  moe.forward(x.view(), y.view());

  // Reference: logits, softmax, top-2 renormalized, FFN per chosen expert, all with loops.
  auto w = moe.parameters()[0].value;
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> logit(E, 0.0), p(E);
    for (index_t e = 0; e < E; ++e)
      for (index_t h = 0; h < H; ++h) logit[e] += x(t, h) * w[h * E + e];
    double mx = *std::max_element(logit.begin(), logit.end()), s = 0;
    for (index_t e = 0; e < E; ++e) s += p[e] = std::exp(logit[e] - mx);
    for (auto& v : p) v /= s;
    std::vector<index_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return p[a] > p[b]; });
    const double norm = p[order[0]] + p[order[1]];
    std::vector<double> ref(H, 0.0);
    for (int c = 0; c < 2; ++c) {
      const index_t e = order[c];
      const auto P = expert_params(moe, e);
      const double* W1 = P.data();
      const double* W2 = W1 + H * F;
      const double* b1 = W2 + F * H;
      const double* b2 = b1 + F;
      for (index_t o = 0; o < H; ++o) {
        double acc = b2[o];
        for (index_t f = 0; f < F; ++f) {
          double pre = b1[f];
          for (index_t h = 0; h < H; ++h) pre += x(t, h) * W1[h * F + f];
          const double a = 0.5 * pre * (1 + std::tanh(std::sqrt(2 / M_PI) * (pre + 0.044715 * pre * pre * pre)));
          acc += a * W2[f * H + o];
        }
        ref[o] += p[e] / norm * acc;
      }
    }
    for (index_t o = 0; o < H; ++o) CHECK(y(t, o) == doctest::Approx(ref[o]).epsilon(1e-12));
  }
}

// Finite differences of L = <r, y> + aux_loss w.r.t. x, the router and every expert parameter.
template <class Gate, class Act>
void check_layer_gradients(typename Gate::options gopt, bool bias) {
  using layer_t = basic_moe_layer<double, cpu, Gate, expert::ffn<Act>>;
  const index_t T = 8, H = 5, F = 6, E = 4;
  cpu_executor ex({.threads = 2});
  auto comms = comm::local::make_world(1);
  layer_t moe(ex, comms[0], {.hidden = H, .ffn = F, .experts = E, .gate = gopt, .expert = {.bias = bias}, .seed = 11});
  matrix<double> x(T, H), y(T, H), r(T, H), dx(T, H);
  fill(x.span(), 2);
  fill(r.span(), 3);
  auto loss = [&] {
    moe.forward(x.view(), y.view());
    double l = moe.aux_loss();
    for (index_t i = 0; i < T * H; ++i) l += r.data()[i] * y.data()[i];
    return l;
  };
  loss();
  moe.zero_grad();
  moe.backward(r.view(), dx.view());
  auto fd = [&](double& v) { return test::central_difference(v, loss); };
  double worst = 0;
  for (index_t i = 0; i < T * H; ++i) worst = std::max(worst, rel(fd(x.data()[i]), dx.data()[i]));
  auto router = moe.parameters()[0];
  std::vector<double> rg(router.grad.begin(), router.grad.end());
  for (std::size_t i = 0; i < router.value.size(); ++i) worst = std::max(worst, rel(fd(router.value[i]), rg[i]));
  for (index_t e = 0; e < E; ++e) {
    auto blk = moe.store().acquire(moe.layer_id(), e);
    std::vector<double> g(blk.grads.begin(), blk.grads.end());
    for (std::size_t i = 0; i < blk.params.size(); ++i) worst = std::max(worst, rel(fd(blk.params[i]), g[i]));
  }
  CHECK(worst < 1e-6);
}

TEST_CASE("moe_layer gradients match finite differences (double)") {
  SUBCASE("top-2, capacity drops, aux + z loss, gelu") {
    check_layer_gradients<gate::top_k<2>, act::gelu>({.capacity_factor = 0.75, .aux_loss_coef = 0.1, .z_loss_coef = 0.01},
                                                     false);
  }
  SUBCASE("top-1 switch with jitter, relu, bias") {
    check_layer_gradients<gate::switch_gate, act::relu>({.capacity_factor = 1.0, .aux_loss_coef = 0.1}, true);
  }
  SUBCASE("gshard, swiglu") { check_layer_gradients<gate::gshard, act::swiglu>({.dropless = true}, false); }
  SUBCASE("expert choice, gelu") { check_layer_gradients<gate::expert_choice, act::gelu>({.capacity_factor = 1.0}, true); }
}

// P ranks, tokens split evenly, experts split evenly: outputs, the summed router
// gradient and every expert's gradient equal the single-rank layer's.
template <class Gate>
void check_ranks(typename Gate::options gopt, int P) {
  using layer_t = moe_layer<cpu, Gate, expert::ffn<act::gelu>>;
  const index_t T = 48, H = 16, F = 24, E = 8;
  typename layer_t::options opt{.hidden = H, .ffn = F, .experts = E, .gate = gopt, .seed = 5};
  matrix<float> x(T, H), dy(T, H);
  fill(x.span(), 7);
  fill(dy.span(), 8);

  matrix<float> y1(T, H), dx1(T, H);
  std::vector<float> router1;
  std::vector<std::vector<float>> grads1(E);
  comm::local::run(1, [&](comm::local& c) {
    cpu_executor ex({.threads = 1});
    layer_t moe(ex, c, opt);
    moe.forward(x.view(), y1.view());
    moe.backward(dy.view(), dx1.view());
    auto p = moe.parameters()[0].grad;
    router1.assign(p.begin(), p.end());
    for (index_t e = 0; e < E; ++e) {
      auto b = moe.store().acquire(moe.layer_id(), e);
      grads1[e].assign(b.grads.begin(), b.grads.end());
    }
  });

  matrix<float> yP(T, H), dxP(T, H);
  std::vector<float> routerP(router1.size(), 0.0f);
  std::vector<std::vector<float>> gradsP(E);
  std::mutex m;
  comm::local::run(P, [&](comm::local& c) {
    cpu_executor ex({.threads = 1});
    layer_t moe(ex, c, opt);
    const index_t n = T / P, t0 = c.rank() * n;
    auto xs = as_matrix<const float>(x.data() + t0 * H, n, H);
    auto dys = as_matrix<const float>(dy.data() + t0 * H, n, H);
    moe.forward(xs, as_matrix(yP.data() + t0 * H, n, H));
    moe.backward(dys, as_matrix(dxP.data() + t0 * H, n, H));
    auto g = moe.parameters()[0].grad;
    comm::all_reduce(c, g);
    std::lock_guard lock(m);
    if (c.rank() == 0) routerP.assign(g.begin(), g.end());
    for (index_t i = 0; i < moe.local_experts(); ++i) {
      auto b = moe.store().acquire(moe.layer_id(), i);
      gradsP[moe.first_expert() + i].assign(b.grads.begin(), b.grads.end());
    }
  });

  double worst = 0;
  for (index_t i = 0; i < T * H; ++i) {
    worst = std::max(worst, rel(y1.data()[i], yP.data()[i]));
    worst = std::max(worst, rel(dx1.data()[i], dxP.data()[i]));
  }
  for (std::size_t i = 0; i < router1.size(); ++i) worst = std::max(worst, rel(router1[i], routerP[i]));
  for (index_t e = 0; e < E; ++e) {
    REQUIRE(gradsP[e].size() == grads1[e].size());
    for (std::size_t i = 0; i < grads1[e].size(); ++i) worst = std::max(worst, rel(grads1[e][i], gradsP[e][i]));
  }
  INFO("P = " << P);
  CHECK(worst < 1e-5);
}

TEST_CASE_TEMPLATE("moe_layer over 1, 2 and 4 ranks equals one rank", Gate, gate::top_k<2>, gate::switch_gate,
                   gate::gshard, gate::expert_choice) {
  typename Gate::options o{};
  o.capacity_factor = 1.0;  // tight: drops happen, and must be the same drops
  if constexpr (!std::is_same_v<Gate, gate::expert_choice>) o.aux_loss_coef = 0.05;  // EC is balanced by design
  for (int P : {2, 4}) check_ranks<Gate>(o, P);
}

TEST_CASE("uneven batches over 2 ranks, one of them empty, equal one rank") {
  using layer_t = moe_layer<cpu, gate::top_k<2>>;
  const index_t T = 24, H = 8, E = 4;
  layer_t::options opt{.hidden = H, .ffn = 12, .experts = E, .gate = {.capacity_factor = 1.0}, .seed = 4};
  matrix<float> x(T, H), dy(T, H), y1(T, H), dx1(T, H);
  fill(x.span(), 1);
  fill(dy.span(), 2);
  comm::local::run(1, [&](comm::local& c) {
    cpu_executor ex({.threads = 1});
    layer_t moe(ex, c, opt);
    moe.forward(x.view(), y1.view());
    moe.backward(dy.view(), dx1.view());
  });
  for (index_t split : {index_t{0}, index_t{5}, T}) {  // rank 0 takes `split` tokens, rank 1 the rest
    matrix<float> y2(T, H), dx2(T, H);
    comm::local::run(2, [&](comm::local& c) {
      cpu_executor ex({.threads = 1});
      layer_t moe(ex, c, opt);
      const index_t t0 = c.rank() == 0 ? 0 : split, n = c.rank() == 0 ? split : T - split;
      moe.forward(as_matrix<const float>(x.data() + t0 * H, n, H), as_matrix(y2.data() + t0 * H, n, H));
      moe.backward(as_matrix<const float>(dy.data() + t0 * H, n, H), as_matrix(dx2.data() + t0 * H, n, H));
    });
    double worst = 0;
    for (index_t i = 0; i < T * H; ++i)
      worst = std::max({worst, rel(y1.data()[i], y2.data()[i]), rel(dx1.data()[i], dx2.data()[i])});
    INFO("rank 0 holds " << split << " of " << T << " tokens");
    CHECK(worst < 1e-5);
  }
  CHECK_THROWS_WITH_AS(comm::local::run(2,
                                        [&](comm::local& c) {
                                          cpu_executor ex({.threads = 1});
                                          layer_t moe(ex, c, opt);
                                          matrix<float> none(0, H);
                                          moe.forward(none.view(), none.view());
                                        }),
                       doctest::Contains("0 tokens on every one of the 2 ranks"), semoe::error);
}

TEST_CASE("moe_layer rejects bad input with a message naming it") {
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  using layer_t = moe_layer<cpu, gate::top_k<2>>;
  auto msg = [](auto&& f) {
    try {
      f();
    } catch (const semoe::error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(msg([&] { layer_t(ex, comms[0], {.hidden = 4, .ffn = 4, .experts = 1}); }).find("exceeds experts") !=
        std::string::npos);
  CHECK(msg([&] { layer_t(ex, comms[0], {.hidden = 0, .ffn = 4, .experts = 4}); }).find("options.hidden") !=
        std::string::npos);
  CHECK(msg([&] {
          layer_t(ex, comms[0], {.hidden = 4, .ffn = 4, .experts = 4, .gate = {.capacity_factor = 0}});
        }).find("capacity_factor") != std::string::npos);
  layer_t moe(ex, comms[0], {.hidden = 4, .ffn = 4, .experts = 4});
  matrix<float> x(3, 4), y(3, 4), bad(3, 5), empty(0, 4);
  x.fill(0.5f);
  CHECK(msg([&] { moe.forward(bad.view(), y.view()); }).find("expected shape [3, 4]") != std::string::npos);
  CHECK(msg([&] { moe.forward(empty.view(), empty.view()); }).find("empty batch") != std::string::npos);
  x(1, 2) = std::nanf("");
  CHECK(msg([&] { moe.forward(x.view(), y.view()); }).find("NaN or Inf") != std::string::npos);
}

TEST_CASE("a traced step records every stage of the layer as Chrome trace events") {
  auto& rec = trace::recorder::instance();
  rec.start("unused.json");
  comm::local::run(2, [](comm::local& c) {
    cpu_executor ex({.threads = 1});
    moe_layer<cpu, gate::top_k<2>> moe(ex, c, {.hidden = 8, .ffn = 8, .experts = 4});
    matrix<float> x(6, 8), y(6, 8), dx(6, 8);
    x.fill(0.1f);
    moe.forward(x.view(), y.view());
    moe.backward(y.view(), dx.view());
  });
  rec.stop();
  std::map<std::string, int> per_name;
  std::set<int> pids;
  for (const auto& e : rec.events()) {
    ++per_name[e.name];
    pids.insert(e.pid);
    CHECK(e.duration_us >= 0);
  }
  for (const char* stage : {"router", "gate", "permute", "all_to_all", "experts_forward", "combine",
                            "combine_backward", "experts_backward", "unpermute", "gate_backward", "router_backward"})
    CHECK_MESSAGE(per_name[stage] >= 2, stage);  // on both ranks
  CHECK(per_name["all_to_all"] == 8);              // 2 ranks x (2 forward + 2 backward)
  CHECK(pids == std::set<int>{0, 1});              // one trace row (pid) per rank
  const auto j = rec.to_json();
  std::size_t complete = 0;  // the others are lane names ("M" metadata)
  for (const auto& e : j["traceEvents"]) complete += e["ph"] == "X";
  CHECK(complete == rec.events().size());
  CHECK(j["traceEvents"][0]["ph"] == "X");
}

TEST_CASE("eval mode is forward-only: same outputs, one expert's activations, backward refused") {
  using layer_t = basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>>;
  const index_t T = 96, H = 16, F = 24, E = 8;
  cpu_executor ex({.threads = 2});
  auto comms = comm::local::make_world(1);
  // Dropless: eval routing equals training routing, so the outputs must too.
  layer_t moe(ex, comms[0], {.hidden = H, .ffn = F, .experts = E, .gate = {.dropless = true}, .seed = 5});
  matrix<float> x(T, H), y_train(T, H), y_eval(T, H), dx(T, H);
  fill(x.span(), 8);
  moe.forward(x.view(), y_train.view());
  const std::size_t train_bytes = moe.activation_bytes();
  const index_t R = moe.plan().kept();
  CHECK(train_bytes == sizeof(float) * static_cast<std::size_t>(R * 2 * F));

  moe.train(false);
  moe.forward(x.view(), y_eval.view());
  CHECK(std::memcmp(y_train.data(), y_eval.data(), sizeof(float) * T * H) == 0);
  index_t widest = 0;
  for (index_t e = 0; e < E; ++e) widest = std::max(widest, moe.plan().offsets[e + 1] - moe.plan().offsets[e]);
  CHECK(widest < R);
  CHECK(moe.activation_bytes() == sizeof(float) * static_cast<std::size_t>(widest * 2 * F));
  INFO("activation bytes: training ", train_bytes, ", eval ", moe.activation_bytes());
  CHECK(moe.activation_bytes() * 2 < train_bytes);
  CHECK_THROWS_WITH_AS(moe.backward(y_eval.view(), dx.view()), doctest::Contains("eval mode"), semoe::error);

  moe.train(true);  // and back: training keeps what backward needs again
  moe.forward(x.view(), y_train.view());
  CHECK(moe.activation_bytes() == train_bytes);
  moe.zero_grad();
  CHECK_NOTHROW(moe.backward(y_train.view(), dx.view()));
}
