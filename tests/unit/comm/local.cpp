#include "semoe/comm/local.hpp"

#include "collective_checks.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

using semoe::index_t;
using semoe::comm::local;
using semoe::comm::reduce_op;
namespace comm = semoe::comm;

namespace {

constexpr int world_sizes[] = {1, 2, 3, 4};

/// counts[src][dst]: how many elements src sends dst; about a third are 0.
std::vector<std::vector<index_t>> random_counts(int P, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(-3, 6);
  std::vector<std::vector<index_t>> c(P, std::vector<index_t>(P));
  for (auto& row : c)
    for (auto& x : row) x = std::max(0, d(rng));
  return c;
}

/// The value element i of the message src -> dst carries.
template <class T>
T payload(int src, int dst, index_t i) {
  return static_cast<T>(src * 10000 + dst * 1000 + i);
}

/// The data rank r contributes to a reduction (collective_checks.hpp): mixed
/// signs and magnitudes, so a float sum depends on its order.
template <class T>
std::vector<T> reduce_input(int r, std::size_t n) {
  return semoe::test::reduce_input<T>(r, n, 0);
}

template <class T>
std::vector<T> serial_reduce(int P, std::size_t n, reduce_op op) {
  auto acc = reduce_input<T>(0, n);
  for (int p = 1; p < P; ++p) {
    const auto x = reduce_input<T>(p, n);
    for (std::size_t i = 0; i < n; ++i)
      acc[i] = op == reduce_op::sum ? T(acc[i] + x[i]) : op == reduce_op::max ? std::max(acc[i], x[i])
                                                                              : std::min(acc[i], x[i]);
  }
  return acc;
}

}  // namespace

TEST_CASE_TEMPLATE("local: all_to_all_v delivers every (src, dst, index) with variable and zero counts", T,
                   std::int64_t, double, float) {
  for (int P : world_sizes) {
    CAPTURE(P);
    local::run(P, [&](local& c) {
      const int me = c.rank();
      for (unsigned round = 0; round < 4; ++round) {
        const auto counts = random_counts(P, 17 * round + P);
        std::vector<index_t> send_counts = counts[me], recv_counts(P);
        std::vector<T> send;
        for (int dst = 0; dst < P; ++dst)
          for (index_t i = 0; i < counts[me][dst]; ++i) send.push_back(payload<T>(me, dst, i));
        index_t total = 0;
        for (int src = 0; src < P; ++src) total += recv_counts[src] = counts[src][me];
        std::vector<T> recv(static_cast<std::size_t>(total) + 2, T(-1));  // 2 spare slots stay untouched
        comm::all_to_all_v(c, std::span<const T>(send), std::span<const index_t>(send_counts), std::span<T>(recv),
                           std::span<const index_t>(recv_counts));
        std::vector<T> want;
        for (int src = 0; src < P; ++src)
          for (index_t i = 0; i < counts[src][me]; ++i) want.push_back(payload<T>(src, me, i));
        want.push_back(T(-1));
        want.push_back(T(-1));
        CHECK(recv == want);
      }
    });
  }
}

TEST_CASE_TEMPLATE("local: all_reduce gives every rank the serial result in rank order", T, float, double,
                   std::int64_t, std::uint64_t) {
  for (int P : world_sizes)
    for (reduce_op op : {reduce_op::sum, reduce_op::max, reduce_op::min})
      for (std::size_t n : {0, 1, 3, 4, 37, 1000}) {
        CAPTURE(P);
        CAPTURE(int(op));
        CAPTURE(n);
        std::vector<std::vector<T>> out(P);
        local::run(P, [&](local& c) {
          auto x = reduce_input<T>(c.rank(), n);
          comm::all_reduce(c, std::span<T>(x), op);
          out[c.rank()] = std::move(x);
        });
        const auto want = serial_reduce<T>(P, n, op);
        for (int r = 0; r < P; ++r) CHECK(out[r] == want);  // exact, bit for bit
      }
}

TEST_CASE("local: all_gather concatenates in rank order") {
  for (int P : world_sizes)
    for (std::size_t m : {0, 1, 5}) {
      CAPTURE(P);
      CAPTURE(m);
      local::run(P, [&](local& c) {
        std::vector<int> mine(m), all(m * P, -1);
        for (std::size_t i = 0; i < m; ++i) mine[i] = c.rank() * 100 + int(i);
        comm::all_gather(c, std::span<const int>(mine), std::span<int>(all));
        for (int p = 0; p < P; ++p)
          for (std::size_t i = 0; i < m; ++i) CHECK(all[p * m + i] == p * 100 + int(i));
        std::vector<int> wrong(m * P + 1);
        CHECK_THROWS_AS(comm::all_gather(c, std::span<const int>(mine), std::span<int>(wrong)), semoe::error);
      });
    }
}

TEST_CASE("local: reduce_scatter gives rank r the reduction of everyone's block r") {
  for (int P : world_sizes)
    for (reduce_op op : {reduce_op::sum, reduce_op::max}) {
      CAPTURE(P);
      CAPTURE(int(op));
      const std::size_t m = 6;
      local::run(P, [&](local& c) {
        const int me = c.rank();
        auto in = [P](int r) {
          std::vector<double> v(m * P);
          for (std::size_t i = 0; i < v.size(); ++i) v[i] = double((r + 1) * (i + 3) % 11) - 0.25 * r;
          return v;
        };
        const auto mine = in(me);
        std::vector<double> out(m, -99);
        comm::reduce_scatter(c, std::span<const double>(mine), std::span<double>(out), op);
        for (std::size_t i = 0; i < m; ++i) {
          double want = in(0)[me * m + i];
          for (int p = 1; p < P; ++p)
            want = op == reduce_op::sum ? want + in(p)[me * m + i] : std::max(want, in(p)[me * m + i]);
          CHECK(out[i] == want);
        }
      });
    }
}

TEST_CASE("local: broadcast from every root") {
  for (int P : world_sizes) {
    CAPTURE(P);
    local::run(P, [&](local& c) {
      for (int root = 0; root < P; ++root) {
        std::vector<float> data(9);
        for (std::size_t i = 0; i < data.size(); ++i) data[i] = c.rank() == root ? float(root * 10 + i) : -1.0f;
        comm::broadcast(c, std::span<float>(data), root);
        for (std::size_t i = 0; i < data.size(); ++i) CHECK(data[i] == float(root * 10 + i));
      }
      std::vector<float> none;
      comm::broadcast(c, std::span<float>(none), P - 1);
      std::vector<float> x(1);
      CHECK_THROWS_AS(comm::broadcast(c, std::span<float>(x), P), semoe::error);
      CHECK_THROWS_AS(comm::broadcast(c, std::span<float>(x), -1), semoe::error);
    });
  }
}

TEST_CASE("local: barrier holds every rank until all have arrived") {
  for (int P : world_sizes) {
    CAPTURE(P);
    constexpr int rounds = 50;
    std::vector<std::atomic<int>> arrived(rounds);
    local::run(P, [&](local& c) {
      for (int k = 0; k < rounds; ++k) {
        arrived[k].fetch_add(1);
        c.barrier();
        CHECK(arrived[k].load() == P);
      }
    });
  }
}

TEST_CASE("local: async collectives in flight, waited in any order, complete correctly") {
  for (int P : world_sizes) {
    CAPTURE(P);
    local::run(P, [&](local& c) { semoe::test::check_async_in_flight(c); });
  }
}

TEST_CASE("local: a request still completes after its handle was moved") {
  local::run(2, [&](local& c) {
    std::vector<int> x{c.rank() + 1};
    auto r = c.all_reduce_async(std::span<int>(x));
    local moved = std::move(c);
    r.wait();
    CHECK(x[0] == 3);
    std::vector<int> y{1};
    comm::all_reduce(moved, std::span<int>(y));
    CHECK(y[0] == 2);
    c = moved;  // run() drains the original handle after f returns
  });
}

TEST_CASE("local: split into even and odd groups ordered by key, then collectives inside each group") {
  for (int P : world_sizes) {
    CAPTURE(P);
    local::run(P, [&](local& c) {
      const int me = c.rank(), color = me % 2;
      const int members = (P - color + 1) / 2;  // ranks of my parity
      // key = -rank: the highest world rank comes first in its group.
      local g = c.split(color, -me);
      REQUIRE(g.size() == members);
      const int highest = color + 2 * (members - 1);
      CHECK(g.rank() == (highest - me) / 2);
      std::vector<int> mine{me}, order(members);
      comm::all_gather(g, std::span<const int>(mine), std::span<int>(order));
      for (int i = 0; i < members; ++i) CHECK(order[i] == highest - 2 * i);

      std::vector<std::int64_t> s{me};
      comm::all_reduce(g, std::span<std::int64_t>(s));
      std::int64_t want = 0;
      for (int r = color; r < P; r += 2) want += r;
      CHECK(s[0] == want);

      // Equal keys keep world order; the world still works between group calls.
      local h = c.split(color, 0);
      CHECK(h.rank() == me / 2);
      c.barrier();
      std::vector<int> one{1};
      comm::all_reduce(c, std::span<int>(one));
      CHECK(one[0] == P);
      comm::broadcast(h, std::span<int>(mine), 0);
      CHECK(mine[0] == color);
    });
  }
}

TEST_CASE("local: topology with two ranks per node") {
  local::run(4, [](local& c) {
    CHECK(c.size() == 4);
    CHECK(c.local_size() == 2);
    CHECK(c.local_rank() == c.rank() % 2);
    CHECK(c.node() == c.rank() / 2);
    // Within a node the group is one node; across nodes, one rank per node.
    local same_node = c.split(c.node(), c.rank());
    CHECK(same_node.size() == 2);
    CHECK(same_node.local_size() == 2);
    CHECK(same_node.local_rank() == c.local_rank());
    local across = c.split(c.local_rank(), c.rank());
    CHECK(across.size() == 2);
    CHECK(across.local_size() == 1);
    CHECK(across.node() == c.node());
  }, {.local_size = 2});

  local::run(3, [](local& c) {  // default: one node
    CHECK(c.local_size() == 3);
    CHECK(c.local_rank() == c.rank());
    CHECK(c.node() == 0);
  });
  CHECK_THROWS_WITH_AS(local::make_world(4, {.local_size = 3}),
                       "semoe::comm::local: local_size = 3 does not divide ranks = 4", semoe::error);
  CHECK_THROWS_AS(local::make_world(0), semoe::error);
}

TEST_CASE("local: a count mismatch fails on the receiver and on every peer instead of hanging") {
  // Peers still copy from the failing rank's buffers when it throws: they
  // must be done before it unwinds and frees them (ASan shows a violation).
  constexpr index_t n = 50000;
  for (int P : world_sizes)
    for (int round = 0; round < 3; ++round) {
      CAPTURE(P);
      CAPTURE(round);
      const int victim = P - 1;
      std::vector<std::string> seen(P);
      auto job = [&](local& c) {
        const int me = c.rank();
        std::vector<index_t> sc(P, n), rc(P, n);
        if (me == victim) rc[0] = n + 1;
        std::vector<float> send(n * P), recv(n * P + 1);
        try {
          comm::all_to_all_v(c, std::span<const float>(send), std::span<const index_t>(sc), std::span<float>(recv),
                             std::span<const index_t>(rc));
        } catch (const semoe::error& e) {
          seen[me] = e.what();
          throw;
        }
      };
      // One rank alone mismatches with itself, which is caught before any copy.
      const std::string want = P == 1 ? std::string("rank 0 sends 50000 elements to itself but expects 50001")
                                      : "rank 0 sends 50000 elements to rank " + std::to_string(victim) +
                                            ", which expects 50001";
      CHECK_THROWS_WITH_AS(local::run(P, job), doctest::Contains(want.c_str()), semoe::error);
      for (int r = 0; r < P; ++r) {
        CAPTURE(r);
        CHECK(seen[r].find(r == victim ? want : "was aborted") != std::string::npos);
      }
    }
}

TEST_CASE("local: ranks that disagree on the collective, type, size, op or root fail with a message") {
  auto different_kinds = [](local& c) {
    if (c.rank() == 0) {
      std::vector<float> x(1);
      comm::all_reduce(c, std::span<float>(x));
    } else {
      c.barrier();
    }
  };
  CHECK_THROWS_WITH_AS(local::run(3, different_kinds),
                       doctest::Contains("every rank must issue the same collectives in the same order"),
                       semoe::error);
  auto different_types = [](local& c) {
    std::vector<double> d(1);
    std::vector<float> f(1);
    if (c.rank() == 0)
      comm::all_reduce(c, std::span<double>(d));
    else
      comm::all_reduce(c, std::span<float>(f));
  };
  CHECK_THROWS_AS(local::run(2, different_types), semoe::error);
  auto different_sizes = [](local& c) {
    std::vector<double> d(static_cast<std::size_t>(c.rank()) + 1);
    comm::all_reduce(c, std::span<double>(d));
  };
  CHECK_THROWS_WITH_AS(local::run(2, different_sizes), doctest::Contains("all_reduce: rank"), semoe::error);
  auto different_ops = [](local& c) {
    std::vector<int> x(4), y(1);
    comm::reduce_scatter(c, std::span<const int>(x), std::span<int>(y), c.rank() == 2 ? reduce_op::min : reduce_op::sum);
  };
  CHECK_THROWS_WITH_AS(local::run(4, different_ops), doctest::Contains("reduces with"), semoe::error);
  auto different_roots = [](local& c) {
    std::vector<int> x(1, c.rank());
    comm::broadcast(c, std::span<int>(x), c.rank() == 1 ? 1 : 0);
  };
  CHECK_THROWS_WITH_AS(local::run(3, different_roots), doctest::Contains("while an earlier rank used root"),
                       semoe::error);
}

TEST_CASE("local: a rank that throws outside a collective releases peers blocked in one") {
  for (int P : world_sizes) {
    CAPTURE(P);
    std::vector<std::string> peer_error(P);
    auto job = [&](local& c) {
      if (c.rank() == P - 1) {
        c.barrier();
        throw std::runtime_error("rank failed on purpose");
      }
      try {
        c.barrier();
        c.barrier();  // never completes: rank P - 1 is gone
      } catch (const semoe::error& e) {
        peer_error[c.rank()] = e.what();
        throw;
      }
    };
    CHECK_THROWS_WITH_AS(local::run(P, job), "rank failed on purpose", std::runtime_error);
    for (int r = 0; r < P - 1; ++r) CHECK(peer_error[r].find("rank failed on purpose") != std::string::npos);
  }
  // Not every exception derives from std::exception.
  CHECK_THROWS_AS(local::run(2, [](local& c) {
                    if (c.rank() == 0) throw 42;
                    c.barrier();
                  }),
                  int);
}

// --- the Communicator concept, both ways -----------------------------------

static_assert(comm::Communicator<local>);

namespace {

template <bool WithAllGather, class Tag = comm::comm_tag>
struct fake_comm {
  using policy_kind = Tag;
  int rank() const { return 0; }
  int size() const { return 1; }
  int local_rank() const { return 0; }
  int local_size() const { return 1; }
  template <class T>
  comm::request all_to_all_v_async(std::span<const T>, std::span<const index_t>, std::span<T>,
                                   std::span<const index_t>) {
    return {};
  }
  template <class T>
  comm::request all_reduce_async(std::span<T>, reduce_op) {
    return {};
  }
  template <class T>
  comm::request all_gather_async(std::span<const T>, std::span<T>)
    requires WithAllGather
  {
    return {};
  }
  template <class T>
  comm::request reduce_scatter_async(std::span<const T>, std::span<T>, reduce_op) {
    return {};
  }
  template <class T>
  comm::request broadcast_async(std::span<T>, int) {
    return {};
  }
  void barrier() {}
  fake_comm split(int, int) { return {}; }
};

}  // namespace

static_assert(comm::Communicator<fake_comm<true>>);
static_assert(!comm::Communicator<fake_comm<false>>, "missing all_gather_async must be rejected");
static_assert(!comm::Communicator<fake_comm<true, void>>, "a communicator must say it is one");
static_assert(!comm::Communicator<int>);

TEST_CASE("request: wait is idempotent and runs its completion once") {
  int runs = 0;
  {
    comm::request r([&] { ++runs; });
    CHECK(r.pending());
    r.wait();
    r.wait();
    CHECK_FALSE(r.pending());
    comm::request moved(comm::request([&] { ++runs; }));
    comm::request target([&] { runs += 10; });
    target = std::move(moved);  // the old completion of target runs first
    CHECK(runs == 11);
    CHECK_FALSE(moved.pending());
  }
  CHECK(runs == 12);  // the destructor completes what is left
  comm::request empty;
  CHECK_FALSE(empty.pending());
  empty.wait();
}

TEST_CASE("a failure aborts collectives of split groups too, so no rank hangs in a subgroup") {
  // Ranks 2 and 3 wait in a collective of their own group; rank 0 fails
  // outside any collective. run() must return with rank 0's error.
  auto run = [] {
    semoe::comm::local::run(4, [](semoe::comm::local& c) {
      auto group = c.split(c.rank() / 2, c.rank());
      if (c.rank() == 0) throw semoe::error("rank 0 gave up");
      group.barrier();  // rank 1 waits here for rank 0, which has failed
      if (c.rank() >= 2) c.barrier();  // ranks 2, 3 wait in the world for ranks 0, 1
    });
  };
  CHECK_THROWS_WITH_AS(run(), doctest::Contains("rank 0 gave up"), semoe::error);
}

TEST_CASE("local: an async collective completes while the caller computes, without a wait") {
  // Each rank issues an all-gather and then only computes; the collective
  // must finish on its own (comm::local's progress thread), as the layer-ahead
  // gather of prefetch::two_d needs. wait() then returns at once.
  std::vector<double> finished_after(2, -1);
  std::vector<std::vector<float>> got(2);
  local::run(2, [&](local& c) {
    const int me = c.rank();
    std::vector<float> mine{float(me + 1)}, all(2);
    const auto t0 = std::chrono::steady_clock::now();
    auto req = c.all_gather_async(std::span<const float>(mine), std::span<float>(all));
    double x = 0;  // compute, checking now and then
    while (!req.ready() && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
      for (int i = 0; i < 1000; ++i) x += std::sqrt(double(i));
    if (req.ready()) finished_after[me] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    req.wait();
    got[me] = all;
    CHECK(x > 0);
  });
  for (int r = 0; r < 2; ++r) {
    CAPTURE(r);
    CHECK(finished_after[r] >= 0);  // it finished before this rank waited
    CHECK(got[r] == std::vector<float>{1, 2});
  }
  MESSAGE("the all-gather finished " << finished_after[0] << " s and " << finished_after[1]
                                     << " s after it was issued, while both ranks computed");
}
