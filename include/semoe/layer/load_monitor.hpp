// semoe/layer/load_monitor.hpp: what a MoE layer's experts cost, step by
// step, for the elastic mechanisms that balance them (SE-MoE §3.4: a rank
// whose experts draw more tokens than the others' sets the pace of all).
//
// Each MoE layer keeps one monitor per rank, fed from the routing plan it
// already exchanges (no extra collective): the rows this rank's tokens send
// to every expert of the group, the rows each of its local experts receives
// from all ranks, and the seconds its experts' forward and backward take on
// the host clock (with any wait for their blocks under an offloading store;
// on a device backend: launches, unless tracing makes each phase wait for
// its kernels). Seconds are per rank: a resident store runs a layer's
// experts in one grouped call. Figures are means over the last `window`
// steps. gather_load() makes the group's picture on every rank with one
// small all-gather, when the caller asks for it.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <deque>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/config.hpp"
#include "semoe/core/trace.hpp"

namespace semoe::layer {

class load_monitor {
 public:
  explicit load_monitor(std::size_t window = 16) : window_(window) {
    SEMOE_CHECK(window >= 1, "semoe::layer::load_monitor: window = 0: expected at least one step");
  }

  /// Rows this rank's tokens sent to each global expert this step.
  template <class I>
  void record_sent(std::span<I> counts) {
    cur_.sent.assign(counts.begin(), counts.end());
  }
  /// Rows each local expert received from all ranks this step (expert i's
  /// rows are offsets[i + 1] - offsets[i]), then each replica slot's
  /// (placement::replicate_hot).
  void record_received(std::span<const index_t> offsets) {
    cur_.received.resize(offsets.empty() ? 0 : offsets.size() - 1);
    for (std::size_t i = 0; i + 1 < offsets.size(); ++i)
      cur_.received[i] = static_cast<double>(offsets[i + 1] - offsets[i]);
  }
  /// Seconds of expert compute (forward or backward) this step.
  void add_seconds(double s) { cur_.seconds += s; }
  /// Adds the seconds from here to the end of the scope.
  class timer {
   public:
    explicit timer(load_monitor& m) : m_(&m) {}
    timer(const timer&) = delete;
    timer& operator=(const timer&) = delete;
    ~timer() { m_->add_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count()); }

   private:
    load_monitor* m_;
    std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
  };
  timer time() { return timer(*this); }

  /// Close the step: it joins the window, the oldest step leaves it.
  void end_step() {
    if (cur_.sent.empty() && cur_.received.empty()) return;  // no forward this step
    steps_.push_back(std::move(cur_));
    if (steps_.size() > window_) steps_.pop_front();
    cur_ = {};
    ++total_steps_;
  }

  /// When tracing: the last step's rows per local expert as a Chrome trace
  /// counter "expert rows L<layer>" (series "E<global id>", replica slots
  /// "R<slot>") for rank `pid`.
  void trace(index_t layer, int pid, index_t first_expert, index_t local_experts) const {
    auto& rec = trace::recorder::instance();
    if (!rec.enabled() || steps_.empty()) return;
    trace::event e{"expert rows L" + std::to_string(layer), "load", rec.now_us(), 0, pid, 0};
    const auto& r = steps_.back().received;
    for (std::size_t i = 0; i < r.size(); ++i)
      e.counters.emplace_back(static_cast<index_t>(i) < local_experts
                                  ? "E" + std::to_string(first_expert + static_cast<index_t>(i))
                                  : "R" + std::to_string(static_cast<index_t>(i) - local_experts),
                              r[i]);
    rec.add(std::move(e));
  }

  /// Steps in the window, and steps recorded in all.
  std::size_t steps() const { return steps_.size(); }
  std::size_t total_steps() const { return total_steps_; }
  std::size_t window() const { return window_; }

  /// Window means: rows sent per global expert, rows received per local
  /// expert, this rank's expert rows and seconds per step.
  std::vector<double> sent() const { return mean(&sample::sent); }
  std::vector<double> received() const { return mean(&sample::received); }
  double rows() const {
    const auto r = received();
    return std::accumulate(r.begin(), r.end(), 0.0);
  }
  double seconds() const {
    double s = 0;
    for (const auto& x : steps_) s += x.seconds;
    return steps_.empty() ? 0.0 : s / static_cast<double>(steps_.size());
  }

 private:
  struct sample {
    std::vector<double> sent, received;
    double seconds = 0;
  };
  std::vector<double> mean(std::vector<double> sample::*field) const {
    std::vector<double> out;
    for (const auto& x : steps_) {
      const auto& v = x.*field;
      out.resize(std::max(out.size(), v.size()), 0.0);
      for (std::size_t i = 0; i < v.size(); ++i) out[i] += v[i];
    }
    for (auto& v : out) v /= static_cast<double>(steps_.size());
    return out;
  }

  std::size_t window_;
  std::deque<sample> steps_;
  sample cur_;
  std::size_t total_steps_ = 0;
};

/// The expert group's load, the same on every rank of it.
struct load_report {
  std::vector<double> expert_rows;   ///< per global expert, rows per step its home copy processes (window mean)
  std::vector<double> rank_rows;     ///< per rank of the group: rows its experts and replicas process per step
  std::vector<double> rank_seconds;  ///< per rank: seconds its experts compute per step
  /// The busiest rank's share of the group's expert rows: 1 / ranks is
  /// balanced, 1 is one rank doing everything.
  double max_rank_share() const {
    const double total = std::accumulate(rank_rows.begin(), rank_rows.end(), 0.0);
    return total > 0 ? *std::max_element(rank_rows.begin(), rank_rows.end()) / total : 0.0;
  }
};

/// The group's load from every rank's monitor: one all-gather over `group`
/// (the layer's expert communicator), collective. Ranks hold consecutive
/// experts, `local_experts` each, and `replica_slots` copies of others.
template <comm::Communicator Comm>
load_report gather_load(Comm& group, const load_monitor& m, index_t local_experts, index_t replica_slots = 0) {
  const auto L = static_cast<std::size_t>(local_experts), S = L + static_cast<std::size_t>(replica_slots);
  const auto P = static_cast<std::size_t>(group.size());
  auto mine = m.received();
  mine.resize(S, 0.0);
  mine.push_back(m.seconds());
  std::vector<double> all(P * (S + 1));
  comm::all_gather(group, std::span<const double>(mine), std::span<double>(all));
  load_report r;
  r.expert_rows.resize(P * L);
  r.rank_rows.resize(P);
  r.rank_seconds.resize(P);
  for (std::size_t p = 0; p < P; ++p) {
    for (std::size_t i = 0; i < S; ++i) {
      if (i < L) r.expert_rows[p * L + i] = all[p * (S + 1) + i];
      r.rank_rows[p] += all[p * (S + 1) + i];
    }
    r.rank_seconds[p] = all[p * (S + 1) + S];
  }
  return r;
}

}  // namespace semoe::layer
