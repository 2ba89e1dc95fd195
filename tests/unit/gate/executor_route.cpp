// Gates that route on an executor (top_k, switch_gate) give the plan of the
// host route bit for bit on every executor: the cpu pool (bodies on several
// threads, atomics in the counts) and the emulated device (the device code
// path: logits and plan in memory the host may not read, the tables by the
// algorithm engine). Every field of the plan and the backward's dlogits are
// compared exactly, over capacity policies, dropless, aux-free bias and a
// batch split over two ranks.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "../core/emulated_device.hpp"
#include "gate_testing.hpp"
#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/dispatch.hpp"

using namespace gate_testing;
namespace sg = semoe::gate;
using semoe::buffer;

namespace {

/// One route + backward, every result on the host.
struct routed {
  routing_plan<float> plan;
  std::vector<float> dlogits;
  std::vector<index_t> rows;
  std::vector<double> bias;
};

template <class T>
bool same_bits(const buffer<T>& a, const buffer<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

void check_same(const routed& a, const routed& b) {
  const auto &p = a.plan, &q = b.plan;
  REQUIRE(p.tokens == q.tokens);
  REQUIRE(p.k == q.k);
  CHECK(p.capacity == q.capacity);
  CHECK(p.dropped == q.dropped);
  CHECK(same_bits(p.expert, q.expert));
  CHECK(same_bits(p.slot, q.slot));
  CHECK(same_bits(p.counts, q.counts));
  CHECK(same_bits(p.offsets, q.offsets));
  CHECK(same_bits(p.weight, q.weight));
  CHECK(same_bits(p.score, q.score));
  CHECK(same_bits(p.probs, q.probs));
  CHECK(same_bits(p.aux_saved, q.aux_saved));
  CHECK(std::memcmp(&p.balance_loss, &q.balance_loss, sizeof(float)) == 0);
  CHECK(std::memcmp(&p.z_loss, &q.z_loss, sizeof(float)) == 0);
  CHECK(a.dlogits == b.dlogits);
  CHECK(a.rows == b.rows);
  CHECK(a.bias == b.bias);
}

double dweight_of(index_t a) { return 0.25 + 0.5 * std::sin(0.37 * static_cast<double>(a)); }

/// Route `x` ([n, E], this rank's tokens) with `gate` on `ex`; with ex =
/// nullptr, the gate's host route. Two steps, so an aux-free bias moves
/// between them and the second step selects with it.
template <class G, class Exec>
routed route_on(Exec* ex, G gate, const std::vector<float>& x, index_t E, route_context ctx) {
  using space = typename Exec::memory_space;
  const index_t n = static_cast<index_t>(x.size()) / E, k = gate.choices(E);
  routed out;
  for (int step = 0; step < 2; ++step) {
    ctx.step = static_cast<std::uint64_t>(step);
    std::vector<float> g(static_cast<std::size_t>(n * k));
    for (index_t a = 0; a < n * k; ++a) g[a] = static_cast<float>(dweight_of(ctx.token_offset * k + a));
    out.dlogits.assign(static_cast<std::size_t>(n * E), 0.0f);
    if (!ex) {
      gate.route(ctx, view(x, E), out.plan);
      gate.backward(ctx, view(x, E), out.plan, std::span<const float>(g), semoe::as_matrix(out.dlogits.data(), n, E));
      buffer<index_t> rows;
      semoe::layer::dispatch_rows(out.plan, rows);
      out.rows.assign(rows.begin(), rows.end());
    } else {
      buffer<float, space> xd(n * E), gd(n * k), dld(n * E);
      buffer<index_t, space> rows;
      ex->copy(xd.data(), x.data(), xd.bytes());
      ex->copy(gd.data(), g.data(), gd.bytes());
      routing_plan<float, space> plan;
      const semoe::matrix_view<const float> xv = semoe::as_matrix<const float>(xd.data(), n, E);
      gate.route(*ex, ctx, xv, plan);
      gate.backward(*ex, ctx, xv, plan, std::span<const float>(gd.span()), dld.matrix(n, E));
      semoe::layer::dispatch_rows(*ex, plan, rows);
      out.plan = sg::copy_to_host(*ex, plan);
      ex->copy(out.dlogits.data(), dld.data(), dld.bytes());
      out.rows.resize(static_cast<std::size_t>(rows.size()));
      ex->copy(out.rows.data(), rows.data(), rows.bytes());
    }
    gate.end_step(ctx);
  }
  out.bias.assign(gate.bias().values().begin(), gate.bias().values().end());
  return out;
}

template <class G>
void check_all_executors(const G& gate, index_t n, index_t E, unsigned seed) {
  const auto x = random_logits<float>(n, E, seed);
  semoe::sequential_executor* none = nullptr;
  const routed host = route_on(none, gate, x, E, one_rank(n));
  semoe::cpu_executor pool({.threads = 3});
  semoe::test::emulated_device_executor dev({.threads = 3});
  {
    INFO("cpu executor, 3 threads");
    check_same(host, route_on(&pool, gate, x, E, one_rank(n)));
  }
  {
    INFO("emulated device");
    check_same(host, route_on(&dev, gate, x, E, one_rank(n)));
  }
  CHECK(host.plan.kept() > 0);
}

}  // namespace

TEST_CASE("executor route: top_k<2> on every executor equals the host route, capacity by position") {
  sg::top_k<2>::options o;
  o.capacity_factor = 0.6;  // several experts over capacity: the radix select runs
  check_all_executors(sg::top_k<2>(o), 3000, 8, 11);  // 6000 choices: the pool splits them
}

TEST_CASE("executor route: top_k<2>, capacity by probability") {
  sg::top_k<2>::options o;
  o.capacity_factor = 0.5;
  o.drop = sg::drop_policy::probability;
  check_all_executors(sg::top_k<2>(o), 257, 6, 12);
}

TEST_CASE("executor route: top_k<4> dropless, unnormalized, z-loss only") {
  sg::top_k<4>::options o;
  o.dropless = true;
  o.normalize = false;
  o.balance = sg::balance_mode::none;
  check_all_executors(sg::top_k<4>(o), 129, 16, 13);
}

TEST_CASE("executor route: top_k<2> with aux-loss-free bias moves and selects the same") {
  sg::top_k<2>::options o;
  o.balance = sg::balance_mode::aux_free;
  o.bias_rate = 0.05;
  o.capacity_factor = 0.8;
  check_all_executors(sg::top_k<2>(o), 200, 8, 14);
}

TEST_CASE("executor route: switch_gate equals the host route") {
  sg::switch_gate::options o;
  o.capacity_factor = 0.7;
  check_all_executors(sg::switch_gate(o), 150, 5, 15);
}

TEST_CASE("executor route: a batch split over two ranks routes on the emulated device as on the host") {
  const index_t n = 240, E = 8;
  sg::top_k<2>::options o;
  o.capacity_factor = 0.6;
  const auto x = random_logits<float>(n, E, 16);
  auto run_split = [&](bool device) {
    std::vector<routed> runs(2);
    sim_group group(2);
    group.run([&](int r) {
      const auto [first, count] = shard(n, 2, r);
      auto ctx = group.context(r, one_rank(n));
      ctx.token_offset = first;
      const std::vector<float> mine(x.begin() + first * E, x.begin() + (first + count) * E);
      if (device) {
        semoe::test::emulated_device_executor dev({.threads = 2});
        runs[r] = route_on(&dev, sg::top_k<2>(o), mine, E, ctx);
      } else {
        semoe::sequential_executor* none = nullptr;
        runs[r] = route_on(none, sg::top_k<2>(o), mine, E, ctx);
      }
    });
    return runs;
  };
  const auto host = run_split(false), dev = run_split(true);
  CHECK(host[0].plan.dropped + host[1].plan.dropped > 0);
  for (int r = 0; r < 2; ++r) {
    INFO("rank " << r);
    check_same(host[r], dev[r]);
  }
}

TEST_CASE("executor route: non-finite logits in executor memory are named as on the host") {
  const index_t n = 10, E = 4;
  auto x = random_logits<float>(n, E, 17);
  x[6 * E + 2] = std::numeric_limits<float>::quiet_NaN();
  semoe::test::emulated_device_executor dev;
  buffer<float, semoe::test::emulated_device_space> xd(n * E);
  dev.copy(xd.data(), x.data(), xd.bytes());
  routing_plan<float, semoe::test::emulated_device_space> plan;
  sg::top_k<2> gate;
  CHECK_THROWS_WITH_AS(gate.route(dev, one_rank(n), semoe::as_matrix<const float>(xd.data(), n, E), plan),
                       doctest::Contains("NaN or Inf at token 6, expert 2"), semoe::error);
}
