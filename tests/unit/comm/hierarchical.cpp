#include "semoe/comm/hierarchical.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "semoe/comm/local.hpp"

using semoe::index_t;
using semoe::comm::local;
using semoe::comm::reduce_op;
namespace comm = semoe::comm;
using hier = comm::hierarchical<local>;

static_assert(comm::Communicator<hier>, "a hierarchical communicator can be any layer's Comm");
static_assert(std::same_as<decltype(std::declval<hier&>().split(0, 0)), hier>);

namespace {

struct shape {
  int P, L;
};
// Two and more nodes of 2, 3, 4 ranks, and the degenerate L = 1 and L = P.
constexpr shape shapes[] = {{4, 2}, {8, 2}, {8, 4}, {6, 3}, {6, 2}, {4, 1}, {4, 4}, {1, 1}, {2, 1}, {2, 2}, {8, 1}, {8, 8}};

using matrix = std::vector<std::vector<index_t>>;

/// counts[src][dst]. kind 0: random with about 40% zeros; 1: all positive;
/// 2: all zero; 3: random with whole rows and columns of zeros.
matrix make_counts(int P, unsigned seed, int kind) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(-4, 6);
  matrix c(P, std::vector<index_t>(P));
  for (int s = 0; s < P; ++s)
    for (int t = 0; t < P; ++t) {
      switch (kind) {
        case 0: c[s][t] = std::max(0, d(rng)); break;
        case 1: c[s][t] = 1 + std::abs(d(rng)); break;
        case 2: c[s][t] = 0; break;
        default: c[s][t] = (s % 3 == 1 || t % 3 == 2) ? 0 : std::max(0, d(rng)); break;
      }
    }
  return c;
}

/// Arbitrary bits (NaNs included for floating types): equality is checked with memcmp.
template <class T>
T payload(int src, int dst, index_t i, unsigned round) {
  std::uint64_t h = (std::uint64_t(src) << 48) ^ (std::uint64_t(dst) << 32) ^ (std::uint64_t(i) << 8) ^ round;
  h *= 0x9E3779B97F4A7C15ull;
  h ^= h >> 29;
  T x;
  std::memcpy(&x, &h, sizeof(T));
  return x;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0);
}

/// One rank's buffers for the exchange described by `c`.
template <class T>
struct exchange_buffers {
  std::vector<index_t> sc, rc;
  std::vector<T> send;
  std::vector<T> recv;  // two spare slots at the end must stay untouched
  exchange_buffers(const matrix& c, int me, unsigned round) {
    const int P = static_cast<int>(c.size());
    sc = c[me];
    for (int s = 0; s < P; ++s) rc.push_back(c[s][me]);
    for (int t = 0; t < P; ++t)
      for (index_t i = 0; i < c[me][t]; ++i) send.push_back(payload<T>(me, t, i, round));
    index_t total = 0;
    for (index_t x : rc) total += x;
    recv.assign(static_cast<std::size_t>(total) + 2, payload<T>(-1, -1, 0, 0));
  }
};

template <class T, class C>
std::vector<T> run_exchange(C& c, const matrix& m, unsigned round) {
  exchange_buffers<T> b(m, c.rank(), round);
  comm::all_to_all_v(c, std::span<const T>(b.send), std::span<const index_t>(b.sc), std::span<T>(b.recv),
                     std::span<const index_t>(b.rc));
  return b.recv;
}

/// The hierarchical algorithm's inter-node message count, from the whole
/// count matrix: one message per (source node, destination rank on another
/// node) whose node's total for that destination is nonzero.
std::int64_t expected_hier_messages(const matrix& c, int L) {
  const int P = static_cast<int>(c.size()), N = P / L;
  std::int64_t n = 0;
  for (int src_node = 0; src_node < N; ++src_node)
    for (int t = 0; t < P; ++t) {
      if (t / L == src_node) continue;
      index_t sum = 0;
      for (int j = 0; j < L; ++j) sum += c[src_node * L + j][t];
      n += sum > 0;
    }
  return n;
}

}  // namespace

TEST_CASE_TEMPLATE("hierarchical: all_to_all_v equals the flat all_to_all_v bit for bit", T, float, double,
                   std::int64_t, std::uint8_t) {
  for (const shape& s : shapes) {
    const int P = s.P, L = s.L;  // not a structured binding: lambdas capture them
    CAPTURE(P);
    CAPTURE(L);
    local::run(
        P,
        [&](local& c) {
          hier h(c);
          CHECK(h.size() == P);
          CHECK(h.rank() == c.rank());
          CHECK(h.local_size() == L);
          CHECK(h.nodes() == P / L);
          CHECK(h.node() == c.rank() / L);
          CHECK(h.intra().size() == L);
          CHECK(h.rail().size() == P / L);
          for (unsigned round = 0; round < 8; ++round) {
            CAPTURE(round);
            const auto m = make_counts(P, 31 * round + 7 * P + L, static_cast<int>(round % 4));
            const auto flat = run_exchange<T>(c, m, round);
            const auto two_step = run_exchange<T>(h, m, round);
            CHECK(same_bits(flat, two_step));
          }
        },
        {.local_size = L});
  }
}

TEST_CASE("hierarchical: inter-node messages are local_size-fold fewer than the flat algorithm's") {
  // Relation checked, summed over ranks: hier == expected_hier_messages(counts);
  // flat <= L * hier and hier <= flat (each rail message carries the flat
  // messages of at most L sources); with every count positive,
  // flat == P (P - L) == L * hier exactly.
  for (const shape& s : shapes) {
    const int P = s.P, L = s.L;  // not a structured binding: lambdas capture them
    CAPTURE(P);
    CAPTURE(L);
    for (int kind = 0; kind < 4; ++kind) {
      CAPTURE(kind);
      const auto m = make_counts(P, 101 + kind, kind);
      std::atomic<std::int64_t> hier_total{0}, flat_total{0};
      local::run(
          P,
          [&](local& c) {
            hier h(c);
            run_exchange<float>(h, m, 0);
            hier_total += h.inter_node_messages();
            flat_total += comm::flat_inter_node_messages(std::span<const index_t>(m[c.rank()]), c.rank(), L);
            const auto first = h.inter_node_messages();
            run_exchange<float>(h, m, 1);  // accumulates over calls
            CHECK(h.inter_node_messages() == 2 * first);
            h.reset_inter_node_messages();
            CHECK(h.inter_node_messages() == 0);
          },
          {.local_size = L});
      const std::int64_t hier_n = hier_total, flat_n = flat_total;
      CHECK(hier_n == expected_hier_messages(m, L));
      CHECK(hier_n <= flat_n);
      CHECK(flat_n <= std::int64_t{L} * hier_n);
      if (kind == 1) {
        CHECK(flat_n == std::int64_t{P} * (P - L));
        CHECK(flat_n == std::int64_t{L} * hier_n);
      }
      if (kind == 2 || L == P) CHECK(hier_n == 0);
      if (L == 1) CHECK(hier_n == flat_n);
    }
  }
  CHECK_THROWS_AS(comm::flat_inter_node_messages(std::span<const index_t>(std::vector<index_t>(4)), 0, 3),
                  semoe::error);
  CHECK_THROWS_AS(comm::flat_inter_node_messages(std::span<const index_t>(std::vector<index_t>(4)), 4, 2),
                  semoe::error);
}

TEST_CASE("hierarchical: async exchanges and forwarded collectives complete in issue order, waited in any order") {
  local::run(
      8,
      [](local& c) {
        hier h(c);
        const int me = c.rank(), P = 8;
        const auto m1 = make_counts(P, 5, 0), m2 = make_counts(P, 6, 3);
        exchange_buffers<float> b1(m1, me, 1);
        exchange_buffers<std::int64_t> b2(m2, me, 2);
        std::vector<double> sum{double(me)};
        std::vector<int> mine{me}, all(P, -1);

        auto r1 = h.all_to_all_v_async(std::span<const float>(b1.send), std::span<const index_t>(b1.sc),
                                       std::span<float>(b1.recv), std::span<const index_t>(b1.rc));
        auto r2 = h.all_reduce_async(std::span<double>(sum));
        auto r3 = h.all_to_all_v_async(std::span<const std::int64_t>(b2.send), std::span<const index_t>(b2.sc),
                                       std::span<std::int64_t>(b2.recv), std::span<const index_t>(b2.rc));
        auto r4 = h.all_gather_async(std::span<const int>(mine), std::span<int>(all));
        CHECK(r1.pending());
        if (me % 2 == 0) {
          r4.wait(), r3.wait(), r2.wait(), r1.wait();
        } else {
          r1.wait(), r2.wait(), r3.wait(), r4.wait();
        }
        CHECK(sum[0] == P * (P - 1) / 2.0);
        for (int p = 0; p < P; ++p) CHECK(all[p] == p);
        CHECK(same_bits(b1.recv, run_exchange<float>(c, m1, 1)));
        CHECK(same_bits(b2.recv, run_exchange<std::int64_t>(c, m2, 2)));
        { auto dropped = h.all_to_all_v_async(std::span<const float>(b1.send), std::span<const index_t>(b1.sc),
                                              std::span<float>(b1.recv), std::span<const index_t>(b1.rc)); }
        CHECK(same_bits(b1.recv, run_exchange<float>(c, m1, 1)));  // a dropped request completed
      },
      {.local_size = 2});
}

TEST_CASE("hierarchical: forwarded collectives and split behave as on the world") {
  local::run(
      8,
      [](local& c) {
        hier h(c);
        const int me = c.rank();
        std::vector<float> x{float(me), 1.0f};
        comm::all_reduce(h, std::span<float>(x));
        CHECK(x == std::vector<float>{28.0f, 8.0f});
        std::vector<double> in(16), out(2);
        for (std::size_t i = 0; i < in.size(); ++i) in[i] = double(i) + me;
        comm::reduce_scatter(h, std::span<const double>(in), std::span<double>(out));
        CHECK(out[0] == 8.0 * double(2 * me) + 28.0);
        std::vector<int> b(3, me == 5 ? 9 : 0);
        comm::broadcast(h, std::span<int>(b), 5);
        CHECK(b == std::vector<int>(3, 9));
        h.barrier();

        // The first and second halves: 2 nodes of 2 ranks each.
        hier half = h.split(me / 4, me);
        CHECK(half.size() == 4);
        CHECK(half.local_size() == 2);
        CHECK(half.nodes() == 2);
        CHECK(half.rank() == me % 4);
        // Even and odd ranks: one rank per node, so the rail is the group.
        hier parity = h.split(me % 2, me);
        CHECK(parity.size() == 4);
        CHECK(parity.local_size() == 1);
        for (unsigned round = 0; round < 3; ++round) {
          const auto m = make_counts(4, 50 + round, int(round));
          CHECK(same_bits(run_exchange<float>(half, m, round), run_exchange<float>(half.world(), m, round)));
          CHECK(same_bits(run_exchange<float>(parity, m, round), run_exchange<float>(parity.world(), m, round)));
        }
      },
      {.local_size = 2});
}

TEST_CASE("hierarchical: bad sizes are semoe::errors that name the argument") {
  local::run(
      4,
      [](local& c) {
        hier h(c);
        std::vector<float> send(6), recv(6);
        std::vector<index_t> ok(4, 1), three(3, 1), neg{1, -1, 1, 1}, big(4, 2);
        auto a2a = [&](const std::vector<index_t>& sc, const std::vector<index_t>& rc) {
          return h.all_to_all_v_async(std::span<const float>(send), std::span<const index_t>(sc),
                                      std::span<float>(recv), std::span<const index_t>(rc));
        };
        CHECK_THROWS_WITH_AS(a2a(three, ok), doctest::Contains("send_counts has 3 entries"), semoe::error);
        CHECK_THROWS_WITH_AS(a2a(ok, three), doctest::Contains("recv_counts has 3 entries"), semoe::error);
        CHECK_THROWS_WITH_AS(a2a(neg, ok), doctest::Contains("send_counts[1] = -1"), semoe::error);
        CHECK_THROWS_WITH_AS(a2a(ok, big), doctest::Contains("recv_counts total 8 elements but recv holds 6"),
                             semoe::error);
        // Checked before anything was queued: the world is still in step.
        a2a(ok, ok).wait();
      },
      {.local_size = 2});

  // Groups that do not match the topology.
  CHECK_THROWS_WITH_AS(local::run(
                           4, [](local& c) { hier h(c, c, c); }, {.local_size = 2}),
                       doctest::Contains("the intra-node group has 4 ranks"), semoe::error);

  // A receiver whose node total is wrong fails in the rail step on every rank.
  auto wrong_total = [](local& c) {
    hier h(c);
    std::vector<index_t> sc(4, 1), rc(4, 1);
    if (c.rank() == 3) rc[0] = 2;
    std::vector<float> send(4), recv(5);
    comm::all_to_all_v(h, std::span<const float>(send), std::span<const index_t>(sc), std::span<float>(recv),
                       std::span<const index_t>(rc));
  };
  CHECK_THROWS_WITH_AS(local::run(4, wrong_total, {.local_size = 2}), doctest::Contains("rail data step, world rank 3"),
                       semoe::error);

  // A node total that is right but split wrongly among the node's ranks is
  // caught when verify_counts asks for the per-source counts.
  auto wrong_split = [](local& c) {
    hier h(c, {.verify_counts = true});
    // Rank 0 sends 2 to rank 2 and none to rank 3, rank 1 the reverse: each
    // receiver's total from node 0 is the 2 it expects, split 1 + 1.
    std::vector<index_t> sc(4, 1), rc(4, 1);
    if (c.rank() == 0) sc = {1, 1, 2, 0};
    if (c.rank() == 1) sc = {1, 1, 0, 2};
    std::vector<float> send(4), recv(4);
    comm::all_to_all_v(h, std::span<const float>(send), std::span<const index_t>(sc), std::span<float>(recv),
                       std::span<const index_t>(rc));
  };
  CHECK_THROWS_WITH_AS(local::run(4, wrong_split, {.local_size = 2}),
                       doctest::Contains("rank 0 sends 2 elements to rank 2, which expects 1"), semoe::error);
}
