#include "semoe/core/trace.hpp"

#include <doctest/doctest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

namespace fs = std::filesystem;
using semoe::trace::recorder;

namespace {

/// A fresh directory under the system temp dir, removed at scope exit.
struct temp_dir {
  fs::path path = fs::temp_directory_path() / ("semoe_trace_test_" + std::to_string(::getpid()));
  temp_dir() {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  REQUIRE(in.good());
  return nlohmann::json::parse(in);  // throws on malformed JSON
}

}  // namespace

TEST_CASE("trace: start, scopes and write give a Chrome trace of complete events") {
  temp_dir dir;
  const fs::path file = dir.path / "t.json";
  auto& r = recorder::instance();
  r.start(file.string());
  REQUIRE(r.enabled());
  CHECK(r.path() == file.string());
  {
    semoe::trace::scope outer("step \"1\"", "compute", 3, 5);  // quotes must be escaped
    semoe::trace::scope inner("all_to_all", "comm", 3);
  }
  std::thread([] { semoe::trace::scope s("worker", "io", 1, 2); }).join();
  r.add({"manual", "prefetch", 10.0, 2.5, 0, 7});
  CHECK(r.events().size() == 4);
  r.write();
  r.stop();

  CHECK_FALSE(fs::exists(file.string() + ".tmp"));
  const auto j = read_json(file);
  REQUIRE(j.contains("traceEvents"));
  const auto& ev = j["traceEvents"];
  REQUIRE(ev.is_array());
  REQUIRE(ev.size() == 4);
  for (const auto& e : ev) {
    CHECK(e["ph"] == "X");
    for (const char* key : {"name", "cat", "ts", "dur", "pid", "tid"}) CHECK(e.contains(key));
    CHECK(e["ts"].is_number());
    CHECK(e["dur"].get<double>() >= 0);
    CHECK(e["pid"].is_number_integer());
    CHECK(e["tid"].is_number_integer());
  }
  // Scopes close inner-first: the inner event is recorded before the outer.
  CHECK(ev[0]["name"] == "all_to_all");
  CHECK(ev[0]["cat"] == "comm");
  CHECK(ev[0]["pid"] == 3);
  CHECK(ev[0]["tid"].get<int>() >= 0);
  CHECK(ev[1]["name"] == "step \"1\"");
  CHECK(ev[1]["tid"] == 5);
  CHECK(ev[1]["ts"].get<double>() <= ev[0]["ts"].get<double>());
  CHECK(ev[1]["ts"].get<double>() + ev[1]["dur"].get<double>() >=
        ev[0]["ts"].get<double>() + ev[0]["dur"].get<double>());
  CHECK(ev[2]["name"] == "worker");
  CHECK(ev[2]["cat"] == "io");
  CHECK(ev[3] == nlohmann::json{{"name", "manual"}, {"cat", "prefetch"}, {"ph", "X"}, {"ts", 10.0},
                                {"dur", 2.5}, {"pid", 0}, {"tid", 7}});
}

TEST_CASE("trace: nothing is recorded while stopped; start clears; write(path) overrides") {
  temp_dir dir;
  auto& r = recorder::instance();
  r.start((dir.path / "a.json").string());
  { semoe::trace::scope s("kept", "x"); }
  r.stop();
  CHECK_FALSE(r.enabled());
  { semoe::trace::scope s("dropped", "x"); }
  r.add({"dropped too", "x", 0, 0, 0, 0});
  REQUIRE(r.events().size() == 1);

  const fs::path other = dir.path / "b.json";
  r.write(other.string());
  CHECK(fs::exists(other));
  CHECK_FALSE(fs::exists(dir.path / "a.json"));
  CHECK(read_json(other)["traceEvents"].size() == 1);

  // A second write replaces the file whole.
  r.add({"ignored", "x", 0, 0, 0, 0});
  r.write(other.string());
  CHECK(read_json(other)["traceEvents"].size() == 1);

  r.start((dir.path / "c.json").string());
  CHECK(r.events().empty());
  r.start("");
  CHECK_FALSE(r.enabled());
  CHECK_NOTHROW(r.write());  // no path: nothing to do
}

TEST_CASE("trace: an unwritable path raises semoe::error naming it") {
  auto& r = recorder::instance();
  r.start("/nonexistent-semoe-dir/t.json");
  CHECK_THROWS_WITH_AS(r.write(), doctest::Contains("/nonexistent-semoe-dir/t.json.tmp"), semoe::error);
  r.start("");
}

TEST_CASE("trace: scopes on other threads may run while the recorder starts and stops") {
  // A data race here shows under -fsanitize=thread.
  auto& r = recorder::instance();
  std::atomic<bool> done{false};
  std::thread worker([&] {
    while (!done.load()) semoe::trace::scope s("busy", "x", 0, 1);
  });
  for (int i = 0; i < 200; ++i) {
    r.start("unused.json");
    r.stop();
  }
  done = true;
  worker.join();
  r.start("");
  CHECK_FALSE(r.enabled());
}
