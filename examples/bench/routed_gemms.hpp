// The bare-GEMM baseline of bench_moe_layer on either backend: the expert
// GEMMs of exactly the shapes a layer's last step routed, pointed at operand
// buffers in the backend's memory, with nothing else around them.
#pragma once

#include <algorithm>
#include <random>
#include <vector>

#include "semoe/core/blas.hpp"
#include "semoe/core/buffer.hpp"

namespace semoe::bench {

template <class Space>
struct routed_gemms {
  std::vector<blas::gemm_problem<float>> problems;
  buffer<float, Space> a, b, c;  // one operand buffer each, as large as the largest problem's
  double flops = 0;

  /// Shapes from layer.expert_policy().gemm_shapes(rows) of every expert.
  template <class Layer>
  explicit routed_gemms(const Layer& layer) {
    const auto& plan = layer.plan();
    for (index_t e = 0; e < static_cast<index_t>(plan.counts.size()); ++e)
      for (auto p : layer.expert_policy().gemm_shapes(plan.counts[e])) problems.push_back(p);
    place();
  }

  /// More GEMMs of the same step (a shared expert's), with the operands re-sized.
  void add(const std::vector<blas::gemm_problem<float>>& more) {
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
    a.resize_discard(static_cast<index_t>(amax));
    b.resize_discard(static_cast<index_t>(bmax));
    c.resize_discard(static_cast<index_t>(cmax));
    // Random operands, as the layer's: a GPU draws less power, and runs
    // faster, on zeros, and the baseline must not be flattered by that.
    fill(a, 1);
    fill(b, 2);
    c.zero();
    for (auto& p : problems) {
      p.a = a.data();
      p.lda = p.ta == blas::op::n ? p.k : p.m;
      p.b = b.data();
      p.ldb = p.tb == blas::op::n ? p.n : p.k;
      p.c = c.data();
      p.ldc = p.n;
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
