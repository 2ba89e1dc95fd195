// A user-written gate in one file: top-1 routing with a softmax temperature.
// Build it alone with
//   g++ -std=c++20 -O2 -I include examples/custom_gate/main.cpp -lopenblas -pthread
// The gate satisfies semoe::gate::Gate; the layer calls it for routing and for
// the exact gradient of the combine weights. Delete backward() and the
// compiler says which requirement is missing.
#include <cmath>
#include <cstdio>
#include <string>

#include "semoe/layer/moe_layer.hpp"

struct tempered_top1 {
  using policy_kind = semoe::gate::gate_tag;
  struct options {
    double temperature = 0.5;
    double capacity_factor = 1.5;
  };
  explicit tempered_top1(options o) : opt(o) { validate(o); }
  static void validate(const options& o) {
    SEMOE_CHECK(o.temperature > 0, "tempered_top1: options.temperature = ", o.temperature, ": expected > 0");
  }
  semoe::index_t choices(semoe::index_t) const { return 1; }

  template <class T>
  void route(const semoe::gate::route_context& ctx, semoe::matrix_view<const T> logits,
             semoe::gate::routing_plan<T>& plan) {
    const semoe::index_t n = logits.rows(), E = logits.cols();
    plan.reset(n, E, 1);
    plan.probs.resize_discard(n * E);
    for (semoe::index_t t = 0; t < n; ++t) {  // p = softmax(logits / temperature), pick the argmax
      T mx = logits(t, 0), sum = 0;
      for (semoe::index_t e = 1; e < E; ++e) mx = std::max(mx, logits(t, e));
      for (semoe::index_t e = 0; e < E; ++e) sum += plan.probs[t * E + e] = std::exp((logits(t, e) - mx) / T(opt.temperature));
      semoe::index_t best = 0;
      for (semoe::index_t e = 0; e < E; ++e) {
        plan.probs[t * E + e] /= sum;
        if (plan.probs[t * E + e] > plan.probs[t * E + best]) best = e;
      }
      plan.expert[t] = static_cast<std::int32_t>(best);
      plan.weight[t] = plan.probs[t * E + best];
      plan.score[t] = static_cast<float>(plan.weight[t]);
    }
    plan.capacity = semoe::gate::expert_capacity(opt.capacity_factor, ctx.global_tokens, 1, E);
    semoe::gate::limit_by_capacity(plan, ctx, semoe::gate::drop_policy::probability);
    ++routed_batches;
  }

  // d weight / d logit_j = p_e (delta_ej - p_j) / temperature
  template <class T>
  void backward(const semoe::gate::route_context&, semoe::matrix_view<const T> logits,
                const semoe::gate::routing_plan<T>& plan, std::span<const T> dweight,
                semoe::matrix_view<T> dlogits) const {
    const semoe::index_t E = logits.cols();
    for (semoe::index_t t = 0; t < logits.rows(); ++t) {
      const semoe::index_t e = plan.expert[t];
      const T pe = plan.probs[t * E + e], g = dweight[t] / T(opt.temperature);
      for (semoe::index_t j = 0; j < E; ++j) dlogits(t, j) = g * pe * ((j == e) - plan.probs[t * E + j]);
    }
  }

  options opt;
  int routed_batches = 0;
};

// check_gate, not the bare concept: a missing piece is named in one sentence.
static_assert(semoe::gate::check_gate<tempered_top1>());

int main(int argc, char** argv) {
  using namespace semoe;
  if (argc > 1) {
    const bool asked = std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h";
    std::fprintf(asked ? stdout : stderr, "usage: custom_gate\nRuns one forward and backward of a layer with the "
                 "user-written gate tempered_top1 and prints its routing.\n");
    return asked ? 0 : 2;
  }
  cpu_executor ex({.threads = 2});
  auto comms = comm::local::make_world(1);
  moe_layer<cpu, tempered_top1> moe(ex, comms[0], {.hidden = 64, .ffn = 128, .experts = 4, .gate = {.temperature = 0.5}});

  matrix<float> x(256, 64), y(256, 64), dx(256, 64);
  for (index_t i = 0; i < 256 * 64; ++i) x.data()[i] = std::sin(0.37f * static_cast<float>(i));
  moe.forward(x.view(), y.view());
  moe.backward(y.view(), dx.view());  // d(0.5 |y|^2)/dy = y

  const auto load = moe.expert_load();
  std::printf("custom gate ran %d time(s); routed rows per expert:", moe.gate().routed_batches);
  for (auto n : load) std::printf(" %lld", static_cast<long long>(n));
  std::printf("; dropped %lld; router grad[0] = %.3g\n", static_cast<long long>(moe.plan().dropped),
              static_cast<double>(moe.parameters()[0].grad[0]));
  return moe.gate().routed_batches == 1 ? 0 : 1;
}
