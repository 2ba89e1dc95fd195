// layer::with_shared_experts: y = moe(x) + s(x) * shared(x) against the MoE
// layer alone plus a plain loop over the shared SwiGLU expert and its
// sigmoid gate; every gradient against central differences; trainers and
// checkpoints find the MoE layer inside.
#include "semoe/layer/shared_experts.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "gradcheck.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/train/optimizer.hpp"

using namespace semoe;
using test::central_difference;
using test::fill_uniform;
using test::max_rel_err;

namespace {

using moe_t = basic_moe_layer<double, cpu, gate::top_k<2>, expert::ffn<act::swiglu>>;
using shared_t = layer::with_shared_experts<moe_t>;
constexpr index_t n = 7, H = 5, F = 4, E = 4, S = 6;

moe_t::options moe_options() {
  return {
      .hidden = H, .ffn = F, .experts = E, .gate = {.dropless = true, .aux_loss_coef = 0, .z_loss_coef = 0}, .seed = 5};
}

/// The shared SwiGLU expert and its gate, as loops over the block's layout
/// (W1 [H, 2S] with columns [gate | up], then W2 [S, H]).
std::vector<double> reference_shared(const std::vector<double>& x, std::span<const double> block,
                                     std::span<const double> gate) {
  std::vector<double> y(static_cast<std::size_t>(n * H), 0.0);
  const double* w1 = block.data();
  const double* w2 = w1 + H * 2 * S;
  for (index_t t = 0; t < n; ++t) {
    std::vector<double> h(S);
    for (index_t j = 0; j < S; ++j) {
      double g = 0, u = 0;
      for (index_t i = 0; i < H; ++i) {
        g += x[t * H + i] * w1[i * 2 * S + j];
        u += x[t * H + i] * w1[i * 2 * S + S + j];
      }
      h[j] = g / (1 + std::exp(-g)) * u;
    }
    double s = 1;
    if (!gate.empty()) {
      double l = 0;
      for (index_t i = 0; i < H; ++i) l += x[t * H + i] * gate[i];
      s = 1 / (1 + std::exp(-l));
    }
    for (index_t o = 0; o < H; ++o) {
      double acc = 0;
      for (index_t j = 0; j < S; ++j) acc += h[j] * w2[j * H + o];
      y[t * H + o] = s * acc;
    }
  }
  return y;
}

}  // namespace

TEST_CASE("with_shared_experts adds the (gated) shared expert to the routed output") {
  for (bool gated : {false, true}) {
    CAPTURE(gated);
    cpu_executor ex({.threads = 2});
    auto comms = comm::local::make_world(1);
    shared_t m(ex, comms[0], {.moe = moe_options(), .shared_ffn = S, .gated = gated});
    moe_t alone(ex, comms[0], moe_options());
    CHECK(static_cast<index_t>(m.shared_block().size()) ==
          expert::ffn<act::swiglu>::block_elems({.hidden = H, .ffn = S}));
    CHECK(m.shared_gate().size() == (gated ? std::size_t{H} : 0));
    matrix<double> x(n, H), y(n, H), y0(n, H);
    fill_uniform(x.span(), 1);
    m.forward(x.view(), y.view());
    alone.forward(x.view(), y0.view());
    const std::vector<double> xs(x.span().begin(), x.span().end());
    const auto ref = reference_shared(xs, m.shared_block(), m.shared_gate());
    for (index_t k = 0; k < n * H; ++k) CHECK(y.span()[k] == doctest::Approx(y0.span()[k] + ref[k]).epsilon(1e-12));
  }
}

TEST_CASE("with_shared_experts' gradients match central differences") {
  for (bool gated : {false, true}) {
    CAPTURE(gated);
    cpu_executor ex({.threads = 2});
    auto comms = comm::local::make_world(1);
    shared_t m(ex, comms[0], {.moe = moe_options(), .shared_ffn = S, .gated = gated});
    matrix<double> x(n, H), y(n, H), r(n, H), dx(n, H);
    fill_uniform(x.span(), 2);
    fill_uniform(r.span(), 3);
    const auto loss = [&] {
      m.forward(x.view(), y.view());
      double l = 0;
      for (index_t k = 0; k < n * H; ++k) l += r.span()[k] * y.span()[k];
      return l;
    };
    loss();
    m.zero_grad();
    m.backward(r.view(), dx.view());
    std::vector<double> fd(static_cast<std::size_t>(n * H));
    for (index_t k = 0; k < n * H; ++k) fd[k] = central_difference(x.span()[k], loss);
    CHECK(max_rel_err(dx.span(), std::span<double>(fd)) < 1e-6);
    auto params = m.parameters();
    CHECK(params.size() == (gated ? 3u : 2u));
    for (auto& p : params) {
      INFO("parameter " << p.name);
      std::vector<double> g(p.grad.begin(), p.grad.end()), fdp(p.value.size());
      for (std::size_t k = 0; k < p.value.size(); ++k) fdp[k] = central_difference(p.value[k], loss);
      CHECK(max_rel_err(std::span<double>(g), std::span<double>(fdp)) < 1e-6);
    }
  }
}

TEST_CASE("with_shared_experts shows its MoE layer to trainers and refuses a zero width") {
  cpu_executor ex({.threads = 1});
  auto comms = comm::local::make_world(1);
  shared_t m(ex, comms[0], {.moe = moe_options(), .shared_ffn = S});
  int found = 0;
  train::for_each_moe_layer(m, [&](auto& l) {
    ++found;
    CHECK(&l == &m.moe());
  });
  CHECK(found == 1);
  CHECK_THROWS_WITH_AS(shared_t(ex, comms[0], {.moe = moe_options(), .shared_ffn = 0}),
                       doctest::Contains("options.shared_ffn = 0"), semoe::error);
  matrix<double> dy(n, H), dx(n, H);
  CHECK_THROWS_WITH_AS(m.backward(dy.view(), dx.view()), doctest::Contains("called before forward"), semoe::error);
  static_assert(layer::Module<shared_t>);
}
