// A user-written expert policy: a bias-free linear map y = x W. It satisfies
// Expert, the layer runs it (outputs equal the reference built from its
// weights), and its gradient flows back through the layer.
#include <doctest/doctest.h>

#include <random>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"

using namespace semoe;

namespace {

int g_forward_calls = 0;

struct linear_expert {
  using policy_kind = expert::expert_tag;
  struct options {
    index_t hidden = 0, ffn = 0;  // ffn unused: filled in by the layer, as for every expert
  };
  linear_expert() = default;
  explicit linear_expert(options o) : h(o.hidden) {}
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
    ++g_forward_calls;
    for (index_t e = 0; e < b.experts(); ++e)
      if (b.rows(e))
        blas::gemm(blas::op::n, blas::op::n, b.rows(e), h, h, T(1), b.x.row(b.offsets[e]), b.x.ld(), b.params[e], h,
                   T(0), y.row(b.offsets[e]), y.ld());
  }
  template <class T>
  void backward(cpu_executor&, const expert::expert_batch<T>& b, matrix_view<const T> dy, matrix_view<T> dx) const {
    // dW += x^T dy must come first: dx may share dy's memory.
    for (index_t e = 0; e < b.experts(); ++e) {
      if (!b.rows(e)) continue;
      const index_t r0 = b.offsets[e];
      blas::gemm(blas::op::t, blas::op::n, h, h, b.rows(e), T(1), b.x.row(r0), b.x.ld(), dy.row(r0), dy.ld(), T(1),
                 b.grads[e], h);
    }
    matrix<T> tmp(dy.rows(), h);
    for (index_t e = 0; e < b.experts(); ++e) {
      if (!b.rows(e)) continue;
      const index_t r0 = b.offsets[e];
      blas::gemm(blas::op::n, blas::op::t, b.rows(e), h, h, T(1), dy.row(r0), dy.ld(), b.params[e], h, T(0),
                 tmp.data() + r0 * h, h);
    }
    for (index_t r = 0; r < dy.rows(); ++r)
      for (index_t j = 0; j < h; ++j) dx(r, j) = tmp(r, j);
  }
  index_t h = 0;
};

}  // namespace

static_assert(expert::Expert<linear_expert>);
static_assert(!expert::Expert<gate::top_k<2>>);

TEST_CASE("a custom expert policy is the one the layer runs") {
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  basic_moe_layer<double, cpu, gate::top_k<1>, linear_expert> moe(
      ex, comms[0], {.hidden = 3, .ffn = 1, .experts = 2, .gate = {.dropless = true}});
  matrix<double> x(4, 3), y(4, 3), dx(4, 3);
  std::mt19937 g(3);
  for (auto& v : x.span()) v = std::uniform_real_distribution<double>(-1, 1)(g);
  g_forward_calls = 0;
  moe.forward(x.view(), y.view());
  CHECK(g_forward_calls == 1);  // one grouped call for all local experts
  const auto& plan = moe.plan();
  for (index_t t = 0; t < 4; ++t) {
    const index_t e = plan.expert[t];
    auto w = moe.store().acquire(moe.layer_id(), e).params;
    for (index_t j = 0; j < 3; ++j) {
      double ref = 0;
      for (index_t i = 0; i < 3; ++i) ref += x(t, i) * w[i * 3 + j];
      CHECK(y(t, j) == doctest::Approx(plan.weight[t] * ref).epsilon(1e-12));
    }
  }
  moe.backward(y.view(), dx.view());
  double gsum = 0;
  for (index_t e = 0; e < 2; ++e)
    for (auto v : moe.store().acquire(moe.layer_id(), e).grads) gsum += std::abs(v);
  CHECK(gsum > 0);
}
