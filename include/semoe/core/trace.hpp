// semoe/core/trace.hpp: Chrome trace JSON events (chrome://tracing, Perfetto).
// A process-wide recorder collects complete ("X") events; `SEMOE_TRACE=path`
// or trace::recorder::start(path) turns it on, and write() saves the file
// atomically.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "semoe/core/error.hpp"

namespace semoe::trace {

struct event {
  std::string name;
  std::string category;
  double begin_us;
  double duration_us;
  int pid;  ///< the rank
  int tid;  ///< a lane: thread, stream, or queue
  /// Non-empty: a counter ("C") at begin_us with these series, drawn as a
  /// stacked chart per pid (duration and tid unused).
  std::vector<std::pair<std::string, double>> counters{};
};

class recorder {
 public:
  static recorder& instance() {
    static recorder r;
    return r;
  }

  bool enabled() const { return enabled_; }
  const std::string& path() const { return path_; }

  /// Start recording; events are written to `path` by write().
  void start(std::string path) {
    std::lock_guard lock(mutex_);
    path_ = std::move(path);
    enabled_ = !path_.empty();
    events_.clear();
  }
  /// Record without a file (a benchmark that sums its phases): write()
  /// without a path then does nothing.
  void start_in_memory() {
    std::lock_guard lock(mutex_);
    path_.clear();
    enabled_ = true;
    events_.clear();
  }
  void stop() { enabled_ = false; }

  double now_us() const {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - epoch_).count();
  }

  void add(event e) {
    if (!enabled_) return;
    std::lock_guard lock(mutex_);
    events_.push_back(std::move(e));
  }

  /// Give lane (pid, tid) a name in viewers ("copy engine", "ssd io").
  void name_lane(int pid, int tid, std::string name) {
    std::lock_guard lock(mutex_);
    lanes_[{pid, tid}] = std::move(name);
  }

  std::vector<event> events() const {
    std::lock_guard lock(mutex_);
    return events_;
  }

  nlohmann::json to_json() const {
    std::lock_guard lock(mutex_);
    nlohmann::json list = nlohmann::json::array();
    for (const auto& e : events_) {
      if (e.counters.empty()) {
        list.push_back({{"name", e.name}, {"cat", e.category}, {"ph", "X"}, {"ts", e.begin_us},
                        {"dur", e.duration_us}, {"pid", e.pid}, {"tid", e.tid}});
      } else {
        nlohmann::json args = nlohmann::json::object();
        for (const auto& [series, v] : e.counters) args[series] = v;
        list.push_back({{"name", e.name}, {"cat", e.category}, {"ph", "C"}, {"ts", e.begin_us}, {"pid", e.pid},
                        {"args", std::move(args)}});
      }
    }
    for (const auto& [key, name] : lanes_)
      list.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", key.first}, {"tid", key.second},
                      {"args", {{"name", name}}}});
    return {{"traceEvents", std::move(list)}, {"displayTimeUnit", "ms"}};
  }

  /// Write the trace to path() (or `path`): a temporary file, then a rename.
  void write(const std::string& path = {}) const {
    const std::string target = path.empty() ? path_ : path;
    if (target.empty()) return;
    const std::string tmp = target + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      SEMOE_CHECK(out.good(), "semoe::trace: cannot open '", tmp, "' for writing");
      out << to_json().dump() << '\n';
      SEMOE_CHECK(out.good(), "semoe::trace: writing '", tmp, "' failed");
    }
    SEMOE_CHECK(std::rename(tmp.c_str(), target.c_str()) == 0, "semoe::trace: cannot rename '", tmp,
                "' to '", target, "'");
  }

 private:
  recorder() {
    if (const char* p = std::getenv("SEMOE_TRACE"); p && *p) {
      path_ = p;
      enabled_ = true;
    }
  }
  mutable std::mutex mutex_;
  std::vector<event> events_;
  std::map<std::pair<int, int>, std::string> lanes_;
  std::string path_;
  std::atomic<bool> enabled_{false};  // read by every scope, unlocked
  std::chrono::steady_clock::time_point epoch_ = std::chrono::steady_clock::now();
};

/// The calling thread's lane: a stable number below 1000 per thread (lanes
/// from 1000 up are named ones: copy engines, I/O, progress threads).
inline int this_thread_lane() {
  return static_cast<int>(std::hash<std::thread::id>{}(std::this_thread::get_id()) % 1000);
}

/// Records one complete event from construction to destruction.
class scope {
 public:
  scope(const char* name, const char* category, int pid = 0, int tid = -1)
      : active_(recorder::instance().enabled()) {
    if (!active_) return;
    name_ = name;
    category_ = category;
    pid_ = pid;
    tid_ = tid >= 0 ? tid : this_thread_lane();
    begin_ = recorder::instance().now_us();
  }
  scope(const scope&) = delete;
  scope& operator=(const scope&) = delete;
  ~scope() {
    if (!active_) return;
    auto& r = recorder::instance();
    r.add({name_, category_, begin_, r.now_us() - begin_, pid_, tid_});
  }

 private:
  bool active_;
  const char* name_ = "";
  const char* category_ = "";
  int pid_ = 0, tid_ = 0;
  double begin_ = 0;
};

}  // namespace semoe::trace
