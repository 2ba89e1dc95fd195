// Benchmark: flat vs hierarchical all-to-all over comm::tcp on loopback, for
// 64 KiB, 1 MiB and 16 MiB per destination on P = 2 and 4 processes, against
// the raw throughput of one TCP socket pair measured in the same run.
//
// --backend nccl measures comm::nccl instead, one process per GPU (see
// all_to_all_nccl.hpp).
//
// --backend mpi (builds with MPI) starts itself under mpiexec for P = 2 and
// 4 and measures, in the same processes and interleaved rounds: comm::mpi's
// flat all-to-all, a bare MPI_Alltoallv of the same bytes (the floor),
// comm::tcp over loopback and the socket pair. ratio_vs_bare_mpi divides each
// by the bare MPI_Alltoallv's GB/s.
//
// Run it with no arguments: it starts itself as P worker processes through
// the launcher. The workers simulate two nodes (SEMOE_LOCAL_SIZE = P / 2), so
// the hierarchical algorithm's inter-node message count can be compared with
// the flat one's. Ranks 0 and 1 also hold one plain TCP connection: the
// baseline, rank 1 sending to rank 0 in messages of the same size.
//
// gb_per_s counts the bytes that leave a rank, summed over ranks, per second:
// P (P - 1) x bytes_per_dest per all-to-all. ratio_vs_socket divides it by the
// socket pair's GB/s at the same message size. Socket pair, flat and
// hierarchical run in 5 interleaved rounds; figures are medians over rounds.
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "semoe/comm/hierarchical.hpp"
#include "semoe/comm/tcp.hpp"
#include "semoe/launch/launcher.hpp"
#ifdef SEMOE_BENCH_WITH_NCCL
#include "all_to_all_nccl.hpp"
#endif
#ifdef SEMOE_BENCH_WITH_MPI
#include "semoe/comm/mpi.hpp"
#endif

using namespace semoe;

namespace {

const std::vector<std::size_t> sizes = {64 << 10, 1 << 20, 16 << 20};
constexpr int rounds = 5;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// One loopback TCP connection between ranks 0 and 1 of the job, for the
/// raw baseline; the other ranks only join the barriers.
template <class World>
class socket_pair {
 public:
  explicit socket_pair(World& world) : world_(world) {
    const int rank = world.rank();
    std::vector<std::int64_t> port{0};
    int listener = -1;
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (rank == 0) {
      listener = ::socket(AF_INET, SOCK_STREAM, 0);
      socklen_t len = sizeof a;
      SEMOE_CHECK(::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::listen(listener, 1) == 0 &&
                      ::getsockname(listener, reinterpret_cast<sockaddr*>(&a), &len) == 0,
                  "bench_all_to_all: cannot listen on loopback: ", std::strerror(errno));
      port[0] = ntohs(a.sin_port);
    }
    comm::all_reduce(world, std::span<std::int64_t>(port));
    if (rank == 1) {
      fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
      a.sin_port = htons(static_cast<std::uint16_t>(port[0]));
      SEMOE_CHECK(::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0,
                  "bench_all_to_all: cannot connect to rank 0: ", std::strerror(errno));
    } else if (rank == 0) {
      fd_ = ::accept(listener, nullptr, nullptr);
      ::close(listener);
    }
    int one = 1;
    if (fd_ >= 0) ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  ~socket_pair() {
    if (fd_ >= 0) ::close(fd_);
  }
  /// Rank 1 sends `total` bytes in `message`-byte sends from one buffer,
  /// rank 0 receives them; GB/s as rank 0 saw it (0 on other ranks).
  double gbps(std::size_t message, std::size_t total) {
    std::vector<char> buf(message, 'x');
    world_.barrier();
    double rate = 0;
    if (world_.rank() == 1) {
      for (std::size_t sent = 0; sent < total;) {
        const ssize_t n = ::send(fd_, buf.data() + sent % message, std::min(message - sent % message, total - sent), 0);
        SEMOE_CHECK(n > 0, "bench_all_to_all: send failed: ", std::strerror(errno));
        sent += static_cast<std::size_t>(n);
      }
    } else if (world_.rank() == 0) {
      const double t0 = now();
      for (std::size_t got = 0; got < total;) {
        const ssize_t n = ::recv(fd_, buf.data(), std::min(message, total - got), 0);
        SEMOE_CHECK(n > 0, "bench_all_to_all: recv failed: ", std::strerror(errno));
        got += static_cast<std::size_t>(n);
      }
      rate = static_cast<double>(total) / (now() - t0) * 1e-9;
    }
    world_.barrier();
    return rate;
  }

 private:
  World& world_;
  int fd_ = -1;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int worker() {
  // Two simulated nodes: local_size = P / 2, ranks placed node by node.
  const int P = std::atoi(std::getenv("SEMOE_WORLD_SIZE")), rank = std::atoi(std::getenv("SEMOE_RANK"));
  const int L = std::max(1, P / 2);
  ::setenv("SEMOE_LOCAL_SIZE", std::to_string(L).c_str(), 1);
  ::setenv("SEMOE_LOCAL_RANK", std::to_string(rank % L).c_str(), 1);
  auto world = comm::tcp::from_env();
  comm::hierarchical<comm::tcp> hier(world.split(0, rank));
  socket_pair<comm::tcp> raw(world);
  for (std::size_t bytes : sizes) {
    const auto per = static_cast<index_t>(bytes / sizeof(float));
    std::vector<float> send(static_cast<std::size_t>(per * P), 1.0f), recv(send.size());
    const std::vector<index_t> counts(static_cast<std::size_t>(P), per);
    const int reps = static_cast<int>(std::clamp<std::size_t>((std::size_t{256} << 20) / (bytes * P), 3, 200));
    const double moved = static_cast<double>(P) * (P - 1) * static_cast<double>(bytes);
    auto gbps = [&](auto& c) {
      auto once = [&] {
        c.all_to_all_v_async(std::span<const float>(send), std::span<const index_t>(counts), std::span<float>(recv),
                             std::span<const index_t>(counts))
            .wait();
      };
      world.barrier();
      const double t0 = now();
      for (int r = 0; r < reps; ++r) once();
      world.barrier();
      return moved / ((now() - t0) / reps) * 1e-9;
    };
    // Warm-up, then rounds of socket pair, flat, hierarchical: each figure
    // is the median over rounds, and each ratio the median of the rounds'
    // ratios, so a slow spell of the machine weighs on both sides alike.
    gbps(world);
    hier.reset_inter_node_messages();
    gbps(hier);
    const double hier_msgs_per_call = static_cast<double>(hier.inter_node_messages()) / reps;
    std::vector<double> sock, flat, hie, flat_ratio, hier_ratio;
    for (int round = 0; round < rounds; ++round) {
      sock.push_back(raw.gbps(bytes, std::max<std::size_t>(bytes * 8, std::size_t{256} << 20)));
      flat.push_back(gbps(world));
      hie.push_back(gbps(hier));
      flat_ratio.push_back(flat.back() / sock.back());
      hier_ratio.push_back(hie.back() / sock.back());
    }
    double msgs[2] = {static_cast<double>(comm::flat_inter_node_messages(counts, rank, L)),
                      hier_msgs_per_call};
    comm::all_reduce(world, std::span<double>(msgs, 2));
    if (rank == 0)
      for (int h = 0; h < 2; ++h)
        std::printf("RESULT %s\n", nlohmann::json{{"algo", h ? "hierarchical" : "flat"},
                                                  {"ranks", P},
                                                  {"bytes_per_dest", bytes},
                                                  {"gb_per_s", median(h ? hie : flat)},
                                                  {"socket_gb_per_s", median(sock)},
                                                  {"ratio_vs_socket", median(h ? hier_ratio : flat_ratio)},
                                                  {"inter_node_messages", static_cast<std::int64_t>(msgs[h])}}
                                       .dump()
                                       .c_str());
  }
  std::fflush(stdout);
  return 0;
}

#ifdef SEMOE_BENCH_WITH_MPI
/// One rank of an mpiexec job: comm::mpi, a bare MPI_Alltoallv, comm::tcp
/// (a mesh made over MPI: rank 0's port and a fresh secret broadcast) and
/// the socket pair, in interleaved rounds.
int mpi_worker() {
  auto world = comm::mpi::from_env();
  const int P = world.size(), rank = world.rank();
  comm::tcp_options to;
  to.size = P;
  to.rank = rank;
  to.master_addr = "127.0.0.1";
  std::vector<std::int64_t> port{0};
  std::string secret(64, ' ');
  if (rank == 0) {
    port[0] = launch::detail::free_port();
    secret = launch::detail::random_secret();
  }
  comm::broadcast(world, std::span<std::int64_t>(port), 0);
  comm::broadcast(world, std::span<char>(secret.data(), secret.size()), 0);
  to.master_port = static_cast<int>(port[0]);
  to.secret = secret;
  comm::tcp tcp(to);
  socket_pair<comm::mpi> raw(world);
  MPI_Comm bare;
  MPI_Comm_dup(MPI_COMM_WORLD, &bare);
  for (std::size_t bytes : sizes) {
    const auto per = static_cast<index_t>(bytes / sizeof(float));
    std::vector<float> send(static_cast<std::size_t>(per * P), 1.0f), recv(send.size());
    const std::vector<index_t> counts(static_cast<std::size_t>(P), per);
    std::vector<int> icounts(static_cast<std::size_t>(P), static_cast<int>(per)), displs(static_cast<std::size_t>(P));
    for (int q = 0; q < P; ++q) displs[q] = q * static_cast<int>(per);
    const int reps = static_cast<int>(std::clamp<std::size_t>((std::size_t{256} << 20) / (bytes * P), 3, 200));
    const double moved = static_cast<double>(P) * (P - 1) * static_cast<double>(bytes);
    auto timed = [&](auto&& once) {
      world.barrier();
      const double t0 = now();
      for (int r = 0; r < reps; ++r) once();
      world.barrier();
      double t = now() - t0;
      comm::all_reduce(world, std::span<double>(&t, 1), comm::reduce_op::max);
      return moved / (t / reps) * 1e-9;
    };
    auto through = [&](auto& c) {
      return timed([&] {
        c.all_to_all_v_async(std::span<const float>(send), std::span<const index_t>(counts), std::span<float>(recv),
                             std::span<const index_t>(counts))
            .wait();
      });
    };
    auto bare_once = [&] {
      return timed([&] {
        MPI_Alltoallv(send.data(), icounts.data(), displs.data(), MPI_FLOAT, recv.data(), icounts.data(),
                      displs.data(), MPI_FLOAT, bare);
      });
    };
    through(world), through(tcp), bare_once();  // warm-up
    std::vector<double> sock, mpi, tcp_rate, floor, mpi_ratio, tcp_ratio, sock_ratio;
    for (int round = 0; round < rounds; ++round) {
      double s = raw.gbps(bytes, std::max<std::size_t>(bytes * 8, std::size_t{256} << 20));
      comm::broadcast(world, std::span<double>(&s, 1), 0);
      sock.push_back(s);
      floor.push_back(bare_once());
      mpi.push_back(through(world));
      tcp_rate.push_back(through(tcp));
      mpi_ratio.push_back(mpi.back() / floor.back());
      tcp_ratio.push_back(tcp_rate.back() / floor.back());
      sock_ratio.push_back(sock.back() / floor.back());
    }
    if (rank == 0) {
      auto row = [&](const char* c, const std::vector<double>& rate, const std::vector<double>& ratio) {
        std::printf("RESULT %s\n", nlohmann::json{{"algo", "flat"},
                                                  {"comm", c},
                                                  {"ranks", P},
                                                  {"bytes_per_dest", bytes},
                                                  {"gb_per_s", median(rate)},
                                                  {"ratio_vs_bare_mpi", ratio.empty() ? 1.0 : median(ratio)}}
                                       .dump()
                                       .c_str());
      };
      row("bare_mpi_alltoallv", floor, {});
      row("mpi", mpi, mpi_ratio);
      row("tcp", tcp_rate, tcp_ratio);
      row("socket_pair", sock, sock_ratio);
    }
  }
  MPI_Comm_free(&bare);
  std::fflush(stdout);
  return 0;
}

/// The P-rank runs under mpiexec; their RESULT lines.
nlohmann::json run_mpi_jobs(const char* self, const std::vector<int>& worlds) {
  nlohmann::json results = nlohmann::json::array();
  for (int P : worlds) {
    const std::string cmd = std::string(SEMOE_MPIEXEC) + " -n " + std::to_string(P) + " " SEMOE_MPIEXEC_FLAGS " " +
                            self + " --backend mpi 2>&1";
    std::FILE* p = ::popen(cmd.c_str(), "r");
    SEMOE_CHECK(p, "bench_all_to_all: cannot run ", cmd);
    char line[4096];
    std::string all;
    while (std::fgets(line, sizeof line, p)) {
      if (std::strncmp(line, "RESULT ", 7) == 0)
        results.push_back(nlohmann::json::parse(line + 7));
      else
        all += line;
    }
    const int rc = ::pclose(p);
    SEMOE_CHECK(rc == 0, "bench_all_to_all: `", cmd, "` failed:\n", all);
  }
  return results;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  std::string backend = "tcp";
  int ranks = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--backend" && i + 1 < argc) {
      backend = argv[++i];
    } else if (a == "--ranks" && i + 1 < argc) {
      ranks = std::atoi(argv[++i]);
    } else if (a == "--help" || a == "-h") {
      std::printf("usage: bench_all_to_all [--backend tcp|nccl|mpi] [--ranks P]\n"
                  "  tcp:  flat and hierarchical all-to-all over comm::tcp on loopback, P = 2 and 4 processes,\n"
                  "        against one TCP socket pair\n"
                  "  mpi:  comm::mpi, a bare MPI_Alltoallv, comm::tcp and a socket pair in the same mpiexec job,\n"
                  "        P = 2 and 4 (builds with MPI)\n"
                  "  nccl: comm::nccl, one process per GPU (P: all GPUs), against a copy of the same bytes to\n"
                  "        the next GPU (cudaMemcpyPeer) measured in the same run\n");
      return 0;
    } else {
      std::fprintf(stderr, "bench_all_to_all: unknown argument %s (see --help)\n", a.c_str());
      return 2;
    }
  }
  if (backend != "tcp" && backend != "nccl" && backend != "mpi") {
    std::fprintf(stderr, "bench_all_to_all: --backend %s: expected tcp, nccl or mpi\n", backend.c_str());
    return 2;
  }
#ifndef SEMOE_BENCH_WITH_MPI
  if (backend == "mpi") {
    std::fprintf(stderr, "bench_all_to_all: this build has no MPI (configure with MPI installed)\n");
    return 2;
  }
#else
  if (backend == "mpi") {
    try {
      if (std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK"))
        return mpi_worker();
      std::printf("all_to_all over comm::mpi against a bare MPI_Alltoallv, comm::tcp and one socket pair "
                  "(one host, mpiexec)\n");
      const auto results = run_mpi_jobs(argv[0], ranks > 0 ? std::vector<int>{ranks} : std::vector<int>{2, 4});
      std::printf("%-19s %5s %12s %9s %12s\n", "comm", "ranks", "bytes/dest", "GB/s", "vs bare MPI");
      for (const auto& j : results)
        std::printf("%-19s %5d %12zu %9.2f %12.2f\n", j["comm"].get<std::string>().c_str(), j["ranks"].get<int>(),
                    j["bytes_per_dest"].get<std::size_t>(), j["gb_per_s"].get<double>(),
                    j["ratio_vs_bare_mpi"].get<double>());
      std::printf("%s\n", nlohmann::json{{"benchmark", "all_to_all"}, {"backend", "mpi"}, {"results", results}}
                              .dump()
                              .c_str());
      return 0;
    } catch (const semoe::error& e) {
      std::fprintf(stderr, "bench_all_to_all: %s\n", e.what());
      return 1;
    }
  }
#endif
#ifndef SEMOE_BENCH_WITH_NCCL
  if (backend == "nccl") {
    std::fprintf(stderr, "bench_all_to_all: this build has no NCCL (configure with CUDA and NCCL installed)\n");
    return 2;
  }
#endif
  try {
    if (std::getenv("SEMOE_WORLD_SIZE")) {
#ifdef SEMOE_BENCH_WITH_NCCL
      if (backend == "nccl") return bench_nccl::worker(sizes, rounds);
#endif
      return worker();
    }
  } catch (const semoe::error& e) {
    std::fprintf(stderr, "bench_all_to_all: %s\n", e.what());
    return 1;
  }
  std::vector<int> worlds = {2, 4};
#ifdef SEMOE_BENCH_WITH_NCCL
  if (backend == "nccl") {
    int gpus = 0;
    if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus == 0) {
      std::fprintf(stderr, "bench_all_to_all: --backend nccl needs a CUDA device; this machine has none\n");
      return 1;
    }
    worlds = {ranks > 0 ? ranks : gpus};
    std::printf("all_to_all over comm::nccl, one rank per GPU, against a copy of the same bytes to the next GPU\n");
  }
#endif
  if (backend == "tcp") {
    if (ranks > 0) worlds = {ranks};
    std::printf("all_to_all over comm::tcp on loopback (2 simulated nodes), against one socket pair\n");
  }
  nlohmann::json results = nlohmann::json::array();
  for (int P : worlds) {
    std::FILE* out = std::tmpfile();
    launch::options o;
    o.ranks_per_node = P;
    o.out = out;
    o.prefix = false;
    const auto r = launch::run({argv[0], "--backend", backend}, o);
    SEMOE_CHECK(r.exit_code == 0, "bench_all_to_all: the ", P, "-rank run failed (rank ", r.failed_rank, ")");
    std::fflush(out);
    std::rewind(out);
    char line[4096];
    while (std::fgets(line, sizeof line, out))
      if (std::strncmp(line, "RESULT ", 7) == 0) {
        results.push_back(nlohmann::json::parse(line + 7));
      }
    std::fclose(out);
  }
  if (backend == "nccl") {
    std::printf("%5s %12s %12s %14s %16s %9s\n", "ranks", "bytes/dest", "GB/s (sum)", "GB/s per rank",
                "copy GB/s floor", "vs copy");
    for (const auto& j : results)
      std::printf("%5d %12zu %12.2f %14.2f %16.2f %9.2f\n", j["ranks"].get<int>(),
                  j["bytes_per_dest"].get<std::size_t>(), j["gb_per_s"].get<double>(),
                  j["per_rank_gb_per_s"].get<double>(), j["copy_floor_gb_per_s"].get<double>(),
                  j["ratio_vs_copy"].get<double>());
    std::printf("%s\n", nlohmann::json{{"benchmark", "all_to_all"}, {"backend", "nccl"}, {"results", results}}
                            .dump()
                            .c_str());
    return 0;
  }
  std::printf("%-13s %5s %12s %9s %12s %10s %10s\n", "algo", "ranks", "bytes/dest", "GB/s", "socket GB/s",
              "vs socket", "inter-node");
  for (const auto& j : results)
    std::printf("%-13s %5d %12zu %9.2f %12.2f %10.2f %10lld\n", j["algo"].get<std::string>().c_str(),
                j["ranks"].get<int>(), j["bytes_per_dest"].get<std::size_t>(), j["gb_per_s"].get<double>(),
                j["socket_gb_per_s"].get<double>(), j["ratio_vs_socket"].get<double>(),
                static_cast<long long>(j["inter_node_messages"].get<std::int64_t>()));
  std::printf("%s\n",
              nlohmann::json{{"benchmark", "all_to_all"}, {"backend", "tcp"}, {"results", results}}.dump().c_str());
  return 0;
}
