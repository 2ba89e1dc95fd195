// semoe/launch/launcher.hpp: start P ranks of a program on this host, like
// torchrun: each rank gets SEMOE_RANK, SEMOE_WORLD_SIZE, SEMOE_LOCAL_RANK,
// SEMOE_LOCAL_SIZE, SEMOE_MASTER_ADDR, SEMOE_MASTER_PORT and a fresh shared
// SEMOE_SECRET; every line a rank prints is prefixed with its rank; SIGINT and
// SIGTERM are forwarded; the first rank that fails stops the others (after
// `settle`, so they can print their own error first), and the job's exit
// status is that rank's; a rank frozen by a stop signal is named with it. Several hosts: run the launcher on each
// with --nnodes, --node-rank and the same --master and SEMOE_SECRET.
//
// Elastic jobs (run_elastic, `semoe-run --elastic --min-ranks M`): when a
// rank fails, the job starts again on the ranks that remain, as long as they
// are at least M. Each attempt gets SEMOE_RESTART_COUNT (0, 1, ...); the
// program resumes from its last complete checkpoint, one it can load on any
// number of ranks (train/portable_checkpoint.hpp). One host only.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "semoe/core/error.hpp"

namespace semoe::launch {

struct options {
  int ranks_per_node = 1;          ///< -n
  int nnodes = 1;                  ///< hosts taking part, each running a launcher
  int node_rank = 0;               ///< this host's index
  std::string master_addr = "127.0.0.1";
  int master_port = 0;             ///< 0: pick a free port (single node only)
  std::string secret;              ///< empty: SEMOE_SECRET, else a fresh random one
  /// After a rank fails, how long the others get to end on their own (they
  /// learn of the failure from the job and print their own error) before
  /// they are sent SIGTERM.
  std::chrono::milliseconds settle{1500};
  std::chrono::milliseconds grace{3000};  ///< SIGTERM -> SIGKILL delay when stopping ranks
  std::FILE* out = stdout;         ///< prefixed rank output goes here
  bool prefix = true;
  int min_ranks = 1;               ///< run_elastic: the fewest ranks a restart may run on
  /// Called in the launcher for each rank it starts: (attempt, rank, pid).
  std::function<void(int, int, pid_t)> on_spawn;
};

struct result {
  int exit_code = 0;     ///< 0, a failing rank's exit status, or 128 + its signal
  int failed_rank = -1;  ///< the first rank that failed, or -1
  int stopped_rank = -1; ///< a rank found stopped by a signal (SIGSTOP, SIGTSTP) when the job failed, or -1
  int interrupted = 0;   ///< the signal (SIGINT, SIGTERM) that stopped the job from outside, or 0
  int attempts = 1;      ///< run_elastic: attempts made
  int ranks = 0;         ///< ranks of the last attempt (this host's)
};

namespace detail {

inline std::string random_secret() {
  unsigned char b[32];
  const int fd = ::open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  SEMOE_CHECK(fd >= 0, "semoe-run: cannot open /dev/urandom: ", std::strerror(errno));
  std::size_t got = 0;
  while (got < sizeof b) {
    const ssize_t n = ::read(fd, b + got, sizeof b - got);
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  ::close(fd);
  SEMOE_CHECK(got == sizeof b, "semoe-run: short read from /dev/urandom");
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned char c : b) s += {hex[c >> 4], hex[c & 15]};
  return s;
}

/// A port that was free a moment ago on the loopback interface.
inline int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  SEMOE_CHECK(fd >= 0, "semoe-run: socket(): ", std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  ::close(fd);
  SEMOE_CHECK(ok, "semoe-run: cannot find a free port: ", std::strerror(errno));
  return ntohs(a.sin_port);
}

inline volatile sig_atomic_t g_signal = 0;
inline void on_signal(int s) { g_signal = s; }

/// Splits a child's output into lines and prefixes each with "[rank] ".
struct line_pump {
  int fd = -1;
  int rank = 0;
  std::string pending;
  void drain(std::FILE* out, bool prefix, bool final) {
    char buf[65536];
    for (;;) {
      const ssize_t n = ::read(fd, buf, sizeof buf);
      if (n > 0) {
        pending.append(buf, static_cast<std::size_t>(n));
        continue;
      }
      if (n == 0 || (n < 0 && errno != EINTR)) {
        if (n == 0 || errno != EAGAIN) {
          ::close(fd);
          fd = -1;
        }
        break;
      }
    }
    std::size_t start = 0, nl;
    while ((nl = pending.find('\n', start)) != std::string::npos) {
      emit(out, prefix, pending.substr(start, nl - start));
      start = nl + 1;
    }
    pending.erase(0, start);
    if ((final || fd < 0) && !pending.empty()) {
      emit(out, prefix, pending);
      pending.clear();
    }
  }
  void emit(std::FILE* out, bool prefix, const std::string& line) const {
    if (prefix)
      std::fprintf(out, "[%d] %s\n", rank, line.c_str());
    else
      std::fprintf(out, "%s\n", line.c_str());
    std::fflush(out);
  }
};

}  // namespace detail

inline void validate(const options& o) {
  SEMOE_CHECK(o.ranks_per_node >= 1 && o.ranks_per_node <= 1024, "semoe-run: -n ", o.ranks_per_node,
              ": expected 1..1024 ranks per node");
  SEMOE_CHECK(o.nnodes >= 1, "semoe-run: --nnodes ", o.nnodes, ": expected >= 1");
  SEMOE_CHECK(o.node_rank >= 0 && o.node_rank < o.nnodes, "semoe-run: --node-rank ", o.node_rank,
              ": expected 0..", o.nnodes - 1);
  SEMOE_CHECK(o.master_port >= 0 && o.master_port < 65536, "semoe-run: master port ", o.master_port,
              ": expected 0..65535");
  SEMOE_CHECK(o.nnodes == 1 || o.master_port > 0,
              "semoe-run: with --nnodes > 1 every host needs the same --master ADDR:PORT");
}

/// Run argv on o.ranks_per_node local ranks; returns when all have ended.
/// `attempt` is handed to the ranks as SEMOE_RESTART_COUNT.
inline result run(const std::vector<std::string>& argv, options o, int attempt = 0) {
  validate(o);
  SEMOE_CHECK(!argv.empty(), "semoe-run: no program given");
  if (o.master_port == 0) o.master_port = detail::free_port();
  if (o.secret.empty()) {
    const char* s = std::getenv("SEMOE_SECRET");
    o.secret = (s && *s) ? s : detail::random_secret();
  }
  const int L = o.ranks_per_node, world = L * o.nnodes;

  struct sigaction sa{}, old_int{}, old_term{};
  sa.sa_handler = detail::on_signal;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, &old_int);
  ::sigaction(SIGTERM, &sa, &old_term);
  detail::g_signal = 0;

  std::vector<pid_t> pids(static_cast<std::size_t>(L), -1);
  std::vector<detail::line_pump> pumps;
  for (int l = 0; l < L; ++l) {
    int fds[2];
    SEMOE_CHECK(::pipe2(fds, O_CLOEXEC) == 0, "semoe-run: pipe(): ", std::strerror(errno));
    const int rank = o.node_rank * L + l;
    // Block the forwarded signals across fork: a child must not run our
    // handler (and so ignore a stop) before it has reset them to default.
    sigset_t fwd, before;
    sigemptyset(&fwd);
    sigaddset(&fwd, SIGINT);
    sigaddset(&fwd, SIGTERM);
    ::sigprocmask(SIG_BLOCK, &fwd, &before);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::signal(SIGINT, SIG_DFL);
      ::signal(SIGTERM, SIG_DFL);
      ::sigprocmask(SIG_SETMASK, &before, nullptr);
      ::setpgid(0, 0);  // a rank and everything it starts are stopped together
      ::dup2(fds[1], STDOUT_FILENO);
      ::dup2(fds[1], STDERR_FILENO);
      ::setenv("SEMOE_RANK", std::to_string(rank).c_str(), 1);
      ::setenv("SEMOE_WORLD_SIZE", std::to_string(world).c_str(), 1);
      ::setenv("SEMOE_LOCAL_RANK", std::to_string(l).c_str(), 1);
      ::setenv("SEMOE_LOCAL_SIZE", std::to_string(L).c_str(), 1);
      ::setenv("SEMOE_MASTER_ADDR", o.master_addr.c_str(), 1);
      ::setenv("SEMOE_MASTER_PORT", std::to_string(o.master_port).c_str(), 1);
      ::setenv("SEMOE_SECRET", o.secret.c_str(), 1);
      ::setenv("SEMOE_RESTART_COUNT", std::to_string(attempt).c_str(), 1);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      std::fprintf(stderr, "semoe-run: cannot run '%s': %s\n", args[0], std::strerror(errno));
      std::fflush(stderr);
      ::_exit(127);
    }
    ::sigprocmask(SIG_SETMASK, &before, nullptr);
    SEMOE_CHECK(pid >= 0, "semoe-run: fork(): ", std::strerror(errno));
    ::setpgid(pid, pid);  // also here: no race with an early stop_all
    ::close(fds[1]);
    ::fcntl(fds[0], F_SETFL, ::fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    pids[l] = pid;
    pumps.push_back({fds[0], rank, {}});
    if (o.on_spawn) o.on_spawn(attempt, rank, pid);
  }

  result res;
  res.ranks = L;
  int alive = L;
  bool stopping = false;
  std::vector<int> stopped_by(static_cast<std::size_t>(L), 0);  // the signal that stopped a rank, 0: running
  auto stop_deadline = std::chrono::steady_clock::now();
  auto term_at = std::chrono::steady_clock::time_point::max();  // SIGTERM once the failure has settled
  auto stop_all = [&](int sig) {
    for (pid_t p : pids)
      if (p > 0) ::kill(-p, sig);
  };
  while (alive > 0 || std::any_of(pumps.begin(), pumps.end(), [](auto& p) { return p.fd >= 0; })) {
    std::vector<pollfd> pfds;
    for (auto& p : pumps)
      if (p.fd >= 0) pfds.push_back({p.fd, POLLIN, 0});
    if (!pfds.empty()) ::poll(pfds.data(), pfds.size(), 100);
    else ::usleep(20000);
    for (auto& p : pumps)
      if (p.fd >= 0) p.drain(o.out, o.prefix, false);

    if (detail::g_signal && !stopping) {  // forward Ctrl-C / TERM to every rank
      stop_all(detail::g_signal);
      res.exit_code = 128 + detail::g_signal;
      res.interrupted = detail::g_signal;
      stopping = true;
      stop_deadline = std::chrono::steady_clock::now() + o.grace;
    }
    for (int l = 0; l < L; ++l) {
      if (pids[l] <= 0) continue;
      int status = 0;
      const pid_t r = ::waitpid(pids[l], &status, WNOHANG | WUNTRACED | WCONTINUED);
      if (r != pids[l]) continue;
      const int rank = o.node_rank * L + l;
      if (WIFSTOPPED(status)) {  // frozen: its peers will time out waiting for it
        stopped_by[static_cast<std::size_t>(l)] = WSTOPSIG(status);
        std::fprintf(stderr, "semoe-run: rank %d was stopped by signal %d (%s)\n", rank, WSTOPSIG(status),
                     ::strsignal(WSTOPSIG(status)));
        continue;
      }
      if (WIFCONTINUED(status)) {
        stopped_by[static_cast<std::size_t>(l)] = 0;
        continue;
      }
      pids[l] = -1;
      --alive;
      const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      if (code != 0 && res.failed_rank < 0 && !stopping) {
        res.failed_rank = rank;
        res.exit_code = code;
        std::string frozen;
        for (int s = 0; s < L; ++s)
          if (stopped_by[static_cast<std::size_t>(s)] && res.stopped_rank < 0) {
            res.stopped_rank = o.node_rank * L + s;
            frozen = semoe::detail::concat("; rank ", res.stopped_rank, " is stopped (signal ",
                                           stopped_by[static_cast<std::size_t>(s)], ") and may be the cause");
          }
        std::fprintf(stderr, "semoe-run: rank %d failed (%s %d)%s; stopping the other ranks\n", res.failed_rank,
                     WIFEXITED(status) ? "exit status" : "signal", WIFEXITED(status) ? code : WTERMSIG(status),
                     frozen.c_str());
        stopping = true;
        term_at = std::chrono::steady_clock::now() + o.settle;  // first, let the others say what they saw
        stop_deadline = term_at + o.grace;
      }
    }
    const auto now = std::chrono::steady_clock::now();
    if (stopping && alive > 0 && now > term_at) {
      stop_all(SIGTERM);
      stop_all(SIGCONT);  // a stopped rank acts on its SIGTERM only once it runs
      term_at = std::chrono::steady_clock::time_point::max();
    }
    if (stopping && alive > 0 && now > stop_deadline) stop_all(SIGKILL);
  }
  for (auto& p : pumps) p.drain(o.out, o.prefix, true);
  ::sigaction(SIGINT, &old_int, nullptr);
  ::sigaction(SIGTERM, &old_term, nullptr);
  return res;
}

/// Run argv on o.ranks_per_node ranks; when a rank fails, run it again on
/// one rank fewer, down to o.min_ranks. Returns the last attempt's result:
/// exit code 0 once an attempt finishes, else the failure that ended it.
inline result run_elastic(const std::vector<std::string>& argv, options o) {
  validate(o);
  SEMOE_CHECK(o.nnodes == 1, "semoe-run --elastic: one host only (--nnodes ", o.nnodes,
              "); restarting across hosts is not built");
  SEMOE_CHECK(o.min_ranks >= 1 && o.min_ranks <= o.ranks_per_node, "semoe-run: --min-ranks ", o.min_ranks,
              ": expected 1..", o.ranks_per_node, " (-n)");
  const bool fixed_port = o.master_port != 0;
  for (int attempt = 0;; ++attempt) {
    if (!fixed_port) o.master_port = 0;  // a fresh port: the last attempt's may linger in TIME_WAIT
    result res = run(argv, o, attempt);
    res.attempts = attempt + 1;
    if (res.exit_code == 0 || res.interrupted || res.failed_rank < 0) return res;
    const int remain = o.ranks_per_node - 1;
    if (remain < o.min_ranks) {
      std::fprintf(stderr, "semoe-run: rank %d failed; %d ranks would remain, fewer than --min-ranks %d: giving up\n",
                   res.failed_rank, remain, o.min_ranks);
      return res;
    }
    std::fprintf(stderr, "semoe-run: rank %d failed; restarting on the %d ranks that remain (attempt %d), from the "
                 "program's last complete checkpoint\n", res.failed_rank, remain, attempt + 2);
    std::fflush(stderr);
    o.ranks_per_node = remain;
  }
}

}  // namespace semoe::launch
