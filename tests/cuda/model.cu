// A whole model on the cuda backend against the same model on the cpu
// backend: linear, gelu, a residual pre-norm MoE block, layer norm, linear,
// dropout, softmax cross-entropy; forward, backward, gradient clipping and
// AdamW steps through the trainer. Logits, losses and every parameter within
// 1e-5 of the tensor's scale after each step. GPU only (skipped without one).
#include <vector>

#include "compare.hpp"
#include "gpu_main.cuh"
#include "semoe/cuda/backend.cuh"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/activation.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/train/trainer.hpp"

using namespace semoe;
using test::random_vec;
using test::scaled_error;

namespace {

template <class B>
using model_t =
    layer::sequential<float, layer::linear<float, B>, layer::activation<float, act::gelu, B>,
                      layer::dropout<float, B>,
                      layer::residual<float, layer::layer_norm<float, B>, moe_layer<B, gate::top_k<2>>>,
                      layer::layer_norm<float, B>, layer::linear<float, B>>;

constexpr index_t In = 96, H = 64, C = 10, E = 4, N = 256;

template <class B>
model_t<B> make(typename B::executor& ex, comm::local& c) {
  using norm = layer::layer_norm<float, B>;
  using moe = moe_layer<B, gate::top_k<2>>;
  return model_t<B>(layer::linear<float, B>(ex, {.in = In, .out = H}, 1), layer::activation<float, act::gelu, B>(ex),
                    layer::dropout<float, B>(ex, {.p = 0.1}, 5),
                    layer::residual<float, norm, moe>(
                        ex, norm(ex, {.dim = H}),
                        moe(ex, c, {.hidden = H, .ffn = 128, .experts = E, .gate = {.capacity_factor = 1.25},
                                    .expert = {.bias = true}, .seed = 3})),
                    norm(ex, {.dim = H}), layer::linear<float, B>(ex, {.in = H, .out = C}, 2));
}

std::vector<float> host_copy(cuda_executor& ex, std::span<const float> d) {
  std::vector<float> h(d.size());
  ex.copy(h.data(), d.data(), d.size_bytes());
  return h;
}

}  // namespace

TEST_CASE("a model trained 5 steps on cuda equals the same model on cpu") {
  cpu_executor cex({.threads = 2});
  cuda_executor gex;
  auto w1 = comm::local::make_world(1), w2 = comm::local::make_world(1);
  auto g1 = train::make_groups(w1[0]), g2 = train::make_groups(w2[0]);
  auto a = make<cpu>(cex, g1.expert);
  auto b = make<semoe::cuda>(gex, g2.expert);
  train::adamw<float, cpu> oa(cex, {.lr = 1e-2});
  train::adamw<float, semoe::cuda> ob(gex, {.lr = 1e-2});
  // Clipping at 0.5 is active: the gradient norm of this model is larger.
  train::trainer ta(a, oa, w1[0], g1, {.clip_norm = 0.5});
  train::trainer tb(b, ob, w2[0], g2, {.clip_norm = 0.5});
  layer::softmax_cross_entropy<float, cpu> la(cex, {.label_smoothing = 0.1});
  layer::softmax_cross_entropy<float, semoe::cuda> lb(gex, {.label_smoothing = 0.1});

  std::vector<std::int32_t> labels(N);
  for (index_t i = 0; i < N; ++i) labels[i] = static_cast<std::int32_t>((i * 7) % C);
  matrix<float> dla(N, C);
  matrix<float, device_space> xd(N, In), dlb(N, C);
  for (int step = 0; step < 5; ++step) {
    CAPTURE(step);
    const auto x = random_vec(N * In, 100 + step);
    gex.copy(xd.data(), x.data(), xd.bytes());
    double logits_err = 0;
    const double loss_a = ta.step([&](auto& m) {
      const auto z = m.forward(as_matrix(x.data(), N, In));
      const double l = la.forward(z, labels, N);
      la.backward(dla.view());
      m.backward(dla.view());
      return l;
    });
    std::vector<float> za(N * C);
    {
      const auto z = a.forward(as_matrix(x.data(), N, In));  // after the step: both models' new logits
      std::copy(z.data(), z.data() + N * C, za.begin());
    }
    const double loss_b = tb.step([&](auto& m) {
      const auto z = m.forward(matrix_view<const float>(xd.view()));
      const double l = lb.forward(z, labels, N);
      lb.backward(dlb.view());
      m.backward(dlb.view());
      return l;
    });
    {
      const auto z = b.forward(matrix_view<const float>(xd.view()));
      logits_err = scaled_error(host_copy(gex, std::span<const float>(z.data(), N * C)), za);
    }
    CHECK(std::abs(loss_a - loss_b) <= 1e-5 * std::abs(loss_a));
    CHECK(ta.last_grad_norm() == doctest::Approx(tb.last_grad_norm()).epsilon(1e-5));
    CHECK(logits_err < 1e-5);
    auto pa = a.parameters(), pb = b.parameters();
    REQUIRE(pa.size() == pb.size());
    for (std::size_t i = 0; i < pa.size(); ++i) {
      CAPTURE(pa[i].name);
      CHECK(scaled_error(host_copy(gex, pb[i].value), pa[i].value) < 1e-5);
    }
  }
}
