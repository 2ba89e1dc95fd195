// Tests of comm::tcp: the same results as comm::local bit for bit (ranks as
// threads of this process, and as forked processes), chunked multi-MiB
// exchanges, async requests, split groups, env parsing, and reliability:
// strangers, hostile frames, a killed or frozen rank. Loopback only; every
// test is bounded in time by the communicator's timeout.
#include "semoe/comm/tcp.hpp"

#include <doctest/doctest.h>

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "semoe/comm/hierarchical.hpp"
#include "semoe/comm/local.hpp"

#include "collective_checks.hpp"

using semoe::test::a2a;
using semoe::test::bytes;
using semoe::test::everything;
using semoe::test::local_reference;
using semoe::test::put;
using semoe::test::reduce_input;

using semoe::index_t;
using semoe::comm::local;
using semoe::comm::reduce_op;
using semoe::comm::tcp;
using semoe::comm::tcp_options;
namespace comm = semoe::comm;
namespace asio = boost::asio;
using namespace std::chrono_literals;

static_assert(comm::Communicator<tcp>);

namespace {

constexpr const char* test_secret = "semoe-test-secret";

/// A port nobody listens on right now (the kernel's pick for port 0).
int free_port() {
  asio::io_context io;
  asio::ip::tcp::acceptor a(io, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  return a.local_endpoint().port();
}

tcp_options job_options(int P, int port, tcp_options base = {}) {
  base.size = P;
  base.master_addr = "127.0.0.1";
  base.master_port = port;
  if (base.secret.empty()) base.secret = test_secret;
  if (base.timeout == 60s) base.timeout = 20s;  // tests: bounded, but generous on a loaded machine
  return base;
}

/// Run f(comm) on P thread-ranks, each with its own tcp communicator and
/// io thread. Rethrows the first failure (a root cause before "aborted").
template <class F>
void run_tcp(int P, F&& f, tcp_options base = {}) {
  const tcp_options o = job_options(P, free_port(), base);
  std::vector<std::exception_ptr> errors(P);
  std::vector<std::thread> threads;
  for (int r = 0; r < P; ++r)
    threads.emplace_back([&, r] {
      try {
        tcp_options mine = o;
        mine.rank = r;
        tcp c(mine);
        f(c);
        c.drain();
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (!e) continue;
    try {
      std::rethrow_exception(e);
    } catch (const semoe::error& err) {
      if (std::string(err.what()).find("aborted the job") == std::string::npos) throw;
    }
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace

TEST_CASE("tcp: every collective gives exactly comm::local's bytes (P = 1..4 thread-ranks)") {
  for (int P : {1, 2, 3, 4}) {
    CAPTURE(P);
    const auto ref = local_reference(P, 11 + P);
    std::vector<bytes> got(P);
    run_tcp(P, [&](tcp& c) { got[c.rank()] = everything(c, 11 + P); });
    for (int r = 0; r < P; ++r) {
      CAPTURE(r);
      CHECK(got[r].size() == ref[r].size());
      CHECK(got[r] == ref[r]);  // bit for bit
    }
  }
}

TEST_CASE("tcp: multi-MiB exchanges are chunked and land intact") {
  // 64 KiB frames: a 3 MiB message is 48+ frames, interleaved across peers.
  tcp_options o;
  o.chunk_bytes = 64 << 10;
  const int P = 3;
  std::vector<bytes> got(P), ref(P);
  local::run(P, [&](local& c) { ref[c.rank()] = semoe::test::large_exchanges(c); });
  run_tcp(P, [&](tcp& c) { got[c.rank()] = semoe::test::large_exchanges(c); }, o);
  for (int r = 0; r < P; ++r) {
    CAPTURE(r);
    CHECK(got[r].size() > (std::size_t{8} << 20));
    CHECK(got[r] == ref[r]);
  }
}

TEST_CASE("tcp: async collectives in flight, waited in any order, complete correctly") {
  for (int P : {2, 3, 4}) {
    CAPTURE(P);
    run_tcp(P, [&](tcp& c) { semoe::test::check_async_in_flight(c); });
  }
}

TEST_CASE("tcp: a rank may run ahead: collectives issued before a peer waits on its own") {
  // Rank 0 issues three collectives and only then waits; the others wait on
  // each before issuing the next. Early frames are buffered, never deadlock.
  run_tcp(3, [](tcp& c) {
    std::vector<float> a(50000, 1.f), b(3, float(c.rank())), all(9);
    std::vector<float> mine{float(c.rank())}, g(3);
    if (c.rank() == 0) {
      auto r1 = c.all_reduce_async(std::span<float>(a));
      auto r2 = c.all_gather_async(std::span<const float>(b), std::span<float>(all));
      auto r3 = c.all_gather_async(std::span<const float>(mine), std::span<float>(g));
      r1.wait(), r2.wait(), r3.wait();
    } else {
      std::this_thread::sleep_for(50ms);
      comm::all_reduce(c, std::span<float>(a));
      comm::all_gather(c, std::span<const float>(b), std::span<float>(all));
      comm::all_gather(c, std::span<const float>(mine), std::span<float>(g));
    }
    CHECK(a[49999] == 3.f);
    CHECK(all == std::vector<float>{0, 0, 0, 1, 1, 1, 2, 2, 2});
    CHECK(g == std::vector<float>{0, 1, 2});
  });
}

TEST_CASE("tcp: a rank that runs ahead with large messages parks them until the receiver posts (clear to send)") {
  // Rank 0 issues three 1 MiB-per-peer all-to-alls at once; the others start
  // 100 ms later. Only each message's eager part may arrive early and be
  // buffered; the rest waits for the receiver's clear-to-send and lands in
  // place. Before clear-to-send, whole messages were buffered.
  tcp_options o;
  o.eager_bytes = 16 << 10;
  o.chunk_bytes = 64 << 10;
  const int P = 3;
  const index_t n = (1 << 20) / sizeof(float);
  run_tcp(P, [&](tcp& c) {
    std::vector<std::vector<float>> send(3), recv(3);
    const std::vector<index_t> counts(P, n);
    for (int i = 0; i < 3; ++i) {
      send[i].resize(std::size_t(n) * P);
      for (std::size_t j = 0; j < send[i].size(); ++j) send[i][j] = float(c.rank() * 1000 + i * 100) + float(j % 97);
      recv[i].assign(send[i].size(), -1.f);
    }
    auto issue = [&](int i) {
      return c.all_to_all_v_async(std::span<const float>(send[i]), std::span<const index_t>(counts),
                                  std::span<float>(recv[i]), std::span<const index_t>(counts));
    };
    if (c.rank() == 0) {
      auto a = issue(0), b = issue(1), d = issue(2);
      a.wait(), b.wait(), d.wait();
    } else {
      std::this_thread::sleep_for(100ms);
      for (int i = 0; i < 3; ++i) issue(i).wait();
    }
    for (int i = 0; i < 3; ++i)
      for (int q = 0; q < P; ++q)
        for (index_t j = 0; j < n; j += 4099) {
          const std::size_t from = std::size_t(c.rank()) * n + j;  // rank q's part for this rank
          CHECK(recv[i][std::size_t(q) * n + j] == float(q * 1000 + i * 100) + float(from % 97));
        }
    c.barrier();
    if (c.rank() != 0) {
      INFO("rank ", c.rank(), " buffered ", c.early_bytes(), " early bytes");
      // At most the eager parts of 3 messages from each peer that is ahead
      // (rank 0 always, the other late rank at times); without clear-to-send
      // this was whole messages, 3-4 MiB.
      CHECK(c.early_bytes() <= std::uint64_t{3} * (P - 1) * o.eager_bytes);
    }
  }, o);
}

TEST_CASE("tcp: large messages of two groups issued in opposite orders complete (no head-of-line blocking)") {
  // Rank 0 sends group A's message before group B's on the same connection;
  // rank 1 posts B first and only then A. A waits for its clear-to-send, and
  // B, behind it in the queue, must go first.
  tcp_options o;
  o.eager_bytes = 4 << 10;
  run_tcp(2, [](tcp& c) {
    tcp ga = c.split(0, c.rank()), gb = c.split(0, c.rank());
    const std::size_t n = 1 << 18;
    std::vector<float> ma(n, float(c.rank() + 1)), mb(n, float(c.rank() + 10)), aa(2 * n), ab(2 * n);
    if (c.rank() == 0) {
      auto ra = ga.all_gather_async(std::span<const float>(ma), std::span<float>(aa));
      auto rb = gb.all_gather_async(std::span<const float>(mb), std::span<float>(ab));
      rb.wait(), ra.wait();
    } else {
      gb.all_gather_async(std::span<const float>(mb), std::span<float>(ab)).wait();
      ga.all_gather_async(std::span<const float>(ma), std::span<float>(aa)).wait();
    }
    CHECK(aa[0] == 1.f);
    CHECK(aa[2 * n - 1] == 2.f);
    CHECK(ab[0] == 10.f);
    CHECK(ab[2 * n - 1] == 11.f);
  }, o);
}

TEST_CASE("tcp: split into groups, topology with two ranks per node") {
  tcp_options o;
  o.local_size = 2;
  run_tcp(4, [](tcp& c) {
    CHECK(c.size() == 4);
    CHECK(c.local_size() == 2);
    CHECK(c.local_rank() == c.rank() % 2);
    CHECK(c.node() == c.rank() / 2);
    tcp same_node = c.split(c.node(), c.rank());
    CHECK(same_node.size() == 2);
    CHECK(same_node.local_size() == 2);
    CHECK(same_node.local_rank() == c.local_rank());
    tcp across = c.split(c.local_rank(), c.rank());
    CHECK(across.size() == 2);
    CHECK(across.local_size() == 1);
    CHECK(across.node() == c.node());
    // Both groups and the world interleave on the same connections.
    std::vector<int> x{c.rank()}, y{c.rank()}, z{1};
    auto r1 = same_node.all_reduce_async(std::span<int>(x));
    auto r2 = across.all_reduce_async(std::span<int>(y));
    auto r3 = c.all_reduce_async(std::span<int>(z));
    r3.wait(), r1.wait(), r2.wait();
    CHECK(x[0] == (c.node() == 0 ? 1 : 5));
    CHECK(y[0] == (c.local_rank() == 0 ? 2 : 4));
    CHECK(z[0] == 4);
    tcp nested = across.split(0, -across.rank());  // a group of a group
    CHECK(nested.rank() == 1 - across.rank());
    nested.barrier();
  }, o);
}

TEST_CASE("tcp: the hierarchical all-to-all over tcp equals the flat one bit for bit") {
  // Its intra-node step keeps one exchange per node in flight at once; sizes
  // up to 1.7 MB per destination go past eager_bytes and chunk_bytes.
  for (auto [P, L] : {std::pair{4, 2}, std::pair{6, 3}, std::pair{6, 2}}) {
    CAPTURE(P);
    CAPTURE(L);
    tcp_options o;
    o.local_size = L;
    std::vector<bytes> flat(static_cast<std::size_t>(P)), two_step(static_cast<std::size_t>(P));
    run_tcp(
        P,
        [&](tcp& c) {
          comm::hierarchical<tcp> h(c);
          const auto me = static_cast<std::size_t>(c.rank());
          for (unsigned seed = 0; seed < 4; ++seed) {
            const int scale = seed % 2 ? 70000 : 1;
            a2a<tcp, float>(c, flat[me], 50 + seed, scale);
            a2a<comm::hierarchical<tcp>, float>(h, two_step[me], 50 + seed, scale);
          }
        },
        o);
    for (int r = 0; r < P; ++r) CHECK(flat[static_cast<std::size_t>(r)] == two_step[static_cast<std::size_t>(r)]);
  }
}

TEST_CASE("tcp: ranks that disagree fail with a message instead of hanging") {
  CHECK_THROWS_WITH_AS(run_tcp(3,
                               [](tcp& c) {
                                 if (c.rank() == 0) {
                                   std::vector<float> x(1);
                                   comm::all_reduce(c, std::span<float>(x));
                                 } else {
                                   c.barrier();
                                 }
                               }),
                       doctest::Contains("every rank must issue the same collectives in the same order"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(run_tcp(2,
                               [](tcp& c) {
                                 std::vector<index_t> sc(2, 5), rc(2, 5);
                                 if (c.rank() == 1) rc[0] = 6;
                                 std::vector<float> s(10), r(11);
                                 comm::all_to_all_v(c, std::span<const float>(s), std::span<const index_t>(sc),
                                                    std::span<float>(r), std::span<const index_t>(rc));
                               }),
                       doctest::Contains("rank 0 sends 5 elements to rank 1, which expects 6"), semoe::error);
  // The same past eager_bytes: the sender holds the rest until a
  // clear-to-send for its size, and the first frame lets the receiver name
  // the mismatch at once (not after the 20 s timeout).
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(run_tcp(2,
                               [](tcp& c) {
                                 const index_t n = 200000;  // 800 KB, eager part 256 KiB
                                 std::vector<index_t> sc(2, n), rc(2, n);
                                 if (c.rank() == 1) rc[0] = n + 1000;
                                 std::vector<float> s(2 * n), r(2 * n + 1000);
                                 comm::all_to_all_v(c, std::span<const float>(s), std::span<const index_t>(sc),
                                                    std::span<float>(r), std::span<const index_t>(rc));
                               }),
                       doctest::Contains("rank 0 sends 200000 elements to rank 1, which expects 201000"), semoe::error);
  CHECK(std::chrono::steady_clock::now() - t0 < 10s);
  CHECK_THROWS_WITH_AS(run_tcp(2,
                               [](tcp& c) {
                                 std::vector<int> x(1, c.rank());
                                 comm::broadcast(c, std::span<int>(x), c.rank());
                               }),
                       doctest::Contains("root"), semoe::error);
  CHECK_THROWS_WITH_AS(run_tcp(2,
                               [](tcp& c) {
                                 std::vector<double> d(1);
                                 std::vector<float> f(1);
                                 if (c.rank() == 0)
                                   comm::all_reduce(c, std::span<double>(d));
                                 else
                                   comm::all_reduce(c, std::span<float>(f));
                               }),
                       doctest::Contains("elements"), semoe::error);
}

TEST_CASE("tcp: a rank that fails with frames unread still delivers its reason to every peer") {
  // Rank 1 names a size mismatch while rank 0's eager part sits unread in
  // its socket and its own 4 MB message to rank 0 is on the way. Closing a
  // socket with unread bytes resets the connection, which would drop the
  // tail of that message and the abort frame with it: rank 0 would report a
  // truncated frame instead of the cause. Repeated: it was a race.
  for (int round = 0; round < 8; ++round) {
    CAPTURE(round);
    const tcp_options o = job_options(2, free_port(), {});
    std::vector<std::string> what(2);
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r)
      threads.emplace_back([&, r] {
        try {
          tcp_options mine = o;
          mine.rank = r;
          tcp c(mine);
          const index_t n = 1 << 20;
          std::vector<index_t> sc(2, n), rc(2, n);
          if (r == 1) rc[0] = n + 1000;
          std::vector<float> s(2 * n), got(2 * n + 1000);
          comm::all_to_all_v(c, std::span<const float>(s), std::span<const index_t>(sc), std::span<float>(got),
                             std::span<const index_t>(rc));
        } catch (const semoe::error& e) {
          what[r] = e.what();
        }
      });
    for (auto& t : threads) t.join();
    CHECK(what[1].find("rank 0 sends 1048576 elements to rank 1, which expects 1049576") != std::string::npos);
    CHECK(what[0].find("rank 1 aborted the job") != std::string::npos);
    CHECK(what[0].find("which expects 1049576") != std::string::npos);
  }
}

// --- processes --------------------------------------------------------------

namespace {

/// Fork one child per rank running `child(rank, port)` (its return value is
/// the exit status); returns the statuses. Children that outlive `limit` are
/// killed, so the test never hangs; rank `reap` (a frozen one) is killed as
/// soon as every other rank has exited.
template <class Child>
std::vector<int> fork_ranks(int P, Child child, std::chrono::seconds limit = 60s, int reap = -1) {
  const int port = free_port();
  std::vector<pid_t> pids;
  for (int r = 0; r < P; ++r) {
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      int rc = 99;
      try {
        rc = child(r, port);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: unexpected exception: %s\n", r, e.what());
        rc = 98;
      }
      std::fflush(stderr);
      _exit(rc);
    }
    pids.push_back(pid);
  }
  std::vector<int> status(P, -1);
  const auto deadline = std::chrono::steady_clock::now() + limit;
  int left = P;
  while (left > 0) {
    for (int r = 0; r < P; ++r) {
      if (status[r] != -1) continue;
      int st = 0;
      if (waitpid(pids[r], &st, WNOHANG) == pids[r]) {
        status[r] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        --left;
      }
    }
    if (reap >= 0 && left == 1 && status[reap] == -1) kill(pids[reap], SIGKILL);
    if (left > 0 && std::chrono::steady_clock::now() > deadline) {
      for (int r = 0; r < P; ++r)
        if (status[r] == -1) kill(pids[r], SIGKILL);
      FAIL("forked ranks still running after ", limit.count(), " s");
    }
    std::this_thread::sleep_for(10ms);
  }
  return status;
}

}  // namespace

TEST_CASE("tcp: ranks as processes (fork) give exactly comm::local's bytes") {
  const int P = 3;
  const auto status = fork_ranks(P, [&](int r, int port) {
    tcp_options o = job_options(P, port);
    o.rank = r;
    tcp c(o);
    const bytes got = everything(c, 77);
    const bytes want = local_reference(P, 77)[r];
    return got == want ? 0 : 1;
  });
  for (int r = 0; r < P; ++r) {
    CAPTURE(r);
    CHECK(status[r] == 0);
  }
}

TEST_CASE("tcp: a rank killed (SIGKILL) mid-collective fails every other rank naming it, within the timeout") {
  const int P = 4, victim = 2;
  const auto status = fork_ranks(P, [&](int r, int port) {
    tcp_options o = job_options(P, port);
    o.rank = r;
    o.timeout = 2s;
    tcp c(o);
    std::vector<index_t> counts(P, 1 << 20);  // 4 MiB per destination: many frames in flight
    std::vector<float> s(std::size_t{1} << 22), d(std::size_t{1} << 22);
    for (int round = 0;; ++round) {
      auto req = c.all_to_all_v_async(std::span<const float>(s), std::span<const index_t>(counts), std::span<float>(d),
                                      std::span<const index_t>(counts));
      if (r == victim && round == 2) {
        std::this_thread::sleep_for(2ms);  // some frames out, most not
        raise(SIGKILL);
      }
      const auto t0 = std::chrono::steady_clock::now();
      try {
        req.wait();
      } catch (const semoe::error& e) {
        const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const std::string what = e.what();
        const bool names = what.find("rank " + std::to_string(victim)) != std::string::npos &&
                           what.find("all_to_all_v") != std::string::npos;
        if (!names) std::fprintf(stderr, "rank %d: error does not name rank %d: %s\n", r, victim, what.c_str());
        return names && waited < 3.0 ? 0 : 1;
      }
      if (round > 50) return 2;  // never noticed
    }
  });
  for (int r = 0; r < P; ++r) {
    CAPTURE(r);
    CHECK(status[r] == (r == victim ? 128 + SIGKILL : 0));
  }
}

TEST_CASE("tcp: a rank that goes silent (SIGSTOP) is named by every other rank after the timeout") {
  const int P = 3, victim = 1;
  const auto status = fork_ranks(P, [&](int r, int port) {
    tcp_options o = job_options(P, port);
    o.rank = r;
    o.timeout = 2s;
    tcp c(o);
    c.barrier();
    if (r == victim) raise(SIGSTOP);  // frozen, connections open: only the timeout can tell
    std::vector<double> x(10, 1.0);
    const auto t0 = std::chrono::steady_clock::now();
    try {
      comm::all_reduce(c, std::span<double>(x));
    } catch (const semoe::error& e) {
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const std::string what = e.what();
      const bool names = what.find("rank " + std::to_string(victim)) != std::string::npos &&
                         what.find("all_reduce") != std::string::npos;
      if (!names) std::fprintf(stderr, "rank %d: %s\n", r, what.c_str());
      return names && waited >= 1.9 && waited < 4.5 ? 0 : 1;
    }
    return 2;
  }, 30s, victim);
  for (int r = 0; r < P; ++r) {
    CAPTURE(r);
    CHECK(status[r] == (r == victim ? 128 + SIGKILL : 0));
  }
}

// --- hostile and confused peers ---------------------------------------------

namespace {

/// A fake rank 1 of a 2-rank job: it passes the handshake (it knows the
/// secret), then sends whatever bytes the test wants.
struct fake_rank {
  asio::io_context io;
  comm::detail::tcp_socket sock{io};
  fake_rank(const tcp_options& job, const std::string& secret = test_secret) {
    tcp_options o = job;
    o.rank = 1;
    o.secret = secret;
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    sock = comm::detail::connect_retry(io, comm::detail::resolve(io, o.master_addr, o.master_port), o, deadline,
                                       "rank 0");
    comm::detail::join_master(io, sock, o, 9, deadline);
  }
  void send(const void* p, std::size_t n) { asio::write(sock, asio::buffer(p, n)); }
  void send(const comm::wire::header& h) {
    const auto b = comm::wire::encode(h);
    send(b.data(), b.size());
  }
};

/// Rank 0 (real) runs one all_reduce of 2000 floats against a fake rank 1
/// that does `act`; returns rank 0's error message ("" if none).
template <class Act>
std::string against_fake(Act act, tcp_options base = {}) {
  base.timeout = 5s;
  tcp_options o = job_options(2, free_port(), base);
  o.rank = 0;
  std::string error;
  std::thread master([&] {
    try {
      tcp c(o);
      std::vector<float> x(2000, 1.f);
      comm::all_reduce(c, std::span<float>(x));
    } catch (const semoe::error& e) {
      error = e.what();
    }
  });
  try {
    fake_rank f(o);
    std::this_thread::sleep_for(100ms);  // rank 0 is inside its all_reduce by now
    act(f);
    std::this_thread::sleep_for(50ms);
  } catch (const std::exception& e) {
    error = std::string("the fake rank failed: ") + e.what();
  }
  master.join();
  return error;
}

comm::wire::header all_reduce_frame(std::uint32_t total, std::uint32_t length) {
  comm::wire::header h;
  h.type = comm::wire::kind::all_reduce;
  h.dtype = comm::detail::dtype_of<float>();
  h.arg = static_cast<std::uint32_t>(reduce_op::sum);
  h.total = total;
  h.length = length;
  return h;
}

}  // namespace

TEST_CASE("tcp: a frame with a bad magic is an error naming the peer and the collective") {
  const std::string e = against_fake([](fake_rank& f) {
    unsigned char junk[48];
    for (int i = 0; i < 48; ++i) junk[i] = static_cast<unsigned char>(0xA0 + i);
    f.send(junk, sizeof junk);
  });
  CHECK(e.find("rank 1 sent a bad frame (bad magic 0xa3a2a1a0") != std::string::npos);
  CHECK(e.find("all_reduce #0") != std::string::npos);
}

TEST_CASE("tcp: a frame with the wrong version or a corrupt header is an error") {
  std::string e = against_fake([](fake_rank& f) {
    auto b = comm::wire::encode(all_reduce_frame(4000, 4000));
    b[4] = 9;  // version 9
    f.send(b.data(), b.size());
  });
  CHECK(e.find("wrong protocol version 9") != std::string::npos);
  e = against_fake([](fake_rank& f) {
    auto b = comm::wire::encode(all_reduce_frame(4000, 4000));
    b[20] ^= 1;  // a flipped bit in the group id
    f.send(b.data(), b.size());
  });
  CHECK(e.find("header checksum mismatch") != std::string::npos);
}

TEST_CASE("tcp: an oversize frame length is refused before any allocation") {
  tcp_options o;
  o.max_frame_bytes = 1 << 20;
  const std::string e = against_fake([](fake_rank& f) { f.send(all_reduce_frame(4000000, (1 << 20) + 1)); }, o);
  CHECK(e.find("rank 1 sent a bad frame (oversize frame: 1048577 payload bytes") != std::string::npos);
  CHECK(e.find("all_reduce") != std::string::npos);
}

TEST_CASE("tcp: hostile clear-to-send frames (with a payload, or a flood for messages never issued) are errors") {
  auto cts = [](std::uint64_t seq, std::uint32_t length) {
    comm::wire::header h;
    h.type = comm::wire::kind::clear_to_send;
    h.seq = seq;
    h.total = 1 << 20;
    h.length = length;
    return h;
  };
  std::string e = against_fake([&](fake_rank& f) {
    f.send(cts(0, 8));
    const char pad[8] = {};
    f.send(pad, sizeof pad);
  });
  CHECK(e.find("rank 1 sent a clear-to-send frame with a payload") != std::string::npos);
  e = against_fake([&](fake_rank& f) {
    std::vector<unsigned char> burst;
    for (std::uint64_t q = 0; q <= (std::uint64_t{1} << 16); ++q) {
      const auto b = comm::wire::encode(cts(100 + q, 0));
      burst.insert(burst.end(), b.begin(), b.end());
    }
    f.send(burst.data(), burst.size());
    std::this_thread::sleep_for(1s);  // closing with rank 0's frames unread would reset the connection first
  });
  INFO(e);
  CHECK(e.find("rank 1 sent more than 65536 clear-to-send frames for messages this rank has not issued") !=
        std::string::npos);
}

TEST_CASE("tcp: a flood of zero-length frames for messages no one receives is an error, not unbounded memory") {
  const std::string e = against_fake([](fake_rank& f) {
    std::vector<unsigned char> burst;
    for (std::uint64_t q = 0; q <= (std::uint64_t{1} << 16); ++q) {
      auto h = all_reduce_frame(4, 0);  // 4 bytes announced, none sent: staged, never completed
      h.group = 0x5eed0000 + q;        // groups this rank does not know
      const auto b = comm::wire::encode(h);
      burst.insert(burst.end(), b.begin(), b.end());
    }
    f.send(burst.data(), burst.size());
    std::this_thread::sleep_for(1s);  // closing with rank 0's frames unread would reset the connection first
  });
  INFO(e);
  CHECK(e.find("rank 1 sent more than 65536 messages that no receive on this rank has asked for") !=
        std::string::npos);
}

TEST_CASE("tcp: a peer's abort reason is printed with its control bytes escaped") {
  const std::string e = against_fake([](fake_rank& f) {
    const std::string reason = "\x1b[2J\nrank 0: all is well\x7f";
    comm::wire::header h;
    h.type = comm::wire::kind::abort;
    h.total = h.length = static_cast<std::uint32_t>(reason.size());
    f.send(h);
    f.send(reason.data(), reason.size());
  });
  INFO(e);
  CHECK(e.find("rank 1 aborted the job: \\x1b[2J\\x0arank 0: all is well\\x7f") != std::string::npos);
  CHECK(e.find('\x1b') == std::string::npos);
  CHECK(e.find('\n') == std::string::npos);
}

TEST_CASE("tcp: a truncated frame (the peer closes mid-frame) is an error naming the peer") {
  const std::string e = against_fake([](fake_rank& f) {
    f.send(all_reduce_frame(4000, 4000));  // chunk 0 of 2000 floats: what rank 0 expects from rank 1
    std::vector<unsigned char> part(100, 0);
    f.send(part.data(), part.size());
    f.sock.close();
  });
  CHECK(e.find("rank 1 sent a truncated frame: its connection closed after 100 of 4000 payload bytes") !=
        std::string::npos);
  CHECK(e.find("all_reduce #0") != std::string::npos);
}

TEST_CASE("tcp: an unexpected sequence number or message size is an error") {
  std::string e = against_fake([](fake_rank& f) {
    auto h = all_reduce_frame(4000, 0);
    h.seq = std::uint64_t{1} << 40;
    f.send(h);
  });
  CHECK(e.find("unexpected sequence number") != std::string::npos);
  e = against_fake([](fake_rank& f) { f.send(all_reduce_frame(40, 0)); });
  CHECK(e.find("rank 1 sends a block of 10 elements, rank 0 expects 1000") != std::string::npos);
}

TEST_CASE("tcp: a connection without the secret is refused and the job still forms") {
  const tcp_options o = job_options(2, free_port());
  std::string stranger_error;
  std::atomic<bool> stranger_done{false};
  std::vector<float> result(2);
  std::thread master([&] {
    tcp_options m = o;
    m.rank = 0;
    tcp c(m);
    std::vector<float> x{1.f, 2.f};
    comm::all_reduce(c, std::span<float>(x));
    result = x;
  });
  try {
    fake_rank stranger(o, "not-the-secret");
  } catch (const semoe::error& e) {
    stranger_error = e.what();
  }
  stranger_done = true;
  tcp_options r1 = o;
  r1.rank = 1;
  tcp c(r1);
  std::vector<float> x{10.f, 20.f};
  comm::all_reduce(c, std::span<float>(x));
  master.join();
  CHECK(stranger_error.find("rank 0 refused this rank") != std::string::npos);
  CHECK(x == std::vector<float>{11.f, 22.f});
  CHECK(result == x);
}

namespace {

/// A 3-rank job whose rank 0 is up first and gets `strangers` connections
/// that know no secret before ranks 1 and 2 connect; the last stranger
/// trickles a byte every 300 ms when `slowloris`. Returns the seconds from
/// ranks 1 and 2 starting until all three formed the job and all-reduced.
double form_behind_strangers(const tcp_options& base, int strangers, bool slowloris) {
  const tcp_options o = job_options(3, free_port(), base);
  std::vector<std::vector<float>> results(3);
  std::vector<std::string> errors(3);
  std::vector<std::thread> ranks;
  const auto start_rank = [&](int r) {
    ranks.emplace_back([&, r] {
      try {
        tcp_options mine = o;
        mine.rank = r;
        tcp c(mine);
        std::vector<float> x{float(r + 1)};
        comm::all_reduce(c, std::span<float>(x));
        results[r] = x;
      } catch (const semoe::error& e) {
        errors[r] = e.what();
      }
    });
  };
  start_rank(0);
  asio::io_context io;
  std::vector<std::unique_ptr<comm::detail::tcp_socket>> socks;
  const auto ep = comm::detail::resolve(io, o.master_addr, o.master_port);
  for (int i = 0; i < strangers; ++i) {
    auto s = std::make_unique<comm::detail::tcp_socket>(io);
    for (int tries = 0; tries < 200; ++tries) {
      boost::system::error_code ec;
      s->connect(ep, ec);
      if (!ec) break;
      s->close(ec);
      std::this_thread::sleep_for(10ms);
    }
    REQUIRE(s->is_open());
    socks.push_back(std::move(s));
  }
  std::atomic<bool> stop{false};
  std::thread trickle([&] {
    const char b = 'x';
    while (slowloris && !stop) {
      boost::system::error_code ec;
      asio::write(*socks.back(), asio::buffer(&b, 1), ec);
      if (ec) break;
      std::this_thread::sleep_for(300ms);
    }
  });
  const auto t0 = std::chrono::steady_clock::now();
  start_rank(1);
  start_rank(2);
  for (auto& t : ranks) t.join();
  const double formed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stop = true;
  trickle.join();
  for (int r = 0; r < 3; ++r) {
    CAPTURE(r);
    CHECK(errors[r].empty());
    CHECK(results[r] == std::vector<float>{6.f});
  }
  return formed;
}

}  // namespace

TEST_CASE("tcp: idle and slowloris strangers during startup delay no one; the job forms within its timeout") {
  // Four that never speak, one that trickles a byte at a time.
  tcp_options base;
  base.timeout = 8s;  // the old one-at-a-time accept lost up to 10 s per stranger
  CHECK(form_behind_strangers(base, 5, true) < 5.0);  // well inside the timeout, not held by the strangers
}

TEST_CASE("tcp: more idle strangers than handshake slots queue in front of the real ranks but do not turn them away") {
  // 70 silent connections first: 64 take every handshake slot, 6 wait in the
  // kernel's queue, then the real ranks queue behind them. Each stranger is
  // dropped after handshake_timeout, and the ranks are served in turn.
  tcp_options base;
  base.timeout = 20s;
  base.handshake_timeout = 1s;
  const double formed = form_behind_strangers(base, 70, false);
  CHECK(formed < 10.0);  // about two handshake timeouts, well inside the 20 s job timeout
  MESSAGE("the job formed " << formed << " s after the ranks connected behind 70 strangers");
}

TEST_CASE("tcp: a rank whose master never appears fails within the timeout") {
  tcp_options o = job_options(2, free_port());
  o.rank = 1;
  o.timeout = 500ms;
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(tcp{o}, doctest::Contains("could not connect to rank 0"), semoe::error);
  CHECK(std::chrono::steady_clock::now() - t0 < 3s);
}

// --- options and environment ----------------------------------------------

namespace {

tcp_options from(const std::map<std::string, std::string>& env) {
  return comm::tcp_options_from_env({}, [&](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  });
}

}  // namespace

TEST_CASE("tcp: options from SEMOE_* variables, with Open MPI and Slurm fallbacks") {
  auto o = from({{"SEMOE_RANK", "3"},
                 {"SEMOE_WORLD_SIZE", "4"},
                 {"SEMOE_LOCAL_RANK", "1"},
                 {"SEMOE_LOCAL_SIZE", "2"},
                 {"SEMOE_MASTER_ADDR", "10.0.0.7"},
                 {"SEMOE_MASTER_PORT", "29500"},
                 {"SEMOE_SECRET", "s3cret"},
                 {"OMPI_COMM_WORLD_RANK", "0"}});  // ours win
  CHECK(o.rank == 3);
  CHECK(o.size == 4);
  CHECK(o.local_rank == 1);
  CHECK(o.local_size == 2);
  CHECK(o.master_addr == "10.0.0.7");
  CHECK(o.master_port == 29500);
  CHECK(o.secret == "s3cret");
  CHECK(o.timeout == std::chrono::seconds(60));
  CHECK(from({{"SEMOE_RANK", "0"}, {"SEMOE_WORLD_SIZE", "1"}, {"SEMOE_MASTER_PORT", "1"}, {"SEMOE_SECRET", "x"},
              {"SEMOE_TIMEOUT", "7"}})
            .timeout == std::chrono::seconds(7));

  o = from({{"OMPI_COMM_WORLD_RANK", "5"},
            {"OMPI_COMM_WORLD_SIZE", "8"},
            {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
            {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"},
            {"SEMOE_MASTER_PORT", "1234"},
            {"SEMOE_SECRET", "x"}});
  CHECK(o.rank == 5);
  CHECK(o.size == 8);
  CHECK(o.local_rank == 1);
  CHECK(o.local_size == 4);
  CHECK(o.master_addr == "127.0.0.1");

  o = from({{"SLURM_PROCID", "2"},
            {"SLURM_NTASKS", "6"},
            {"SLURM_LOCALID", "2"},
            {"SLURM_NTASKS_PER_NODE", "3"},
            {"SEMOE_MASTER_PORT", "1234"},
            {"SEMOE_SECRET", "x"}});
  CHECK(o.rank == 2);
  CHECK(o.size == 6);
  CHECK(o.local_size == 3);
}

TEST_CASE("tcp: bad environment values name their variable") {
  const std::map<std::string, std::string> good{{"SEMOE_RANK", "1"},
                                                {"SEMOE_WORLD_SIZE", "4"},
                                                {"SEMOE_MASTER_PORT", "29500"},
                                                {"SEMOE_SECRET", "x"}};
  auto with = [&](std::string k, std::string v) {
    auto e = good;
    if (v.empty())
      e.erase(k);
    else
      e[k] = v;
    return e;
  };
  CHECK_NOTHROW(from(good));
  CHECK_THROWS_WITH_AS(from(with("SEMOE_RANK", "abc")), doctest::Contains("SEMOE_RANK = \"abc\": expected a rank"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_RANK", "4")), doctest::Contains("SEMOE_RANK = \"4\": expected a rank in [0, 3]"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_RANK", "-1")), doctest::Contains("SEMOE_RANK"), semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_RANK", "")), doctest::Contains("SEMOE_RANK is not set"), semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_WORLD_SIZE", "0")), doctest::Contains("SEMOE_WORLD_SIZE = \"0\""),
                       semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_WORLD_SIZE", "")), doctest::Contains("SEMOE_WORLD_SIZE is not set"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_MASTER_PORT", "70000")),
                       doctest::Contains("SEMOE_MASTER_PORT = \"70000\": expected a port"), semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_MASTER_PORT", "12x")), doctest::Contains("SEMOE_MASTER_PORT"), semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_MASTER_PORT", "")), doctest::Contains("SEMOE_MASTER_PORT is not set"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_SECRET", "")), doctest::Contains("SEMOE_SECRET is not set"), semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_TIMEOUT", "0")),
                       doctest::Contains("SEMOE_TIMEOUT = \"0\": expected whole seconds"), semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_TIMEOUT", "5s")), doctest::Contains("SEMOE_TIMEOUT = \"5s\""), semoe::error);
  CHECK_THROWS_WITH_AS(from(with("SEMOE_LOCAL_SIZE", "3")),
                       doctest::Contains("SEMOE_LOCAL_SIZE = 3: expected a divisor of SEMOE_WORLD_SIZE = 4"),
                       semoe::error);
  auto e = with("SEMOE_LOCAL_SIZE", "2");
  e["SEMOE_LOCAL_RANK"] = "0";  // rank 1 of 2 per node is local rank 1
  CHECK_THROWS_WITH_AS(from(e), doctest::Contains("SEMOE_LOCAL_RANK = 0: expected rank % local size = 1"),
                       semoe::error);
  auto slurm = with("SEMOE_RANK", "");
  slurm["SLURM_PROCID"] = "nine";
  CHECK_THROWS_WITH_AS(from(slurm), doctest::Contains("SLURM_PROCID = \"nine\""), semoe::error);
}

TEST_CASE("tcp: options are validated field by field") {
  tcp_options o = job_options(2, 1234);
  o.rank = 0;
  CHECK_NOTHROW(comm::validate(o));
  auto bad = [&](auto change, const char* field) {
    tcp_options b = o;
    change(b);
    CHECK_THROWS_WITH_AS(comm::validate(b), doctest::Contains(field), semoe::error);
  };
  bad([](tcp_options& b) { b.rank = 2; }, "options.rank = 2");
  bad([](tcp_options& b) { b.size = 0; }, "options.size = 0");
  bad([](tcp_options& b) { b.master_port = 0; }, "options.master_port = 0");
  bad([](tcp_options& b) { b.secret.clear(); }, "options.secret is empty");
  bad([](tcp_options& b) { b.timeout = 0ms; }, "options.timeout = 0 ms");
  bad([](tcp_options& b) { b.chunk_bytes = 0; }, "options.chunk_bytes = 0");
  bad([](tcp_options& b) { b.chunk_bytes = b.max_frame_bytes + 1; }, "options.chunk_bytes");
  bad([](tcp_options& b) { b.local_size = 3; }, "options.local_size = 3");
  CHECK_THROWS_AS(tcp{tcp_options{}}, semoe::error);
}

TEST_CASE("tcp: wire headers round-trip and every field is checked") {
  comm::wire::header h = all_reduce_frame(1 << 20, 1 << 16);
  h.group = 0x1122334455667788ull;
  h.seq = 42;
  h.step = 1;
  comm::wire::header back;
  CHECK(comm::wire::decode(comm::wire::encode(h), back, 1 << 20).empty());
  CHECK(back.group == h.group);
  CHECK(back.seq == 42);
  CHECK(back.step == 1);
  CHECK(back.total == h.total);
  CHECK(back.length == h.length);
  CHECK(back.type == comm::wire::kind::all_reduce);
  CHECK(comm::wire::decode(comm::wire::encode(h), back, 1 << 15).find("oversize frame") == 0);
  h.length = 10;
  h.total = 5;
  CHECK(comm::wire::decode(comm::wire::encode(h), back, 1 << 20).find("exceeds its message total") !=
        std::string::npos);
  auto b = comm::wire::encode(all_reduce_frame(8, 8));
  b[6] = 200;  // unknown kind, checksum fixed up
  const auto crc = static_cast<std::uint32_t>(::crc32(0L, b.data(), 44));
  for (int i = 0; i < 4; ++i) b[44 + i] = static_cast<unsigned char>(crc >> (8 * i));
  CHECK(comm::wire::decode(b, back, 1 << 20) == "unknown frame kind 200");
}
