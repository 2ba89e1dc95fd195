// Elastic training through the launcher: one of 4 tcp ranks is SIGKILLed
// mid-run under run_elastic (semoe-run --elastic --min-ranks 3); the job
// resumes on 3 ranks from its last complete checkpoint and finishes with the
// parameters of an uninterrupted run that moved from 4 to 3 ranks at the same
// step, having taken every step and consumed every sample exactly once. The
// program is named by SEMOE_ELASTIC_TRAIN (ctest sets it).
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <signal.h>
#include <unistd.h>

#include "semoe/io/safetensors.hpp"
#include "semoe/launch/launcher.hpp"
#include "semoe/train/portable_checkpoint.hpp"
#include "support/files.hpp"

namespace {

using semoe::testing::slurp;
using semoe::testing::temp_dir;

std::string program() {
  const char* p = std::getenv("SEMOE_ELASTIC_TRAIN");
  REQUIRE_MESSAGE(p, "SEMOE_ELASTIC_TRAIN names the elastic_train program (ctest sets it)");
  return p;
}

constexpr long total_steps = 600, batch = 48;

std::vector<std::string> args(const std::filesystem::path& ckpt, long steps, const std::filesystem::path& final_dir) {
  std::vector<std::string> a = {program(), "--steps", std::to_string(steps), "--batch", std::to_string(batch),
                                "--checkpoints", ckpt.string(), "--checkpoint-every", "20", "--print-every", "1"};
  if (!final_dir.empty()) a.insert(a.end(), {"--final", final_dir.string()});
  return a;
}

/// Every tensor of every file of two checkpoints, compared by name.
double max_relative_difference(const std::filesystem::path& a, const std::filesystem::path& b, std::size_t& tensors) {
  double worst = 0;
  tensors = 0;
  for (const auto& e : std::filesystem::directory_iterator(a)) {
    if (e.path().extension() != ".safetensors") continue;
    const auto fa = semoe::io::safetensors_file::open(e.path());
    const auto fb = semoe::io::safetensors_file::open(b / e.path().filename());
    for (const auto& t : fa.tensors()) {
      if (t.type != semoe::io::dtype::f32) continue;
      REQUIRE(fb.contains(t.name));
      std::vector<float> va(t.elements()), vb(t.elements());
      fa.read_as<float>(t.name, va);
      fb.read_as<float>(t.name, vb);
      for (std::size_t i = 0; i < va.size(); ++i)
        worst = std::max(worst, std::abs(double(va[i]) - vb[i]) / std::max(1e-6, std::abs(double(vb[i]))));
      ++tensors;
    }
  }
  return worst;
}

}  // namespace

TEST_SUITE("elastic") {

TEST_CASE("a job that loses one of 4 ranks resumes on 3 from its last checkpoint and ends where an uninterrupted run does") {
  temp_dir dir("elastic-kill");
  const auto ckpt = dir.path / "ckpt", final_dir = dir.path / "final";
  std::FILE* out = std::tmpfile();
  semoe::launch::options o;
  o.ranks_per_node = 4;
  o.min_ranks = 3;
  o.out = out;
  o.settle = std::chrono::milliseconds(300);
  std::atomic<pid_t> victim{-1};
  o.on_spawn = [&](int attempt, int rank, pid_t pid) {
    if (attempt == 0 && rank == 2) victim = pid;
  };
  // Kill rank 2 (its whole process group) once a checkpoint past step 40 is complete.
  std::atomic<bool> done{false}, killed{false};
  std::thread killer([&] {
    while (!done) {
      const auto last = semoe::train::latest_checkpoint(ckpt);
      if (last && last->filename().string() >= "step-000000000040" && victim > 0) {
        ::kill(-victim.load(), SIGKILL);
        killed = true;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  const auto res = semoe::launch::run_elastic(args(ckpt, total_steps, final_dir), o);
  done = true;
  killer.join();
  const std::string text = slurp(out);
  std::fclose(out);
  INFO(text.substr(0, 4000));
  REQUIRE(killed);
  CHECK(res.exit_code == 0);
  CHECK(res.attempts == 2);
  CHECK(res.ranks == 3);
  // The survivors' errors name the rank that died.
  int naming = 0;
  {
    std::istringstream in(text);
    std::string l;
    while (std::getline(in, l))
      if (l.find("elastic_train: rank ") != std::string::npos && l.find("died or left the job") != std::string::npos) {
        CHECK(l.find("rank 2 ") != std::string::npos);
        ++naming;
      }
  }
  CHECK(naming >= 1);

  // Steps: attempt 1 printed 1..X, attempt 2 resumed at K and printed K+1..600, each once, with its samples.
  const auto resume_at = text.find("resuming from step ");
  REQUIRE(resume_at != std::string::npos);
  const long K = std::stol(text.substr(resume_at + 19));
  CHECK(K >= 40);
  CHECK(K % 20 == 0);
  std::map<long, int> seen;
  std::istringstream lines(text.substr(resume_at));
  std::string line;
  while (std::getline(lines, line)) {
    long s, a, b;
    double loss;
    if (std::sscanf(line.c_str(), "[0] step %ld loss %lf samples %ld..%ld", &s, &loss, &a, &b) != 4) continue;
    ++seen[s];
    CHECK(a == (s - 1) * batch);
    CHECK(b == s * batch);
  }
  CHECK(seen.size() == static_cast<std::size_t>(total_steps - K));
  CHECK(seen.begin()->first == K + 1);
  CHECK(seen.rbegin()->first == total_steps);
  for (auto& [s, n] : seen) CHECK(n == 1);

  // The reference: 4 ranks to step K uninterrupted, then 3 ranks from its checkpoint to the end.
  const auto ref = dir.path / "ref", ref_final = dir.path / "ref-final";
  std::FILE* sink = std::tmpfile();
  semoe::launch::options r;
  r.out = sink;
  r.ranks_per_node = 4;
  REQUIRE(semoe::launch::run(args(ref, K, {}), r).exit_code == 0);
  REQUIRE(std::filesystem::exists(semoe::train::checkpoint_dir(ref, static_cast<std::uint64_t>(K)) / "manifest.json"));
  r.ranks_per_node = 3;
  REQUIRE(semoe::launch::run(args(ref, total_steps, ref_final), r).exit_code == 0);
  std::fclose(sink);
  std::size_t tensors = 0;
  const double worst = max_relative_difference(final_dir, ref_final, tensors);
  INFO("largest relative difference over " << tensors << " tensors: " << worst);
  CHECK(tensors > 10);
  CHECK(worst <= 1e-6);
}

TEST_CASE("run_elastic restarts on one rank fewer each time, down to --min-ranks, and tells the program its attempt") {
  std::FILE* out = std::tmpfile();
  semoe::launch::options o;
  o.ranks_per_node = 4;
  o.min_ranks = 2;
  o.out = out;
  o.settle = std::chrono::milliseconds(50);
  // Fails on attempts 0 and 1, succeeds on attempt 2 (3 -> 2 ranks).
  auto res = semoe::launch::run_elastic({"sh", "-c", "test \"$SEMOE_RESTART_COUNT\" = 2"}, o);
  CHECK(res.exit_code == 0);
  CHECK(res.attempts == 3);
  CHECK(res.ranks == 2);
  // Never succeeds: gives up when fewer than min_ranks would remain.
  res = semoe::launch::run_elastic({"sh", "-c", "exit 3"}, o);
  CHECK(res.exit_code == 3);
  CHECK(res.attempts == 3);
  CHECK(res.ranks == 2);
  std::fclose(out);
}

}  // TEST_SUITE("elastic")
