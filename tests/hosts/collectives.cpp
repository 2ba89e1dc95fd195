// semoe_hosts_collectives: one rank of a job started by semoe-run, used by the
// two-host test (two_hosts.py). Each round exchanges bytes that are a pure
// function of (round, source, destination, index) with the flat all-to-all of
// comm::tcp and with comm::hierarchical over it, all-reduces a vector whose
// sum is known, and checks every byte it receives against that function. The
// rounds cover small messages, messages past the eager limit and multi-MiB
// messages that travel in chunks. Rank 0 prints one line per round and, at the
// end, a digest of what every rank received: the same on any placement of the
// ranks over hosts.
//
//   semoe-run -n 4 semoe_hosts_collectives [--rounds N] [--seconds S]
//
// --seconds S keeps going with small rounds for S seconds after the checked
// ones (the link-failure cases cut the link while it does).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "semoe/comm/hierarchical.hpp"
#include "semoe/comm/tcp.hpp"

namespace {

using semoe::index_t;

/// The byte that `src` sends to `dst` at position i of round r.
std::uint8_t expected_byte(int r, int src, int dst, std::size_t i) {
  std::uint64_t x = (static_cast<std::uint64_t>(r) << 48) ^ (static_cast<std::uint64_t>(src) << 40) ^
                    (static_cast<std::uint64_t>(dst) << 32) ^ i;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  return static_cast<std::uint8_t>(x);
}

/// Bytes `src` sends to `dst` in round r: small, past the eager limit
/// (256 KiB) and multi-MiB (chunked at 1 MiB), by round, with zero counts too.
std::size_t message_bytes(int r, int src, int dst) {
  const std::size_t scale[] = {64, 4096, 300'000, 3'000'000};
  const std::size_t base = scale[r % 4];
  const std::size_t k = static_cast<std::size_t>((src * 7 + dst * 13 + r * 5) % 11);
  return k == 0 ? 0 : base * k / 5 + static_cast<std::size_t>(src + dst);
}

std::uint64_t fnv1a(std::uint64_t h, const std::uint8_t* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h;
}

/// One checked round on communicator c; returns the digest of what arrived.
template <class C>
std::uint64_t exchange(C& c, int r, const char* algo) {
  const int P = c.size(), me = c.rank();
  std::vector<index_t> send_counts(static_cast<std::size_t>(P)), recv_counts(static_cast<std::size_t>(P));
  std::vector<std::uint8_t> send;
  for (int d = 0; d < P; ++d) {
    const std::size_t n = message_bytes(r, me, d);
    send_counts[static_cast<std::size_t>(d)] = static_cast<index_t>(n);
    for (std::size_t i = 0; i < n; ++i) send.push_back(expected_byte(r, me, d, i));
  }
  std::size_t total = 0;
  for (int s = 0; s < P; ++s) total += recv_counts[static_cast<std::size_t>(s)] = static_cast<index_t>(message_bytes(r, s, me));
  std::vector<std::uint8_t> recv(total);
  semoe::comm::all_to_all_v(c, std::span<const std::uint8_t>(send), std::span<const index_t>(send_counts),
                            std::span<std::uint8_t>(recv), std::span<const index_t>(recv_counts));
  std::size_t at = 0;
  for (int s = 0; s < P; ++s)
    for (std::size_t i = 0; i < message_bytes(r, s, me); ++i, ++at)
      if (recv[at] != expected_byte(r, s, me, i)) {
        std::fprintf(stderr, "collectives: rank %d, round %d, %s all-to-all: byte %zu from rank %d is %u, expected %u\n",
                     me, r, algo, i, s, recv[at], expected_byte(r, s, me, i));
        std::exit(3);
      }
  return fnv1a(0xcbf29ce484222325ULL, recv.data(), recv.size());
}

/// An all-reduce whose exact sum every rank can compute.
template <class C>
void reduce_round(C& c, int r) {
  const int P = c.size();
  std::vector<std::int64_t> v(1000);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::int64_t>(i) * (c.rank() + 1) + r;
  semoe::comm::all_reduce(c, std::span<std::int64_t>(v));
  for (std::size_t i = 0; i < v.size(); ++i) {
    const std::int64_t want = static_cast<std::int64_t>(i) * P * (P + 1) / 2 + static_cast<std::int64_t>(r) * P;
    if (v[i] != want) {
      std::fprintf(stderr, "collectives: rank %d, round %d: all-reduce element %zu is %lld, expected %lld\n", c.rank(),
                   r, i, static_cast<long long>(v[i]), static_cast<long long>(want));
      std::exit(3);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 8;
  double seconds = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "--rounds" || a == "--seconds") && i + 1 < argc) {
      (a == "--rounds" ? void(rounds = std::atoi(argv[++i])) : void(seconds = std::atof(argv[++i])));
    } else if (a == "--help" || a == "-h") {
      std::printf("usage: semoe-run -n P semoe_hosts_collectives [--rounds N] [--seconds S]\n"
                  "Checks flat and hierarchical all-to-all and all-reduce byte for byte across the job's ranks.\n");
      return 0;
    } else {
      std::fprintf(stderr, "collectives: unknown argument %s (see --help)\n", a.c_str());
      return 2;
    }
  }
  try {
    auto world = semoe::comm::tcp::from_env();
    semoe::comm::hierarchical<semoe::comm::tcp> hier(world.split(0, world.rank()));
    const int me = world.rank(), P = world.size();
    std::uint64_t digest[2] = {0, 0};
    for (int r = 0; r < rounds; ++r) {
      const std::uint64_t flat = exchange(world, r, "flat");
      const std::uint64_t two_step = exchange(hier, r, "hierarchical");
      reduce_round(world, r);
      digest[0] ^= flat * (2 * static_cast<std::uint64_t>(r) + 1);
      digest[1] ^= two_step * (2 * static_cast<std::uint64_t>(r) + 1);
      if (me == 0) std::printf("round %d: flat and hierarchical all-to-all and all-reduce checked\n", r);
      std::fflush(stdout);
    }
    // Every rank's digests, so rank 0 prints the job's.
    std::vector<std::uint64_t> all(2 * static_cast<std::size_t>(P));
    semoe::comm::all_gather(world, std::span<const std::uint64_t>(digest, 2), std::span<std::uint64_t>(all));
    if (me == 0) {
      std::uint64_t job[2] = {0xcbf29ce484222325ULL, 0xcbf29ce484222325ULL};
      for (int s = 0; s < P; ++s)
        for (int h = 0; h < 2; ++h) job[h] = fnv1a(job[h], reinterpret_cast<const std::uint8_t*>(&all[2 * s + h]), 8);
      std::printf("digest flat %016llx hierarchical %016llx ranks %d nodes %d\n", static_cast<unsigned long long>(job[0]),
                  static_cast<unsigned long long>(job[1]), P, P / world.local_size());
    }
    std::fflush(stdout);
    // Rank 0's clock decides when to stop, so every rank runs the same rounds.
    const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    for (int r = rounds;; ++r) {
      int more = me == 0 && std::chrono::steady_clock::now() < until;
      semoe::comm::broadcast(world, std::span<int>(&more, 1), 0);
      if (!more) break;
      exchange(world, r & ~3, "flat");  // small messages only
      if (me == 0 && r % 50 == 0) std::printf("round %d\n", r), std::fflush(stdout);
    }
    world.barrier();
    return 0;
  } catch (const semoe::error& e) {
    std::fprintf(stderr, "collectives: rank %s: %s\n", std::getenv("SEMOE_RANK"), e.what());
    return 1;
  }
}
