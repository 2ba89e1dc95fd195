// The bare-GEMM baseline of bench_moe_layer on either backend: the expert
// GEMMs of exactly the shapes a layer's last step routed, pointed at operand
// buffers in the backend's memory, with nothing else around them. Operands
// are either
//  * shared: every problem reads and writes the same three buffers, so a
//    run reads from cache what a layer reads from each expert's own memory
//    (the strict floor); or
//  * in_layer_buffers: each expert's six FFN GEMMs on buffers laid out as
//    expert::ffn's (x, W1, W2, the saved rows, the work rows, y,
//    dy, dx, dW1, dW2), so each GEMM reads what the previous one wrote, as
//    in the layer, without the activation and routing between. dx has its
//    own buffer (the layer writes it over dy): written over dy, each pass
//    would scale dy by about 0.05 and repeated passes would reach
//    subnormal floats, which run many times slower.
#pragma once

#include <algorithm>
#include <random>
#include <vector>

#include "semoe/core/blas.hpp"
#include "semoe/core/buffer.hpp"

namespace semoe::bench {

enum class operands { shared, in_layer_buffers };

template <class Space>
struct routed_gemms {
  std::vector<blas::gemm_problem<float>> problems;
  std::vector<std::size_t> expert_first;  // where each expert's problems start in `problems`
  operands placement = operands::shared;
  buffer<float, Space> a, b, c;  // shared: one operand buffer each, as large as the largest problem's
  std::vector<buffer<float, Space>> own;  // in_layer_buffers: each expert's
  double flops = 0;

  /// Shapes from layer.expert_policy().gemm_shapes(rows) of every expert.
  template <class Layer>
  explicit routed_gemms(const Layer& layer, operands where = operands::shared) : placement(where) {
    const auto& plan = layer.plan();
    for (index_t e = 0; e < static_cast<index_t>(plan.counts.size()); ++e) {
      expert_first.push_back(problems.size());
      for (auto p : layer.expert_policy().gemm_shapes(plan.counts[e])) problems.push_back(p);
    }
    place();
  }

  /// More GEMMs of the same step (a shared expert's), with the operands re-sized.
  void add(const std::vector<blas::gemm_problem<float>>& more) {
    expert_first.push_back(problems.size());
    problems.insert(problems.end(), more.begin(), more.end());
    place();
  }

 private:
  void place() {
    std::size_t amax = 0, bmax = 0, cmax = 0;
    flops = 0;
    for (const auto& p : problems) {
      amax = std::max<std::size_t>(amax, p.m * p.k);
      bmax = std::max<std::size_t>(bmax, p.k * p.n);
      cmax = std::max<std::size_t>(cmax, p.m * p.n);
      flops += p.flops();
    }
    own.clear();
    if (placement == operands::shared) {
      a.resize_discard(static_cast<index_t>(amax));
      b.resize_discard(static_cast<index_t>(bmax));
      c.resize_discard(static_cast<index_t>(cmax));
      // Random operands, as the layer's: a GPU draws less power, and runs
      // faster, on zeros, and the baseline must not be flattered by that.
      fill(a, 1);
      fill(b, 2);
      c.zero();
    }
    if (placement == operands::in_layer_buffers) {
      place_as_ffn();
      return;
    }
    for (auto& p : problems) {
      p.a = a.data();
      p.lda = p.ta == blas::op::n ? p.k : p.m;
      p.b = b.data();
      p.ldb = p.tb == blas::op::n ? p.n : p.k;
      p.c = c.data();
      p.ldc = p.n;
    }
  }

  /// Each expert's problems, in expert::ffn::gemm_shapes order (x W1, a W2,
  /// dy W2^T, a^T dy, x^T dpre, dpre W1^T), on that expert's own buffers.
  void place_as_ffn() {
    unsigned seed = 3;
    auto own_buffer = [&](index_t elems) -> float* {
      own.emplace_back(std::max<index_t>(elems, 1));
      fill(own.back(), seed++);
      return own.back().data();
    };
    own.reserve(10 * expert_first.size());
    for (std::size_t g = 0; g < expert_first.size(); ++g) {
      const std::size_t first = expert_first[g];
      const std::size_t last = g + 1 < expert_first.size() ? expert_first[g + 1] : problems.size();
      SEMOE_CHECK(last - first == 6, "bench::routed_gemms: in_layer_buffers takes expert::ffn's six GEMMs per expert");
      auto* p = problems.data() + first;
      const index_t n = p[0].m, H = p[0].k, F1 = p[0].n, F = p[1].k;
      float *x = own_buffer(n * H), *w1 = own_buffer(H * F1), *w2 = own_buffer(F * H), *pre = own_buffer(n * F1),
            *work = own_buffer(n * F1), *y = own_buffer(n * H), *dy = own_buffer(n * H), *dx = own_buffer(n * H),
            *gw1 = own_buffer(H * F1), *gw2 = own_buffer(F * H);
      auto set = [](blas::gemm_problem<float>& q, const float* qa, index_t la, const float* qb, index_t lb, float* qc,
                    index_t lc) {
        q.a = qa, q.lda = la, q.b = qb, q.ldb = lb, q.c = qc, q.ldc = lc;
      };
      set(p[0], x, H, w1, F1, pre, F1);     // pre = x W1
      set(p[1], work, F1, w2, H, y, H);     // y = a W2
      set(p[2], dy, H, w2, H, work, F1);    // da = dy W2^T
      set(p[3], work, F1, dy, H, gw2, H);   // dW2 += a^T dy (a in work, as the layer keeps it)
      set(p[4], x, H, work, F1, gw1, F1);   // dW1 += x^T dpre
      set(p[5], work, F1, w1, F1, dx, H);   // dx = dpre W1^T
    }
  }

  static void fill(buffer<float, Space>& d, unsigned seed) {
    std::vector<float> h(static_cast<std::size_t>(d.size()));
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> u(-0.01f, 0.01f);
    for (auto& v : h) v = u(g);
    copy_bytes<Space, host_space>(d.data(), h.data(), d.bytes());
  }
};

}  // namespace semoe::bench
