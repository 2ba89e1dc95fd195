// semoe/comm/rendezvous.hpp: how the ranks of a comm::tcp job find each
// other. Every rank connects to rank 0 (the master) and proves the
// shared secret by HMAC challenge-response, in both directions; the master
// hands out the table of listening addresses; then every pair of ranks gets
// one authenticated connection (the higher rank accepts, rank 0's links are
// the rendezvous connections). Handshakes run concurrently, each under its own
// deadline, so a stranger that connects and stays silent (or trickles bytes)
// delays no one; one that fails to authenticate is refused and logged, and
// the job keeps waiting for the real rank.
#pragma once

#include <algorithm>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "semoe/comm/wire.hpp"
#include "semoe/core/error.hpp"

namespace semoe::comm {

/// Everything a comm::tcp rank needs to join its job.
struct tcp_options {
  int rank = -1;
  int size = 0;
  int local_size = 0;   ///< ranks per node, ranks placed node by node; 0: all on one node
  int local_rank = -1;  ///< -1: rank % local_size; checked against it when given
  std::string master_addr = "127.0.0.1";
  int master_port = 0;
  std::string secret;  ///< shared by every rank; proves membership (HMAC-SHA256)
  std::chrono::milliseconds timeout{60'000};  ///< rendezvous, and a silent peer in a collective
  /// How long one connection may take to authenticate before it is dropped:
  /// a stranger that connects and stays silent (or trickles bytes) holds one
  /// of at most 64 handshake slots this long, and no one waits on it.
  std::chrono::milliseconds handshake_timeout{10'000};
  std::size_t chunk_bytes = std::size_t{1} << 20;        ///< payload per frame of large messages
  std::size_t max_frame_bytes = std::size_t{64} << 20;   ///< a peer's frame larger than this is an error
  /// A message larger than this sends its first eager_bytes at once and the
  /// rest when the receiver says its buffer is posted (clear to send): a
  /// rank that runs ahead then parks its data in its own memory, not in a
  /// peer's staging buffers, and the bytes land in place with one copy.
  std::size_t eager_bytes = std::size_t{256} << 10;
  std::size_t max_unexpected_bytes = std::size_t{1} << 30;  ///< buffered early arrivals before backpressure
  int socket_buffer_bytes = 0;  ///< SO_SNDBUF/SO_RCVBUF; 0 keeps the kernel's autotuning
};

/// Throws semoe::error naming the first field that is out of range.
inline void validate(const tcp_options& o) {
  const char* p = "semoe::comm::tcp: options.";
  SEMOE_CHECK(o.size >= 1, p, "size = ", o.size, ": expected >= 1");
  SEMOE_CHECK(o.rank >= 0 && o.rank < o.size, p, "rank = ", o.rank, ": expected a rank in [0, ", o.size, ")");
  const int ls = o.local_size == 0 ? o.size : o.local_size;
  SEMOE_CHECK(ls >= 1 && o.size % ls == 0, p, "local_size = ", o.local_size, ": expected a divisor of size = ",
              o.size);
  SEMOE_CHECK(o.local_rank == -1 || o.local_rank == o.rank % ls, p, "local_rank = ", o.local_rank,
              ": expected rank % local_size = ", o.rank % ls, " (ranks are placed node by node)");
  SEMOE_CHECK(!o.master_addr.empty(), p, "master_addr is empty: expected rank 0's host address");
  SEMOE_CHECK(o.master_port >= 1 && o.master_port <= 65535, p, "master_port = ", o.master_port,
              ": expected a port in [1, 65535]");
  SEMOE_CHECK(!o.secret.empty(), p, "secret is empty: every rank needs the same shared secret");
  SEMOE_CHECK(o.timeout.count() > 0, p, "timeout = ", o.timeout.count(), " ms: expected > 0");
  SEMOE_CHECK(o.handshake_timeout.count() > 0, p, "handshake_timeout = ", o.handshake_timeout.count(),
              " ms: expected > 0");
  SEMOE_CHECK(o.max_frame_bytes >= 4096 && o.max_frame_bytes <= (std::size_t{1} << 31), p,
              "max_frame_bytes = ", o.max_frame_bytes, ": expected a value in [4096, 2^31]");
  SEMOE_CHECK(o.chunk_bytes >= 1 && o.chunk_bytes <= o.max_frame_bytes, p, "chunk_bytes = ", o.chunk_bytes,
              ": expected a value in [1, max_frame_bytes = ", o.max_frame_bytes, "]");
  SEMOE_CHECK(o.socket_buffer_bytes >= 0, p, "socket_buffer_bytes = ", o.socket_buffer_bytes, ": expected >= 0");
}

/// Reads the job from the environment: SEMOE_* first, then Open MPI's and
/// Slurm's variables for the values ours leave out. SEMOE_TIMEOUT (seconds),
/// when set, replaces base's timeout. `get` is getenv by
/// default (tests pass their own). Every bad value names its variable.
inline tcp_options tcp_options_from_env(tcp_options base = {},
                                        const std::function<const char*(const char*)>& get = nullptr) {
  auto env = [&](const char* name) -> const char* {
    const char* v = get ? get(name) : std::getenv(name);
    return v && *v ? v : nullptr;
  };
  struct found {
    const char* name = nullptr;
    const char* value = nullptr;
  };
  auto first = [&](std::initializer_list<const char*> names) {
    for (const char* n : names)
      if (const char* v = env(n)) return found{n, v};
    return found{};
  };
  auto parse = [](found f, long lo, long hi, const char* expected) {
    long v = 0;
    const std::string_view s(f.value);
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    SEMOE_CHECK(ec == std::errc{} && end == s.data() + s.size() && v >= lo && v <= hi, "semoe::comm::tcp: ", f.name,
                " = \"", f.value, "\": expected ", expected);
    return static_cast<int>(v);
  };
  tcp_options o = std::move(base);

  const found size = first({"SEMOE_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"});
  SEMOE_CHECK(size.value, "semoe::comm::tcp: SEMOE_WORLD_SIZE is not set (nor OMPI_COMM_WORLD_SIZE or SLURM_NTASKS): "
                          "expected the number of ranks; start the job with semoe-run");
  o.size = parse(size, 1, 1 << 20, "a number of ranks >= 1");
  const found rank = first({"SEMOE_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"});
  SEMOE_CHECK(rank.value,
              "semoe::comm::tcp: SEMOE_RANK is not set (nor OMPI_COMM_WORLD_RANK or SLURM_PROCID): expected this "
              "process's rank");
  o.rank = parse(rank, 0, o.size - 1, semoe::detail::concat("a rank in [0, ", o.size - 1, "] (", size.name, " = ",
                                                             o.size, ")").c_str());
  if (const found ls = first({"SEMOE_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"}); ls.value) {
    o.local_size = parse(ls, 1, o.size, semoe::detail::concat("ranks per node in [1, ", o.size, "]").c_str());
    SEMOE_CHECK(o.size % o.local_size == 0, "semoe::comm::tcp: ", ls.name, " = ", o.local_size,
                ": expected a divisor of ", size.name, " = ", o.size);
  }
  if (const found lr = first({"SEMOE_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"}); lr.value) {
    const int ls = o.local_size ? o.local_size : o.size;
    o.local_rank = parse(lr, 0, ls - 1, semoe::detail::concat("a local rank in [0, ", ls - 1, "]").c_str());
    SEMOE_CHECK(o.local_rank == o.rank % ls, "semoe::comm::tcp: ", lr.name, " = ", o.local_rank,
                ": expected rank % local size = ", o.rank % ls, " (ranks must be placed node by node)");
  }
  if (const char* a = env("SEMOE_MASTER_ADDR")) o.master_addr = a;
  const found port = first({"SEMOE_MASTER_PORT"});
  SEMOE_CHECK(port.value, "semoe::comm::tcp: SEMOE_MASTER_PORT is not set: expected rank 0's rendezvous port");
  o.master_port = parse(port, 1, 65535, "a port in [1, 65535]");
  const char* secret = env("SEMOE_SECRET");
  SEMOE_CHECK(secret, "semoe::comm::tcp: SEMOE_SECRET is not set: every rank needs the same shared secret "
                      "(semoe-run makes a fresh one)");
  o.secret = secret;
  if (const found t = first({"SEMOE_TIMEOUT"}); t.value)
    o.timeout = std::chrono::seconds(parse(t, 1, 7 * 24 * 3600, "whole seconds in [1, 604800]"));
  validate(o);
  return o;
}

namespace detail {

namespace asio = boost::asio;
using tcp_socket = asio::ip::tcp::socket;
using steady = std::chrono::steady_clock;

inline constexpr std::size_t nonce_bytes = 32;
inline constexpr std::size_t mac_bytes = 32;

using mac_t = std::array<unsigned char, mac_bytes>;

inline mac_t hmac_sha256(std::string_view key, const std::vector<unsigned char>& msg) {
  mac_t out{};
  unsigned int len = 0;
  const unsigned char* ok = HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), msg.data(), msg.size(),
                                 out.data(), &len);
  SEMOE_CHECK(ok && len == mac_bytes, "semoe::comm::tcp: HMAC-SHA256 failed in OpenSSL");
  return out;
}

inline std::array<unsigned char, nonce_bytes> random_nonce() {
  std::array<unsigned char, nonce_bytes> n{};
  SEMOE_CHECK(RAND_bytes(n.data(), static_cast<int>(n.size())) == 1,
              "semoe::comm::tcp: RAND_bytes failed: OpenSSL has no entropy");
  return n;
}

inline void put32(std::vector<unsigned char>& v, std::uint32_t x) {
  for (int i = 0; i < 4; ++i) v.push_back(static_cast<unsigned char>(x >> (8 * i)));
}
inline std::uint32_t get32(const unsigned char* p) {
  return std::uint32_t{p[0]} | std::uint32_t{p[1]} << 8 | std::uint32_t{p[2]} << 16 | std::uint32_t{p[3]} << 24;
}

inline std::string endpoint_name(const tcp_socket& s) {
  boost::system::error_code ec;
  const auto ep = s.remote_endpoint(ec);
  return ec ? std::string("an unknown address") : semoe::detail::concat(ep.address().to_string(), ":", ep.port());
}

/// Runs one async operation on `io` from this (constructing) thread, with a
/// deadline: on expiry `cancel` closes the socket and the result is timed_out.
/// Rendezvous happens before the io thread starts, so this thread drives io.
/// Completion handler of run_until: the two signatures asio uses here,
/// spelled out so that overloads such as async_accept's resolve.
struct run_until_handler {
  bool* done;
  boost::system::error_code* result;
  std::size_t* transferred;
  void operator()(const boost::system::error_code& ec) const {
    *result = ec;
    *done = true;
  }
  void operator()(const boost::system::error_code& ec, std::size_t n) const {
    if (transferred) *transferred = n;
    (*this)(ec);
  }
};

template <class Start>
boost::system::error_code run_until(asio::io_context& io, steady::time_point deadline,
                                    const std::function<void()>& cancel, Start start,
                                    std::size_t* transferred = nullptr) {
  bool done = false;
  boost::system::error_code result;
  start(run_until_handler{&done, &result, transferred});
  io.restart();
  while (!done) {
    if (io.run_one_until(deadline) == 0 && !done && steady::now() >= deadline) {
      cancel();
      io.restart();
      while (!done) io.run_one();
      return asio::error::timed_out;
    }
  }
  return result;
}

inline void close_quietly(tcp_socket& s) {
  boost::system::error_code ec;
  s.close(ec);
}

inline void write_frame(asio::io_context& io, tcp_socket& s, steady::time_point deadline, wire::kind k,
                        const std::vector<unsigned char>& payload, std::uint32_t arg = 0) {
  wire::header h;
  h.type = k;
  h.arg = arg;
  h.total = h.length = static_cast<std::uint32_t>(payload.size());
  const auto hb = wire::encode(h);
  const std::array<asio::const_buffer, 2> bufs{asio::buffer(hb), asio::buffer(payload)};
  const auto ec = run_until(io, deadline, [&] { close_quietly(s); },
                            [&](auto handler) { asio::async_write(s, bufs, handler); });
  SEMOE_CHECK(!ec, "sending the ", wire::kind_name(k), " failed: ", ec.message());
}

/// Reads one control frame of kind `k` whose payload is exactly `want` bytes
/// (or at most `want` when `exact` is false).
inline std::vector<unsigned char> read_frame(asio::io_context& io, tcp_socket& s, steady::time_point deadline,
                                             wire::kind k, std::size_t want, bool exact = true) {
  wire::header_bytes hb{};
  std::size_t got = 0;
  auto ec = run_until(io, deadline, [&] { close_quietly(s); },
                      [&](auto handler) { asio::async_read(s, asio::buffer(hb), handler); }, &got);
  if (ec == asio::error::eof && got == 0) semoe::detail::fail("the peer closed the connection before the ", wire::kind_name(k));
  SEMOE_CHECK(!ec, "reading the ", wire::kind_name(k), " failed: ", ec.message());
  wire::header h;
  const std::string why = wire::decode(hb, h, wire::max_control_bytes);
  SEMOE_CHECK(why.empty(), "bad ", wire::kind_name(k), " frame: ", why);
  if (h.type == wire::kind::abort) semoe::detail::fail("the peer refused: it sent an abort frame");
  const auto a = [](const char* name) { return std::strchr("aeiou", name[0]) ? "an " : "a "; };
  SEMOE_CHECK(h.type == k, "expected ", a(wire::kind_name(k)), wire::kind_name(k), " frame, got ",
              a(wire::kind_name(h.type)), wire::kind_name(h.type), " frame");
  SEMOE_CHECK(h.length == h.total && (exact ? h.length == want : h.length <= want), "bad ", wire::kind_name(k),
              " frame: ", h.length, " payload bytes, expected ", want);
  std::vector<unsigned char> payload(h.length);
  ec = run_until(io, deadline, [&] { close_quietly(s); },
                 [&](auto handler) { asio::async_read(s, asio::buffer(payload), handler); });
  SEMOE_CHECK(!ec, "reading the ", wire::kind_name(k), " payload failed: ", ec.message());
  return payload;
}

/// What a joining rank claims in its (authenticated) response.
struct join_claim {
  int rank = -1, size = 0, local_size = 0, port = 0;
};

inline std::vector<unsigned char> join_message(const std::array<unsigned char, nonce_bytes>& nonce, const join_claim& c,
                                               int acceptor) {
  std::vector<unsigned char> m{'s', 'e', 'm', 'o', 'e', '/', '1', ' ', 'j', 'o', 'i', 'n'};
  m.insert(m.end(), nonce.begin(), nonce.end());
  for (int x : {c.rank, c.size, c.local_size, c.port, acceptor}) put32(m, static_cast<std::uint32_t>(x));
  return m;
}
inline std::vector<unsigned char> accept_message(const unsigned char* nonce, int acceptor, int joiner) {
  std::vector<unsigned char> m{'s', 'e', 'm', 'o', 'e', '/', '1', ' ', 'a', 'c', 'c', 'e', 'p', 't'};
  m.insert(m.end(), nonce, nonce + nonce_bytes);
  put32(m, static_cast<std::uint32_t>(acceptor));
  put32(m, static_cast<std::uint32_t>(joiner));
  return m;
}

/// Accepting side of the handshake. `admit` returns "" or why the (already
/// authenticated) claim is refused. Throws semoe::error on any failure.
inline join_claim accept_handshake(asio::io_context& io, tcp_socket& s, const tcp_options& o,
                                   steady::time_point deadline,
                                   const std::function<std::string(const join_claim&)>& admit) {
  const auto nonce = random_nonce();
  std::vector<unsigned char> challenge(nonce.begin(), nonce.end());
  put32(challenge, static_cast<std::uint32_t>(o.rank));
  put32(challenge, static_cast<std::uint32_t>(o.size));
  write_frame(io, s, deadline, wire::kind::challenge, challenge);
  const auto r = read_frame(io, s, deadline, wire::kind::response, 16 + nonce_bytes + mac_bytes);
  join_claim c{static_cast<int>(get32(&r[0])), static_cast<int>(get32(&r[4])), static_cast<int>(get32(&r[8])),
               static_cast<int>(get32(&r[12]))};
  const mac_t want = hmac_sha256(o.secret, join_message(nonce, c, o.rank));
  // Constant time: a stranger learns nothing from how long the refusal took.
  SEMOE_CHECK(CRYPTO_memcmp(want.data(), &r[16 + nonce_bytes], mac_bytes) == 0,
              "it does not know the shared secret (HMAC mismatch; wrong SEMOE_SECRET?)");
  SEMOE_CHECK(c.size == o.size, "it claims world size ", c.size, ", this job has ", o.size);
  if (std::string why = admit(c); !why.empty()) semoe::detail::fail(why);
  const mac_t proof = hmac_sha256(o.secret, accept_message(&r[16], o.rank, c.rank));
  write_frame(io, s, deadline, wire::kind::proof, std::vector<unsigned char>(proof.begin(), proof.end()));
  return c;
}

/// Connecting side: answer the challenge of rank `expect`, check its proof.
inline void connect_handshake(asio::io_context& io, tcp_socket& s, const tcp_options& o, int expect, int port,
                              steady::time_point deadline) {
  const auto ch = read_frame(io, s, deadline, wire::kind::challenge, nonce_bytes + 8);
  std::array<unsigned char, nonce_bytes> nonce_a{};
  std::copy(ch.begin(), ch.begin() + nonce_bytes, nonce_a.begin());
  const int peer = static_cast<int>(get32(&ch[nonce_bytes])), peer_size = static_cast<int>(get32(&ch[nonce_bytes + 4]));
  SEMOE_CHECK(peer == expect && peer_size == o.size, "expected rank ", expect, " of ", o.size, ", found rank ", peer,
              " of ", peer_size);
  const join_claim c{o.rank, o.size, o.local_size == 0 ? o.size : o.local_size, port};
  const auto nonce_c = random_nonce();
  std::vector<unsigned char> resp;
  for (int x : {c.rank, c.size, c.local_size, c.port}) put32(resp, static_cast<std::uint32_t>(x));
  resp.insert(resp.end(), nonce_c.begin(), nonce_c.end());
  const mac_t mac = hmac_sha256(o.secret, join_message(nonce_a, c, expect));
  resp.insert(resp.end(), mac.begin(), mac.end());
  write_frame(io, s, deadline, wire::kind::response, resp);
  std::vector<unsigned char> proof;
  try {
    proof = read_frame(io, s, deadline, wire::kind::proof, mac_bytes);
  } catch (const error& e) {
    semoe::detail::fail("rank ", expect, " refused this rank (wrong SEMOE_SECRET, world size or local size?): ",
                        e.what());
  }
  const mac_t want = hmac_sha256(o.secret, accept_message(nonce_c.data(), expect, o.rank));
  SEMOE_CHECK(CRYPTO_memcmp(want.data(), proof.data(), mac_bytes) == 0, "rank ", expect,
              " failed to prove the shared secret: it is not part of this job");
}

inline void tune(tcp_socket& s, const tcp_options& o) {
  boost::system::error_code ec;
  s.set_option(asio::ip::tcp::no_delay(true), ec);  // small frames (barrier, headers) must not wait for Nagle
  if (o.socket_buffer_bytes > 0) {
    s.set_option(asio::socket_base::send_buffer_size(o.socket_buffer_bytes), ec);
    s.set_option(asio::socket_base::receive_buffer_size(o.socket_buffer_bytes), ec);
  }
}

inline asio::ip::tcp::endpoint resolve(asio::io_context& io, const std::string& host, int port) {
  boost::system::error_code ec;
  asio::ip::tcp::resolver res(io);
  auto r = res.resolve(host, std::to_string(port), ec);
  SEMOE_CHECK(!ec && !r.empty(), "semoe::comm::tcp: cannot resolve SEMOE_MASTER_ADDR = \"", host, "\": ",
              ec ? ec.message() : std::string("no address"));
  return *r.begin();
}

/// Connect, retrying refusals until the deadline (the listener may not be up yet).
inline tcp_socket connect_retry(asio::io_context& io, const asio::ip::tcp::endpoint& ep, const tcp_options& o,
                                steady::time_point deadline, const std::string& what) {
  for (;;) {
    tcp_socket s(io);
    boost::system::error_code ec;
    s.open(ep.protocol(), ec);
    SEMOE_CHECK(!ec, "semoe::comm::tcp: rank ", o.rank, ": cannot open a socket: ", ec.message());
    tune(s, o);
    ec = run_until(io, deadline, [&] { close_quietly(s); },
                   [&](auto handler) { s.async_connect(ep, handler); });
    if (!ec) return s;
    SEMOE_CHECK(steady::now() + std::chrono::milliseconds(50) < deadline, "semoe::comm::tcp: rank ", o.rank,
                ": could not connect to ", what, " at ", ep, " within ", o.timeout.count(), " ms: ", ec.message());
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

inline void log_refusal(const tcp_options& o, const std::string& from, const std::string& why) {
  std::fprintf(stderr, "semoe::comm::tcp: rank %d refused a connection from %s: %s\n", o.rank, from.c_str(),
               why.c_str());
}

/// Handshakes in flight at once. Past this many, connections wait in the
/// kernel's accept queue and are served in the order they came as slots free
/// up (each handshake ends within handshake_timeout): strangers cannot
/// exhaust threads or descriptors, and a real rank that connects behind them
/// is delayed, not turned away.
inline constexpr int max_pending_handshakes = 64;

/// Accept until `need` ranks passed the handshake and `admit`; strangers are
/// refused and logged. Each handshake runs on its own thread under its own
/// deadline (handshake_timeout), so idle or slow strangers hold up nobody:
/// this thread goes on accepting, and admits (under one lock) what passes.
inline void accept_ranks(asio::io_context& io, asio::ip::tcp::acceptor& acc, const tcp_options& o,
                         steady::time_point deadline, int need,
                         const std::function<std::string(const join_claim&)>& admit,
                         const std::function<void(tcp_socket, const join_claim&)>& joined,
                         const std::function<std::string()>& missing) {
  struct outcome {
    tcp_socket::native_handle_type fd = -1;  // an authenticated connection, or -1
    join_claim claim{};
    std::string from, refused;
  };
  struct pending {
    std::mutex m;
    std::deque<outcome> done;
    std::vector<int> live_fds;  // sockets of handshakes in flight: shut down to end them early
    int in_flight = 0;
    std::condition_variable slot_freed;
  } state;
  std::mutex admit_m;  // admit and joined see one consistent set of ranks
  const auto locked_admit = [&](const join_claim& c) {
    std::lock_guard lk(admit_m);
    return admit(c);
  };
  const auto protocol = acc.local_endpoint().protocol();
  std::vector<std::thread> workers;
  const auto finish = [&] {  // end the strangers still in their handshake, then wait for every worker
    {
      std::lock_guard lk(state.m);
      for (int fd : state.live_fds) ::shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : workers) t.join();
    std::lock_guard lk(state.m);
    for (auto& r : state.done)
      if (r.fd >= 0) ::close(r.fd);
  };
  try {
    for (int n = 0; n < need;) {
      std::deque<outcome> ready;
      {
        std::lock_guard lk(state.m);
        ready.swap(state.done);
      }
      for (auto& r : ready) {
        if (r.fd < 0) {
          log_refusal(o, r.from, r.refused);
          continue;
        }
        tcp_socket s(io);
        s.assign(protocol, r.fd);
        r.fd = -1;
        std::lock_guard lk(admit_m);
        // Again, now that earlier ones have joined: two handshakes may have
        // claimed the same rank at once.
        if (std::string why = n >= need ? std::string("every rank has joined") : admit(r.claim); !why.empty()) {
          log_refusal(o, r.from, why);
          close_quietly(s);
          continue;
        }
        tune(s, o);
        joined(std::move(s), r.claim);
        ++n;
      }
      if (n >= need) break;
      SEMOE_CHECK(steady::now() < deadline, "semoe::comm::tcp: rank ", o.rank, ": rendezvous timed out after ",
                  o.timeout.count(), " ms waiting for ", missing());
      {  // every slot taken: leave new connections queued in the kernel
        std::unique_lock lk(state.m);
        if (state.in_flight >= max_pending_handshakes) {
          state.slot_freed.wait_for(lk, std::chrono::milliseconds(20));
          continue;
        }
      }
      // Accept in short slices so finished handshakes are admitted promptly.
      tcp_socket s(io);
      const auto slice = std::min(deadline, steady::now() + std::chrono::milliseconds(20));
      const auto ec = run_until(io, slice, [&] { boost::system::error_code e; acc.cancel(e); },
                                [&](auto handler) { acc.async_accept(s, handler); });
      if (ec) continue;  // a slice without a connection, or one reset before we accepted it
      std::string from = endpoint_name(s);
      {
        std::lock_guard lk(state.m);
        ++state.in_flight;
        state.live_fds.push_back(s.native_handle());
      }
      const auto fd = s.release();
      const auto until = std::min(deadline, steady::now() + o.handshake_timeout);
      workers.emplace_back([&, fd, until, from = std::move(from)] {
        outcome r;
        r.from = from;
        asio::io_context wio;
        tcp_socket ws(wio);
        ws.assign(protocol, fd);
        try {
          r.claim = accept_handshake(wio, ws, o, until, locked_admit);
        } catch (const std::exception& e) {
          r.refused = e.what();
        }
        std::lock_guard lk(state.m);
        std::erase(state.live_fds, fd);
        --state.in_flight;
        state.slot_freed.notify_one();
        if (r.refused.empty() && ws.is_open()) {
          r.fd = ws.release();
        } else {
          if (r.refused.empty()) r.refused = "the connection closed during the handshake";
          close_quietly(ws);
        }
        state.done.push_back(std::move(r));
      });
    }
  } catch (...) {
    finish();
    throw;
  }
  finish();
}

inline constexpr std::size_t table_entry = 18;  // IPv6 (v4-mapped) address + port

/// Every rank's connection to every other, indexed by world rank (self: null).
using mesh = std::vector<std::unique_ptr<tcp_socket>>;

/// Rank 0's side: accept and authenticate every rank, send the address table.
inline mesh host_rendezvous(asio::io_context& io, const tcp_options& o, steady::time_point deadline) {
  mesh links(o.size);
  if (o.size == 1) return links;
  const auto ep = resolve(io, o.master_addr, o.master_port);
  asio::ip::tcp::acceptor acc(io);
  boost::system::error_code ec;
  acc.open(ep.protocol(), ec);
  if (!ec) acc.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec && o.socket_buffer_bytes > 0) acc.set_option(asio::socket_base::receive_buffer_size(o.socket_buffer_bytes), ec);
  if (!ec) acc.bind(ep, ec);
  if (!ec) acc.listen(asio::socket_base::max_listen_connections, ec);
  SEMOE_CHECK(!ec, "semoe::comm::tcp: rank 0 cannot listen on SEMOE_MASTER_ADDR:SEMOE_MASTER_PORT = ", ep, ": ",
              ec.message());
  std::vector<unsigned char> table(table_entry * o.size);
  const int ls = o.local_size == 0 ? o.size : o.local_size;
  accept_ranks(
      io, acc, o, deadline, o.size - 1,
      [&](const join_claim& c) -> std::string {
        if (c.rank < 1 || c.rank >= o.size) return semoe::detail::concat("it claims rank ", c.rank, " of ", o.size);
        if (links[c.rank]) return semoe::detail::concat("rank ", c.rank, " has already joined");
        if (c.local_size != ls)
          return semoe::detail::concat("rank ", c.rank, " has local size ", c.local_size, ", rank 0 has ", ls);
        if (c.port < 1 || c.port > 65535) return semoe::detail::concat("it listens on port ", c.port);
        return {};
      },
      [&](tcp_socket s, const join_claim& c) {
        auto a = s.remote_endpoint().address();
        const auto v6 = a.is_v4() ? asio::ip::make_address_v6(asio::ip::v4_mapped, a.to_v4()) : a.to_v6();
        const auto bytes = v6.to_bytes();
        std::copy(bytes.begin(), bytes.end(), table.begin() + table_entry * c.rank);
        table[table_entry * c.rank + 16] = static_cast<unsigned char>(c.port);
        table[table_entry * c.rank + 17] = static_cast<unsigned char>(c.port >> 8);
        links[c.rank] = std::make_unique<tcp_socket>(std::move(s));
      },
      [&] {
        std::string m = "ranks";
        for (int r = 1; r < o.size; ++r)
          if (!links[r]) m += " " + std::to_string(r);
        return m + " to join";
      });
  for (int r = 1; r < o.size; ++r) {
    try {
      write_frame(io, *links[r], deadline, wire::kind::table, table);
    } catch (const error& e) {
      semoe::detail::fail("semoe::comm::tcp: rank 0: sending the address table to rank ", r, " failed: ", e.what());
    }
  }
  return links;
}

/// A rank > 0 joins: connect to the master, authenticate both ways, announce
/// `listen_port`, receive the address table (18 bytes per rank).
inline std::vector<unsigned char> join_master(asio::io_context& io, tcp_socket& master, const tcp_options& o,
                                              int listen_port, steady::time_point deadline) {
  try {
    connect_handshake(io, master, o, 0, listen_port, deadline);
    return read_frame(io, master, deadline, wire::kind::table, table_entry * o.size);
  } catch (const error& e) {
    semoe::detail::fail("semoe::comm::tcp: rank ", o.rank, ": rendezvous with rank 0 at ", o.master_addr, ":",
                        o.master_port, " failed: ", e.what());
  }
}

/// The whole rendezvous: returns one authenticated connection per peer.
inline mesh rendezvous(asio::io_context& io, const tcp_options& o) {
  const auto deadline = steady::now() + o.timeout;
  if (o.rank == 0) return host_rendezvous(io, o, deadline);
  mesh links(o.size);
  const auto master_ep = resolve(io, o.master_addr, o.master_port);
  tcp_socket master = connect_retry(io, master_ep, o, deadline, "rank 0 (SEMOE_MASTER_ADDR:SEMOE_MASTER_PORT)");
  // Listen where rank 0 sees us: the address of our end of this connection.
  asio::ip::tcp::acceptor acc(io);
  boost::system::error_code ec;
  const asio::ip::tcp::endpoint here(master.local_endpoint().address(), 0);
  acc.open(here.protocol(), ec);
  if (!ec && o.socket_buffer_bytes > 0) acc.set_option(asio::socket_base::receive_buffer_size(o.socket_buffer_bytes), ec);
  if (!ec) acc.bind(here, ec);
  if (!ec) acc.listen(asio::socket_base::max_listen_connections, ec);
  SEMOE_CHECK(!ec, "semoe::comm::tcp: rank ", o.rank, " cannot listen on ", here, ": ", ec.message());
  const auto table = join_master(io, master, o, acc.local_endpoint().port(), deadline);
  links[0] = std::make_unique<tcp_socket>(std::move(master));
  // The lower rank connects; every higher rank accepts before it is needed,
  // because it first finishes its own (even higher) connections.
  for (int q = o.rank + 1; q < o.size; ++q) {
    const unsigned char* e = &table[table_entry * q];
    asio::ip::address_v6::bytes_type b{};
    std::copy(e, e + 16, b.begin());
    const asio::ip::address_v6 v6(b);
    const asio::ip::address a = v6.is_v4_mapped() ? asio::ip::address(asio::ip::make_address_v4(asio::ip::v4_mapped, v6))
                                                  : asio::ip::address(v6);
    const asio::ip::tcp::endpoint ep(a, static_cast<unsigned short>(e[16] | e[17] << 8));
    tcp_socket s = connect_retry(io, ep, o, deadline, semoe::detail::concat("rank ", q));
    try {
      connect_handshake(io, s, o, q, 0, deadline);
    } catch (const error& err) {
      semoe::detail::fail("semoe::comm::tcp: rank ", o.rank, ": connecting to rank ", q, " at ", ep,
                          " failed: ", err.what());
    }
    links[q] = std::make_unique<tcp_socket>(std::move(s));
  }
  accept_ranks(
      io, acc, o, deadline, o.rank - 1,
      [&](const join_claim& c) -> std::string {
        if (c.rank < 1 || c.rank >= o.rank) return semoe::detail::concat("it claims rank ", c.rank, ", expected a rank in [1, ", o.rank, ")");
        if (links[c.rank]) return semoe::detail::concat("rank ", c.rank, " is already connected");
        return {};
      },
      [&](tcp_socket s, const join_claim& c) { links[c.rank] = std::make_unique<tcp_socket>(std::move(s)); },
      [&] {
        std::string m = "ranks";
        for (int r = 1; r < o.rank; ++r)
          if (!links[r]) m += " " + std::to_string(r);
        return m + " to connect";
      });
  return links;
}

}  // namespace detail
}  // namespace semoe::comm
