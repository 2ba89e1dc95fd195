// The load monitor: window means of a MoE layer's per-expert rows and
// expert seconds, and the group's picture from gather_load(), checked
// against routing known in closed form (a test gate that sends each token
// to an expert chosen by its global index, not by the router).
#include <doctest/doctest.h>

#include <cmath>
#include <mutex>
#include <vector>

#include "semoe/layer/moe_layer.hpp"

using namespace semoe;

namespace {

/// Top-1 by global token index: token g goes to expert expert_of(g, E);
/// weights are 1 and do not depend on the logits (no router gradient).
index_t expert_of(index_t g, index_t E) { return g % 3 == 0 ? 0 : g % E; }  // expert 0 is hot

struct index_gate {
  using policy_kind = gate::gate_tag;
  struct options {
    double capacity_factor = 0;  // unused: dropless
  };
  explicit index_gate(options) {}
  static void validate(const options&) {}
  index_t choices(index_t) const { return 1; }
  template <class T>
  void route(const gate::route_context& ctx, matrix_view<const T> logits, gate::routing_plan<T>& plan) {
    const index_t n = logits.rows(), E = logits.cols();
    plan.reset(n, E, 1);
    plan.probs.resize_discard(n * E);
    for (index_t t = 0; t < n; ++t) {
      for (index_t e = 0; e < E; ++e) plan.probs[t * E + e] = T(1) / T(E);
      plan.expert[t] = static_cast<std::int32_t>(expert_of(ctx.token_offset + t, E));
      plan.weight[t] = T(1);
      plan.score[t] = 1.0f;
    }
    gate::limit_by_capacity(plan, ctx, gate::drop_policy::probability);
  }
  template <class T>
  void backward(const gate::route_context&, matrix_view<const T> logits, const gate::routing_plan<T>&,
                std::span<const T>, matrix_view<T> dlogits) const {
    for (index_t t = 0; t < logits.rows(); ++t)
      for (index_t j = 0; j < logits.cols(); ++j) dlogits(t, j) = T(0);
  }
};
static_assert(gate::Gate<index_gate>);

}  // namespace

TEST_CASE("load_monitor: means over the last `window` steps; a step without a forward is not one") {
  layer::load_monitor m(2);
  const std::vector<index_t> o1{0, 3, 5}, o2{0, 1, 2}, o3{0, 5, 5};
  const std::vector<std::int32_t> sent{4, 2};
  for (const auto* o : {&o1, &o2, &o3}) {
    m.record_sent(std::span<const std::int32_t>(sent));
    m.record_received(std::span<const index_t>(*o));
    m.add_seconds(o == &o1 ? 9.0 : 1.0);
    m.end_step();
    m.end_step();  // nothing recorded since the last one: no step
  }
  CHECK(m.total_steps() == 3);
  CHECK(m.steps() == 2);
  CHECK(m.received() == std::vector<double>{3.0, 0.5});  // steps 2 and 3; step 1's {3, 2} has left
  CHECK(m.rows() == 3.5);
  CHECK(m.seconds() == 1.0);
  CHECK(m.sent() == std::vector<double>{4.0, 2.0});
  CHECK_THROWS_WITH_AS(layer::load_monitor(0), doctest::Contains("window = 0"), error);

  // The last step's rows as a Chrome trace counter, one series per expert.
  auto& rec = trace::recorder::instance();
  rec.start("unused-load-monitor-trace.json");  // recording only: nothing is written
  m.trace(7, 1, 4, 1);  // one local expert, then a replica slot
  const auto all = rec.to_json();
  nlohmann::json events = nlohmann::json::array();
  for (const auto& e : all["traceEvents"])
    if (e["ph"] != "M") events.push_back(e);  // lane names other tests gave
  rec.stop();
  rec.start("");
  rec.stop();
  REQUIRE(events.size() == 1);
  CHECK(events[0]["ph"] == "C");
  CHECK(events[0]["name"] == "expert rows L7");
  CHECK(events[0]["pid"] == 1);
  CHECK(events[0]["args"] == nlohmann::json{{"E4", 5.0}, {"R0", 0.0}});
}

TEST_CASE("moe_layer's load monitor counts the rows each rank's experts process, as the routing says") {
  constexpr index_t H = 8, E = 4, n = 30;  // tokens per rank
  using layer_t = moe_layer<cpu, index_gate>;
  for (int P : {1, 2}) {
    CAPTURE(P);
    // Expected rows per expert per step, from the gate's rule over all tokens.
    std::vector<double> expect(E, 0.0);
    for (index_t g = 0; g < n * P; ++g) expect[static_cast<std::size_t>(expert_of(g, E))] += 1;
    std::mutex mu;
    std::vector<layer::load_report> reports(static_cast<std::size_t>(P));
    comm::local::run(P, [&](comm::local& c) {
      cpu_executor ex({.threads = 1});
      layer_t moe(ex, c, {.hidden = H, .ffn = 6, .experts = E, .seed = 2});
      matrix<float> x(n, H), y(n, H), dx(n, H);
      for (index_t i = 0; i < n * H; ++i) x.data()[i] = std::sin(0.1f * static_cast<float>(i + c.rank()));
      for (int step = 0; step < 3; ++step) {
        moe.forward(x.view(), y.view());
        moe.backward(matrix_view<const float>(y.view()), dx.view());
        moe.end_step();
      }
      moe.forward(x.view(), y.view());  // a forward with no end_step after it is not a step yet
      CHECK(moe.load().total_steps() == 3);
      CHECK(moe.load().seconds() > 0);
      auto r = moe.gather_load();
      std::lock_guard lk(mu);
      reports[static_cast<std::size_t>(c.rank())] = std::move(r);
    });
    for (const auto& r : reports) {
      CHECK(r.expert_rows == expect);
      REQUIRE(r.rank_rows.size() == static_cast<std::size_t>(P));
      const index_t L = E / P;
      double busiest = 0, total = 0;
      for (int p = 0; p < P; ++p) {
        double rows = 0;
        for (index_t i = 0; i < L; ++i) rows += expect[static_cast<std::size_t>(p * L + i)];
        CHECK(r.rank_rows[static_cast<std::size_t>(p)] == rows);
        CHECK(r.rank_seconds[static_cast<std::size_t>(p)] > 0);
        busiest = std::max(busiest, rows);
        total += rows;
      }
      CHECK(r.max_rank_share() == doctest::Approx(busiest / total));
    }
  }
}
