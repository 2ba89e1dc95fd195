// The dy and dx an MoE layer hands its experts' backward: distinct memory for
// an expert that does not opt in to in-place backward, so one that writes dx
// before its last read of dy still gets exact gradients; the same memory for
// one that opts in (ffn). Gradients are checked against finite differences.
#include <doctest/doctest.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "gradcheck.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/storage/tiered_store.hpp"

using namespace semoe;

namespace {

std::atomic<int> g_calls = 0, g_shared = 0;  // backward calls, and those whose dx was dy's memory

/// y = x W per expert. Backward writes each dx row first and reads dy again
/// afterwards for dW: right only when dx and dy are distinct memory. With
/// InPlace it claims otherwise, which is what the layer must not assume.
template <bool InPlace>
struct dx_first_expert {
  using policy_kind = expert::expert_tag;
  static constexpr bool backward_in_place = InPlace;
  struct options {
    index_t hidden = 0, ffn = 0;
  };
  dx_first_expert() = default;
  explicit dx_first_expert(options o) : h(o.hidden) {}
  static index_t block_elems(const options& o) { return o.hidden * o.hidden; }
  index_t block_elems() const { return h * h; }
  index_t saved_cols() const { return 0; }
  index_t work_cols() const { return 0; }
  template <class T>
  void init(std::span<T> w, philox rng, index_t e) const {
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = T(rng.uniform((static_cast<std::uint64_t>(e) << 32) + i)) - T(0.5);
  }
  template <class T>
  void forward(cpu_executor&, const expert::expert_batch<T>& b, matrix_view<T> y) const {
    for (index_t e = 0; e < b.experts(); ++e)
      for (index_t r = b.offsets[e]; r < b.offsets[e + 1]; ++r)
        for (index_t j = 0; j < h; ++j) {
          T s = 0;
          for (index_t i = 0; i < h; ++i) s += b.x(r, i) * b.params[e][i * h + j];
          y(r, j) = s;
        }
  }
  template <class T>
  void backward(cpu_executor&, const expert::expert_batch<T>& b, matrix_view<const T> dy, matrix_view<T> dx) const {
    ++g_calls;
    if (dy.data() == dx.data()) ++g_shared;
    std::vector<T> row(static_cast<std::size_t>(h));
    for (index_t e = 0; e < b.experts(); ++e) {
      const T* w = b.params[e];
      for (index_t r = b.offsets[e]; r < b.offsets[e + 1]; ++r) {  // dx = dy W^T, row by row
        for (index_t i = 0; i < h; ++i) {
          T s = 0;
          for (index_t j = 0; j < h; ++j) s += dy(r, j) * w[i * h + j];
          row[i] = s;
        }
        for (index_t i = 0; i < h; ++i) dx(r, i) = row[i];
      }
      for (index_t r = b.offsets[e]; r < b.offsets[e + 1]; ++r)  // dW += x^T dy: dy read after dx was written
        for (index_t i = 0; i < h; ++i)
          for (index_t j = 0; j < h; ++j) b.grads[e][i * h + j] += b.x(r, i) * dy(r, j);
    }
  }
  index_t h = 0;
};

static_assert(expert::Expert<dx_first_expert<false>, cpu_executor, double>);
static_assert(!expert::backward_in_place_v<dx_first_expert<false>> && expert::backward_in_place_v<dx_first_expert<true>>);
static_assert(expert::backward_in_place_v<expert::ffn<act::gelu>>);

/// Largest relative error of the layer's dx and expert gradients against
/// central differences of L = <r, y> + aux.
template <class Layer>
double worst_gradient_error(Layer& moe, index_t tokens, index_t H) {
  matrix<double> x(tokens, H), y(tokens, H), r(tokens, H), dx(tokens, H);
  test::fill_uniform(x.span(), 5);
  test::fill_uniform(r.span(), 6);
  auto loss = [&] {
    moe.forward(x.view(), y.view());
    double l = moe.aux_loss();
    for (index_t i = 0; i < tokens * H; ++i) l += r.data()[i] * y.data()[i];
    return l;
  };
  loss();
  moe.zero_grad();
  moe.backward(r.view(), dx.view());
  double worst = 0;
  for (index_t i = 0; i < tokens * H; ++i)
    worst = std::max(worst, test::rel_err(test::central_difference(x.data()[i], loss), dx.data()[i]));
  for (index_t e = 0; e < moe.local_experts(); ++e) {
    auto blk = moe.store().acquire(moe.layer_id(), e);
    const std::vector<double> g(blk.grads.begin(), blk.grads.end());
    for (std::size_t i = 0; i < blk.params.size(); ++i)
      worst = std::max(worst, test::rel_err(test::central_difference(blk.params[i], loss), g[i]));
    moe.store().release(moe.layer_id(), e);
  }
  return worst;
}

template <class Expert, class Storage = storage::resident>
using layer_t = basic_moe_layer<double, cpu, gate::top_k<2>, Expert, comm::local, Storage>;

}  // namespace

TEST_CASE("an expert that writes dx before its last read of dy gets exact gradients") {
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  SUBCASE("all experts in one grouped call") {
    layer_t<dx_first_expert<false>> moe(ex, comms[0], {.hidden = 4, .ffn = 1, .experts = 3, .gate = {.dropless = true}});
    g_calls = g_shared = 0;
    CHECK(worst_gradient_error(moe, 6, 4) < 1e-6);
    CHECK(g_calls.load() > 0);
    CHECK(g_shared.load() == 0);  // dx never in dy's memory
  }
  SUBCASE("one expert at a time (a store that streams blocks)") {
    layer_t<dx_first_expert<false>, storage::tiered<storage::device_tier, storage::host_tier>> moe(
        ex, comms[0], {.hidden = 4, .ffn = 1, .experts = 3, .gate = {.dropless = true}});
    g_calls = g_shared = 0;
    CHECK(worst_gradient_error(moe, 6, 4) < 1e-6);
    CHECK(g_calls.load() > 0);
    CHECK(g_shared.load() == 0);
  }
}

TEST_CASE("an expert that opts in to in-place backward gets dx in dy's memory") {
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  layer_t<dx_first_expert<true>> moe(ex, comms[0], {.hidden = 4, .ffn = 1, .experts = 3, .gate = {.dropless = true}});
  matrix<double> x(6, 4), y(6, 4), dx(6, 4);
  test::fill_uniform(x.span(), 5);
  moe.forward(x.view(), y.view());
  g_calls = g_shared = 0;
  moe.backward(y.view(), dx.view());
  CHECK(g_calls.load() == 1);
  CHECK(g_shared.load() == 1);  // the layer trusts the flag: no copy of dy
}

TEST_CASE("over 2 ranks the experts' backward gets distinct dy and dx, and the gradients equal one rank's") {
  using moe_t = layer_t<dx_first_expert<false>>;
  const index_t T = 8, H = 4, E = 4;
  const moe_t::options opt{.hidden = H, .ffn = 1, .experts = E, .gate = {.dropless = true}, .seed = 3};
  matrix<double> x(T, H), dy(T, H), dx1(T, H), dx2(T, H);
  test::fill_uniform(x.span(), 7);
  test::fill_uniform(dy.span(), 8);
  std::vector<std::vector<double>> g1(E), g2(E);
  auto run = [&](int P, matrix<double>& dx, std::vector<std::vector<double>>& grads) {
    comm::local::run(P, [&](comm::local& c) {
      cpu_executor ex({.threads = 1});
      moe_t moe(ex, c, opt);
      const index_t n = T / P, t0 = c.rank() * n;
      matrix<double> y(n, H);
      moe.forward(as_matrix<const double>(x.data() + t0 * H, n, H), y.view());
      moe.backward(as_matrix<const double>(dy.data() + t0 * H, n, H), as_matrix(dx.data() + t0 * H, n, H));
      for (index_t i = 0; i < moe.local_experts(); ++i) {
        auto b = moe.store().acquire(moe.layer_id(), i);
        grads[moe.first_expert() + i].assign(b.grads.begin(), b.grads.end());
      }
    });
  };
  run(1, dx1, g1);
  g_shared = 0;
  run(2, dx2, g2);
  CHECK(g_shared.load() == 0);
  double worst = test::max_rel_err(dx1.span(), dx2.span());
  for (index_t e = 0; e < E; ++e) worst = std::max(worst, test::max_rel_err(std::span(g1[e]), std::span(g2[e])));
  CHECK(worst < 1e-12);
}
