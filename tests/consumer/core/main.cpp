// The layer from the installed package through the umbrella header: a tiny
// top-2 moe_layer's forward against the same sums written out as loops.
#include <semoe/semoe.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  using namespace semoe;
  using layer_t = basic_moe_layer<double, cpu, gate::top_k<2>, expert::ffn<act::relu>>;
  const index_t T = 5, H = 4, F = 6, E = 3;
  cpu_executor ex({.threads = 2});
  auto ranks = comm::local::make_world(1);
  layer_t moe(ex, ranks[0], {.hidden = H, .ffn = F, .experts = E, .gate = {.dropless = true}, .seed = 7});
  matrix<double> x(T, H), y(T, H);
  for (index_t t = 0; t < T; ++t)
    for (index_t h = 0; h < H; ++h) x(t, h) = std::sin(1.0 + static_cast<double>(t * H + h));
  moe.forward(x.view(), y.view());

  // Logits, softmax, the two largest renormalized, relu FFN (W1, W2) per pick.
  const auto wg = moe.parameters()[0].value;
  double worst = 0;
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> p(E, 0.0);
    for (index_t e = 0; e < E; ++e)
      for (index_t h = 0; h < H; ++h) p[e] += x(t, h) * wg[h * E + e];
    const double mx = *std::max_element(p.begin(), p.end());
    for (auto& v : p) v = std::exp(v - mx);
    std::vector<index_t> order{0, 1, 2};
    std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return p[a] > p[b]; });
    const double norm = p[order[0]] + p[order[1]];
    for (index_t o = 0; o < H; ++o) {
      double want = 0;
      for (int c = 0; c < 2; ++c) {
        const auto block = moe.store().acquire(moe.layer_id(), order[c]);
        const double* w1 = block.params.data();
        const double* w2 = w1 + H * F;
        double acc = 0;
        for (index_t f = 0; f < F; ++f) {
          double pre = 0;
          for (index_t h = 0; h < H; ++h) pre += x(t, h) * w1[h * F + f];
          acc += std::max(pre, 0.0) * w2[f * H + o];
        }
        want += p[order[c]] / norm * acc;
      }
      worst = std::max(worst, std::abs(y(t, o) - want));
    }
  }
  std::printf("semoe::semoe consumer: moe_layer forward, largest difference from loops %.3g\n", worst);
  return worst < 1e-12 ? 0 : 1;
}
