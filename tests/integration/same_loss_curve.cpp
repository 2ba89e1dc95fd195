// Through the launcher: the Fashion-MNIST model and the fortune language model
// trained for 50 steps on 2 and 4 tcp processes, and on 2 thread-ranks, follow
// the loss curve of one process to 1e-4 relative per step; so do 1, 2 and 4
// MPI ranks (test suite "mpi": mpiexec -n P program --comm mpi). The example
// programs are named by SEMOE_FASHION_MNIST and SEMOE_FORTUNE_LM, and mpiexec
// with its flags by SEMOE_MPIEXEC and SEMOE_MPIEXEC_FLAGS (ctest sets them).
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <signal.h>
#include <unistd.h>

#include "semoe/launch/launcher.hpp"
#include "support/files.hpp"

namespace {

using semoe::testing::slurp;

/// "step N loss X" lines (rank 0's, with or without the launcher's prefix).
std::vector<double> losses(const std::string& text) {
  std::map<long, double> by_step;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    const auto at = line.find("step ");
    if (at == std::string::npos || (at != 0 && line.rfind("[0] ", 0) != 0)) continue;
    long step;
    double loss;
    if (std::sscanf(line.c_str() + at, "step %ld loss %lf", &step, &loss) == 2) by_step[step] = loss;
  }
  std::vector<double> v;
  for (auto& [s, l] : by_step) v.push_back(l);
  return v;
}

std::vector<double> curve(const std::string& program, std::vector<std::string> args, int processes) {
  std::FILE* out = std::tmpfile();
  semoe::launch::options o;
  o.ranks_per_node = processes;
  o.out = out;
  args.insert(args.begin(), program);
  const auto r = semoe::launch::run(args, o);
  const std::string text = slurp(out);
  std::fclose(out);
  INFO(text);
  REQUIRE(r.exit_code == 0);
  return losses(text);
}

void check_same(const std::vector<double>& one, const std::vector<double>& many, const std::string& what) {
  REQUIRE(one.size() == 50);
  REQUIRE(many.size() == one.size());
  double worst = 0;
  for (std::size_t s = 0; s < one.size(); ++s) worst = std::max(worst, std::abs(many[s] - one[s]) / std::abs(one[s]));
  INFO(what << ": worst relative difference " << worst);
  CHECK(worst <= 1e-4);
  MESSAGE(what << ": worst relative difference per step " << worst);
}

const char* program(const char* var) {
  const char* p = std::getenv(var);
  return p && *p ? p : nullptr;
}

/// mpiexec's extra flags (Open MPI: --oversubscribe), space-separated.
std::string program_flags() {
  const char* f = std::getenv("SEMOE_MPIEXEC_FLAGS");
  return f ? f : "";
}

}  // namespace

TEST_CASE("fashion_mnist: 2 and 4 tcp processes and 2 thread-ranks follow one process's loss curve") {
  const char* fm = program("SEMOE_FASHION_MNIST");
  if (!fm) {
    MESSAGE("SEMOE_FASHION_MNIST is not set; run this through ctest");
    return;
  }
  const std::vector<std::string> args = {"--steps", "50", "--limit", "8192", "--batch", "64", "--hidden", "128",
                                         "--ffn", "256", "--threads", "1", "--print-loss"};
  const auto one = curve(fm, args, 1);
  check_same(one, curve(fm, args, 2), "fashion_mnist, 2 processes");
  check_same(one, curve(fm, args, 4), "fashion_mnist, 4 processes");
  // One process without the launcher's variables runs --ranks thread-ranks.
  std::vector<std::string> threads = {"env", "-u", "SEMOE_WORLD_SIZE", fm, "--ranks", "2"};
  threads.insert(threads.end(), args.begin(), args.end());
  std::FILE* out = std::tmpfile();
  semoe::launch::options o;
  o.out = out;
  REQUIRE(semoe::launch::run(threads, o).exit_code == 0);
  check_same(one, losses(slurp(out)), "fashion_mnist, 2 thread-ranks");
  std::fclose(out);
}

TEST_CASE("fortune_lm: 2 and 4 tcp processes follow one process's loss curve") {
  const char* lm = program("SEMOE_FORTUNE_LM");
  if (!lm) {
    MESSAGE("SEMOE_FORTUNE_LM is not set; run this through ctest");
    return;
  }
  const std::vector<std::string> args = {"--steps", "50", "--batch", "64", "--eval-every", "0", "--eval-bytes",
                                         "1024", "--threads", "1", "--print-loss"};
  const auto one = curve(lm, args, 1);
  check_same(one, curve(lm, args, 2), "fortune_lm, 2 processes");
  check_same(one, curve(lm, args, 4), "fortune_lm, 4 processes");
}

namespace {

/// The curve of `program args --comm mpi` on P ranks under mpiexec.
std::vector<double> mpi_curve(const char* mpiexec, const std::string& program, const std::vector<std::string>& args,
                              int P) {
  std::vector<std::string> cmd{"-n", std::to_string(P)};
  std::istringstream flags(program_flags());
  for (std::string f; flags >> f;) cmd.push_back(f);
  cmd.push_back(program);
  cmd.insert(cmd.end(), args.begin(), args.end());
  cmd.push_back("--comm");
  cmd.push_back("mpi");
  return curve(mpiexec, cmd, 1);
}

}  // namespace

TEST_SUITE("mpi") {
TEST_CASE("fashion_mnist and fortune_lm: 1, 2 and 4 MPI ranks follow one process's loss curve") {
  const char* mpiexec = program("SEMOE_MPIEXEC");
  const char* fm = program("SEMOE_FASHION_MNIST");
  const char* lm = program("SEMOE_FORTUNE_LM");
  REQUIRE_MESSAGE((mpiexec && fm && lm), "SEMOE_MPIEXEC, SEMOE_FASHION_MNIST or SEMOE_FORTUNE_LM is not set; run "
                                         "this through ctest in a build with MPI");
  const std::vector<std::string> fm_args = {"--steps", "50", "--limit", "8192", "--batch", "64", "--hidden", "128",
                                            "--ffn", "256", "--threads", "1", "--print-loss"};
  const auto fm_one = curve(fm, fm_args, 1);
  for (int P : {1, 2, 4})
    check_same(fm_one, mpi_curve(mpiexec, fm, fm_args, P), "fashion_mnist, " + std::to_string(P) + " MPI ranks");
  const std::vector<std::string> lm_args = {"--steps", "50", "--batch", "64", "--eval-every", "0", "--eval-bytes",
                                            "1024", "--threads", "1", "--print-loss"};
  const auto lm_one = curve(lm, lm_args, 1);
  for (int P : {1, 2, 4})
    check_same(lm_one, mpi_curve(mpiexec, lm, lm_args, P), "fortune_lm, " + std::to_string(P) + " MPI ranks");
}
}

namespace {

/// Children of this process running `name` with SEMOE_RANK=rank in their environment.
int find_rank(const std::string& name, int rank) {
  for (const auto& d : std::filesystem::directory_iterator("/proc")) {
    const std::string pid = d.path().filename();
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(d.path() / "stat");
    std::string s((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const auto close = s.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(s.substr(close + 2));
    char state;
    int ppid;
    rest >> state >> ppid;
    if (ppid != ::getpid()) continue;
    std::ifstream env(d.path() / "environ");
    std::string e((std::istreambuf_iterator<char>(env)), std::istreambuf_iterator<char>());
    std::ifstream cmd(d.path() / "cmdline");
    std::string c((std::istreambuf_iterator<char>(cmd)), std::istreambuf_iterator<char>());
    if (c.find(name) != std::string::npos && e.find("SEMOE_RANK=" + std::to_string(rank) + '\0') != std::string::npos)
      return std::stoi(pid);
  }
  return -1;
}

}  // namespace

TEST_CASE("launcher: a training rank killed mid-run fails the job as a whole, naming the rank") {
  const char* fm = program("SEMOE_FASHION_MNIST");
  if (!fm) return;
  std::FILE* out = std::tmpfile();
  semoe::launch::options o;
  o.ranks_per_node = 3;
  o.out = out;
  std::atomic<int> killed{-1};
  std::thread killer([&] {
    // Wait until rank 1 is training (its process exists and has run a while), then SIGKILL it.
    for (int i = 0; i < 200 && killed < 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (const int pid = find_rank("fashion_mnist", 1); pid > 0 && i >= 40) {
        ::kill(pid, SIGKILL);
        killed = pid;
      }
    }
  });
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = semoe::launch::run({fm, "--epochs", "1", "--limit", "30000", "--batch", "48", "--experts", "6", "--threads", "1"}, o);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  killer.join();
  const std::string text = slurp(out);
  std::fclose(out);
  INFO(text);
  REQUIRE(killed > 0);
  CHECK(r.failed_rank == 1);
  CHECK(r.exit_code == 128 + SIGKILL);
  CHECK(seconds < 60);  // the other ranks were stopped, not left to hang
  MESSAGE("rank 1 (pid " << killed.load() << ") killed; the job ended in " << seconds << " s with exit code "
                         << r.exit_code);
}
