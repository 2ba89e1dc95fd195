// The layer's outputs and every gradient are the same bits whatever the
// executor's thread count (1, 2, 4): routing, permutation, combine and their
// backward sum in a fixed order. Shapes with many experts and top-8, with
// capacity drops and dropless, with shared experts, and experts large enough
// to be cut into row tiles and gradient pieces. OpenBLAS runs on one thread
// here, so the GEMMs run on the executor's threads (blas::gemms_on_executor)
// and their schedule changes with the thread count; the bits must not.
#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <vector>

#include "semoe/core/blas.hpp"
#include "semoe/gate/sigmoid_top_k.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/shared_experts.hpp"

using namespace semoe;

namespace {

struct result {
  std::vector<float> y, dx, router;
  std::vector<std::vector<float>> experts;
};

template <class Layer, class Options>
result run(int threads, const Options& opt, index_t T, index_t H) {
  cpu_executor ex({.threads = threads});
  auto comms = comm::local::make_world(1);
  Layer layer(ex, comms[0], opt);
  matrix<float> x(T, H), y(T, H), dy(T, H), dx(T, H);
  std::mt19937 g(3);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (auto& v : x.span()) v = d(g);
  for (auto& v : dy.span()) v = d(g);
  result r;
  for (int step = 0; step < 2; ++step) {  // the second step routes with the first's aux-free bias
    layer.zero_grad();
    layer.forward(x.view(), y.view());
    layer.backward(dy.view(), dx.view());
    layer.end_step();
  }
  r.y.assign(y.span().begin(), y.span().end());
  r.dx.assign(dx.span().begin(), dx.span().end());
  for (auto& p : layer.parameters()) r.router.insert(r.router.end(), p.grad.begin(), p.grad.end());
  auto& moe = [&]() -> auto& {
    if constexpr (requires { layer.moe(); })
      return layer.moe();
    else
      return layer;
  }();
  for (index_t e = 0; e < moe.local_experts(); ++e) {
    auto b = moe.store().acquire(moe.layer_id(), e);
    r.experts.emplace_back(b.grads.begin(), b.grads.end());
  }
  return r;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

template <class Layer, class Options>
void check_threads(const Options& opt, index_t T, index_t H) {
  blas::set_num_threads(1);
  const auto one = run<Layer>(1, opt, T, H);
  for (int threads : {2, 4}) {
    CAPTURE(threads);
    const auto many = run<Layer>(threads, opt, T, H);
    CHECK(same_bits(one.y, many.y));
    CHECK(same_bits(one.dx, many.dx));
    CHECK(same_bits(one.router, many.router));
    REQUIRE(one.experts.size() == many.experts.size());
    for (std::size_t e = 0; e < one.experts.size(); ++e) CHECK(same_bits(one.experts[e], many.experts[e]));
  }
}

}  // namespace

TEST_CASE("the layer is bitwise the same on 1, 2 and 4 executor threads") {
  const index_t T = 512, H = 32, F = 16;
  SUBCASE("64 experts, top-8, dropless, aux-free balancing") {
    using L = moe_layer<cpu, gate::top_k<8>, expert::ffn<act::swiglu>>;
    check_threads<L>(L::options{.hidden = H, .ffn = F, .experts = 64,
                                .gate = {.dropless = true, .balance = gate::balance_mode::aux_free}, .seed = 2},
                     T, H);
  }
  SUBCASE("16 experts, top-2, capacity drops, aux and z losses") {
    using L = moe_layer<cpu, gate::top_k<2>, expert::ffn<act::gelu>>;
    check_threads<L>(L::options{.hidden = H, .ffn = F, .experts = 16,
                                .gate = {.capacity_factor = 0.8, .aux_loss_coef = 0.01, .z_loss_coef = 0.001},
                                .seed = 3},
                     T, H);
  }
  SUBCASE("large experts: several row tiles each, weight gradients in pieces") {
    // About 2100 rows per expert: two row tiles each; dW1 and dW2 (1024 x 256
    // over 2100 rows) are cut in two (expert::ffn's host schedule).
    using L = moe_layer<cpu, gate::top_k<2>, expert::ffn<act::gelu>>;
    REQUIRE(blas::detail::cut_of(1024, 256, 1900).count >= 2);
    check_threads<L>(L::options{.hidden = 256, .ffn = 1024, .experts = 4, .gate = {.dropless = true}, .seed = 5},
                     4200, 256);
  }
  SUBCASE("fewer row tiles than two per thread: each pass over all experts, GEMMs cut over the threads") {
    // Two experts of about 1200 rows: one tile each, so 1 thread runs tiles
    // and 2 or 4 threads run the passes with every GEMM cut in two.
    using L = moe_layer<cpu, gate::top_k<1>, expert::ffn<act::gelu>>;
    REQUIRE(blas::detail::cut_of(1100, 1024, 256).count >= 2);
    check_threads<L>(L::options{.hidden = 256, .ffn = 1024, .experts = 2, .gate = {.dropless = true}, .seed = 6},
                     2400, 256);
  }
  SUBCASE("DeepSeek-V3 style: sigmoid top-8 of 64 in groups, with a shared expert") {
    using M = moe_layer<cpu, gate::sigmoid_top_k<8>, expert::ffn<act::swiglu>>;
    using L = layer::with_shared_experts<M>;
    check_threads<L>(L::options{.moe = {.hidden = H, .ffn = F, .experts = 64,
                                        .gate = {.dropless = true, .groups = 8, .top_groups = 4}, .seed = 4},
                                .shared_ffn = 2 * F},
                     T, H);
  }
}
