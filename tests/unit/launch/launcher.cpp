// semoe-run's engine: environment of each rank, prefixed output, failure of
// one rank stopping the rest, signal forwarding, and bad options.
#include <doctest/doctest.h>

#include <signal.h>

#include <chrono>
#include <cstdio>
#include <set>
#include <string>
#include <thread>

#include "semoe/launch/launcher.hpp"
#include "support/files.hpp"

using namespace semoe;

namespace {

struct captured {
  std::FILE* f = std::tmpfile();
  ~captured() { std::fclose(f); }
  std::string text() { return semoe::testing::slurp(f); }
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

TEST_CASE("every rank gets its rank, the world, the master and one shared secret; lines are prefixed") {
  captured out;
  launch::options o;
  o.ranks_per_node = 3;
  o.out = out.f;
  const auto r = launch::run({"sh", "-c",
                              "echo env $SEMOE_RANK $SEMOE_WORLD_SIZE $SEMOE_LOCAL_RANK $SEMOE_LOCAL_SIZE "
                              "$SEMOE_MASTER_ADDR ${#SEMOE_SECRET} $SEMOE_SECRET; printf tail"},
                             o);
  CHECK(r.exit_code == 0);
  CHECK(r.failed_rank == -1);
  const std::string text = out.text();
  std::set<std::string> secrets;
  for (int rank = 0; rank < 3; ++rank) {
    const std::string head = semoe::detail::concat("[", rank, "] env ", rank, " 3 ", rank, " 3 127.0.0.1 64 ");
    const auto at = text.find(head);
    REQUIRE(at != std::string::npos);
    secrets.insert(text.substr(at + head.size(), 64));
    CHECK(text.find(semoe::detail::concat("[", rank, "] tail\n")) != std::string::npos);  // unterminated last line
  }
  CHECK(secrets.size() == 1);  // the same fresh secret for every rank
}

TEST_CASE("a second node's launcher numbers its ranks after the first node's") {
  captured out;
  launch::options o;
  o.ranks_per_node = 2;
  o.nnodes = 2;
  o.node_rank = 1;
  o.master_port = 29999;
  o.out = out.f;
  CHECK(launch::run({"sh", "-c", "echo $SEMOE_RANK/$SEMOE_WORLD_SIZE@$SEMOE_MASTER_PORT"}, o).exit_code == 0);
  const std::string text = out.text();
  CHECK(text.find("[2] 2/4@29999") != std::string::npos);
  CHECK(text.find("[3] 3/4@29999") != std::string::npos);
}

TEST_CASE("one failing rank stops the others and its status is the job's") {
  captured out;
  launch::options o;
  o.ranks_per_node = 3;
  o.out = out.f;
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = launch::run({"sh", "-c", "if [ $SEMOE_RANK = 1 ]; then exit 3; fi; exec sleep 30"}, o);
  CHECK(r.exit_code == 3);
  CHECK(r.failed_rank == 1);
  CHECK(seconds_since(t0) < 10);  // not the 30 s the others would sleep

  const auto missing = launch::run({"/nonexistent/program"}, o);
  CHECK(missing.exit_code == 127);
  CHECK(out.text().find("cannot run '/nonexistent/program'") != std::string::npos);
}

TEST_CASE("after a failure the other ranks get time to print their own error before they are stopped") {
  captured out;
  launch::options o;
  o.ranks_per_node = 2;
  o.out = out.f;
  const auto r = launch::run(
      {"sh", "-c", "if [ $SEMOE_RANK = 0 ]; then exit 3; fi; sleep 0.3; echo 'my own error'; exit 4"}, o);
  CHECK(r.exit_code == 3);
  CHECK(r.failed_rank == 0);
  CHECK(out.text().find("[1] my own error") != std::string::npos);
}

TEST_CASE("a rank stopped by a signal is named when the job fails, and the job still ends") {
  captured out;
  launch::options o;
  o.ranks_per_node = 2;
  o.out = out.f;
  const auto t0 = std::chrono::steady_clock::now();
  // Rank 1 freezes; rank 0 gives up on it after a while, as a collective's timeout would.
  const auto r = launch::run({"sh", "-c", "if [ $SEMOE_RANK = 1 ]; then kill -STOP $$; exec sleep 30; fi; "
                                          "sleep 0.5; exit 3"},
                             o);
  CHECK(r.exit_code == 3);
  CHECK(r.failed_rank == 0);
  CHECK(r.stopped_rank == 1);
  CHECK(seconds_since(t0) < 10);  // the stopped rank was ended too
}

TEST_CASE("SIGTERM to the launcher reaches every rank") {
  captured out;
  launch::options o;
  o.ranks_per_node = 2;
  o.out = out.f;
  std::thread killer([] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ::kill(::getpid(), SIGTERM);
  });
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = launch::run({"sleep", "30"}, o);
  killer.join();
  CHECK(r.exit_code == 128 + SIGTERM);
  CHECK(seconds_since(t0) < 10);
}

TEST_CASE("bad launcher options are errors naming them") {
  launch::options o;
  o.ranks_per_node = 0;
  CHECK_THROWS_WITH_AS(launch::run({"true"}, o), doctest::Contains("-n 0"), semoe::error);
  o.ranks_per_node = 1;
  o.nnodes = 2;
  CHECK_THROWS_WITH_AS(launch::run({"true"}, o), doctest::Contains("--master"), semoe::error);
  o.nnodes = 1;
  CHECK_THROWS_WITH_AS(launch::run({}, o), doctest::Contains("no program"), semoe::error);
}
