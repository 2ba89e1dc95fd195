// semoe/placement/replicate_hot.hpp: extra copies of the hottest experts on
// the least-loaded ranks (SE-MoE's elastic placement; FasterMoE calls it
// shadowing). When the gate sends most tokens to a few experts, the ranks
// that own them set the step time; a copy elsewhere takes part of those rows.
//
// Each rank keeps `Slots` replica blocks in the layer's store besides its own
// experts. Every `interval` steps the group sums the rows each expert was
// sent over the load monitor's window (one all-reduce of E numbers) and,
// greedily, gives the expert with the most rows per copy on the busiest rank
// another copy on the least-busy rank with a free slot, while that lowers the
// busiest rank's rows by at least `min_gain`; under even load it makes none.
// Then it sets what share of a replicated expert's rows each copy takes, by
// water-filling: the copies on less busy ranks take more, so the ranks end
// as even as the copies allow.
//
// A step with copies: each rank splits its rows for expert e into contiguous
// parts by those shares, one per copy (the home copy first, then the
// replicas by rank); after backward the copies' gradients are summed into the home
// block (one all-reduce of the replicated blocks), which alone the optimizer,
// clipping and checkpoints see; after the optimizer step the home block's
// parameters are copied to its replicas (one more all-reduce). Results are
// those of static placement up to the order of float sums. Replica blocks go
// through the store like any other (resident, tiered, SSD).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/gate/routing.hpp"
#include "semoe/layer/load_monitor.hpp"
#include "semoe/placement/static_placement.hpp"
#include "semoe/storage/concepts.hpp"

namespace semoe::placement {

template <index_t Slots = 1>
class replicate_hot {
  static_assert(Slots >= 1, "semoe::placement::replicate_hot<Slots>: at least one replica slot per rank");

 public:
  using policy_kind = placement_tag;
  static constexpr index_t replica_slots = Slots;
  struct options {
    index_t interval = 8;   ///< steps between placement decisions
    /// A copy must lower the busiest rank's rows by this fraction: expert rows
    /// are one part of a step, and each copy costs two all-reduces of its block.
    double min_gain = 0.1;
  };

  explicit replicate_hot(options o = {}) : o_(o) {
    SEMOE_CHECK(o.interval >= 1, "semoe::placement::replicate_hot: options.interval = ", o.interval,
                ": expected >= 1 step");
    SEMOE_CHECK(o.min_gain >= 0 && o.min_gain < 1, "semoe::placement::replicate_hot: options.min_gain = ",
                o.min_gain, ": expected 0 <= min_gain < 1");
  }

  /// The expert in replica slot j of rank p at [p * Slots + j], -1 for a
  /// free slot; the same on every rank of the group.
  std::span<const std::int32_t> replicas() const { return holds_; }
  /// Placement decisions that changed a slot, since the start.
  std::uint64_t changes() const { return changes_; }

  // -- Called by the layer -------------------------------------------------

  /// Moves this rank's dispatch rows from expert-major order (row[a] =
  /// offsets[e] + slot) to slot-major order: rank by rank, its own experts
  /// then its replica slots. counts gets the rows per slot, ranks * (local +
  /// Slots) of them. The caller's buffers keep their size.
  template <class T, class Space>
  void assign(const gate::routing_plan<T, Space>& plan, std::span<index_t> row, int ranks, index_t local,
              std::vector<std::int32_t>& counts) {
    static_assert(Space::host_accessible, "semoe::placement::replicate_hot: the plan must be in host memory");
    const index_t E = plan.experts, per = local + Slots;
    resize(ranks);
    counts.assign(static_cast<std::size_t>(ranks * per), 0);
    // Copies of expert e: home slot, then each replica slot holding it. Part q
    // of its n rows is [q n / copies, (q + 1) n / copies).
    copies_.assign(static_cast<std::size_t>(E), {});
    for (index_t e = 0; e < E; ++e) copies_[e].push_back((e / local) * per + e % local);
    for (int p = 0; p < ranks; ++p)
      for (index_t j = 0; j < Slots; ++j)
        if (const auto h = holds_[static_cast<std::size_t>(p * Slots + j)]; h >= 0)
          copies_[h].push_back(p * per + local + j);
    // bounds_[e][q]: where copy q's part of this rank's rows of e begins.
    bounds_.assign(static_cast<std::size_t>(E), {});
    for (index_t e = 0; e < E; ++e) {
      const index_t n = plan.counts[e], c = static_cast<index_t>(copies_[e].size());
      auto& b = bounds_[e];
      b.push_back(0);
      for (index_t q = 1; q < c; ++q)
        b.push_back(std::clamp(static_cast<index_t>(std::floor(static_cast<double>(n) * cut(e, q))), b.back(), n));
      b.push_back(n);
      for (index_t q = 0; q < c; ++q) counts[copies_[e][q]] += static_cast<std::int32_t>(b[q + 1] - b[q]);
    }
    std::vector<index_t> start(counts.size() + 1, 0);
    for (std::size_t s = 0; s < counts.size(); ++s) start[s + 1] = start[s] + counts[s];
    for (index_t a = 0; a < plan.assignments(); ++a) {
      const index_t j = plan.slot[a];
      if (j < 0) continue;
      const index_t e = plan.expert[a], c = static_cast<index_t>(copies_[e].size());
      const auto& b = bounds_[e];
      index_t q = 0;
      while (q + 1 < c && b[q + 1] <= j) ++q;
      row[a] = start[copies_[e][q]] + (j - b[q]);
    }
  }

  /// After backward: each replicated expert's gradient is the sum over its
  /// copies, written into its home block (collective over the group).
  template <class T, class Store, class Comm>
  void reduce_grads(Store& store, index_t layer, Comm& group, index_t local) {
    const auto hot = replicated();
    if (hot.empty()) return;
    const index_t n = store.block_elems(layer);
    buffer<T> sum(static_cast<index_t>(hot.size()) * n);
    sum.zero();
    for_each_copy(group.rank(), local, hot, [&](std::size_t k, index_t block) {
      store.visit(layer, block, [&](storage::block_ref<T> b) {
        T* s = sum.data() + static_cast<index_t>(k) * n;
        for (index_t i = 0; i < n; ++i) s[i] += b.grads[i];
      });
    });
    comm::all_reduce(group, sum.span());
    for (std::size_t k = 0; k < hot.size(); ++k)
      if (hot[k] / local == group.rank())
        store.visit(layer, hot[k] % local, [&](storage::block_ref<T> b) {
          std::copy_n(sum.data() + static_cast<index_t>(k) * n, n, b.grads.data());
        });
  }

  /// After the optimizer step: maybe place copies anew (every `interval`
  /// steps), then copy each replicated expert's parameters from its home
  /// block to its replicas (collective over the group).
  template <class T, class Store, class Comm>
  void end_step(Store& store, index_t layer, Comm& group, index_t local, const layer::load_monitor& load) {
    const int P = group.size();
    resize(P);
    if (P > 1 && ++steps_ % static_cast<std::uint64_t>(o_.interval) == 0 && load.steps() > 0) decide(group, local, load);
    const auto hot = replicated();
    if (hot.empty()) return;
    const index_t n = store.block_elems(layer);
    buffer<T> params(static_cast<index_t>(hot.size()) * n);
    params.zero();  // home blocks contribute their parameters, every other rank zeros: the sum is a copy
    for (std::size_t k = 0; k < hot.size(); ++k)
      if (hot[k] / local == group.rank())
        store.visit(layer, hot[k] % local, [&](storage::block_ref<T> b) {
          std::copy_n(b.params.data(), n, params.data() + static_cast<index_t>(k) * n);
        });
    comm::all_reduce(group, params.span());
    for (index_t j = 0; j < Slots; ++j) {
      const auto h = holds_[static_cast<std::size_t>(group.rank() * Slots + j)];
      if (h < 0) continue;
      const auto k = static_cast<index_t>(std::lower_bound(hot.begin(), hot.end(), h) - hot.begin());
      store.visit(layer, local + j, [&](storage::block_ref<T> b) {
        std::copy_n(params.data() + k * n, n, b.params.data());
      });
    }
  }

 private:
  /// The fraction of expert e's rows that copies before q take (even split
  /// until a decision set shares).
  double cut(index_t e, index_t q) const {
    const auto c = static_cast<index_t>(copies_[e].size());
    if (static_cast<std::size_t>(e) < cuts_.size() && cuts_[e].size() == static_cast<std::size_t>(c + 1)) return cuts_[e][q];
    return static_cast<double>(q) / static_cast<double>(c);
  }

  void resize(int ranks) {
    if (holds_.size() != static_cast<std::size_t>(ranks * Slots)) holds_.assign(static_cast<std::size_t>(ranks * Slots), -1);
  }

  /// The experts with replicas, ascending.
  std::vector<std::int32_t> replicated() const {
    std::vector<std::int32_t> h;
    for (auto e : holds_)
      if (e >= 0) h.push_back(e);
    std::sort(h.begin(), h.end());
    h.erase(std::unique(h.begin(), h.end()), h.end());
    return h;
  }

  /// f(k, block) for each block of this rank that is a copy of hot[k].
  template <class F>
  void for_each_copy(int rank, index_t local, const std::vector<std::int32_t>& hot, F&& f) const {
    for (std::size_t k = 0; k < hot.size(); ++k)
      if (hot[k] / local == rank) f(k, hot[k] % local);
    for (index_t j = 0; j < Slots; ++j)
      if (const auto h = holds_[static_cast<std::size_t>(rank * Slots + j)]; h >= 0)
        f(static_cast<std::size_t>(std::lower_bound(hot.begin(), hot.end(), h) - hot.begin()), local + j);
  }

  /// Greedy placement from the group's rows per expert over the window.
  template <class Comm>
  void decide(Comm& group, index_t local, const layer::load_monitor& load) {
    const int P = group.size();
    // Whole rows summed over the window: integers, so every rank adds the same numbers.
    auto rows = load.sent();
    for (auto& r : rows) r = std::round(r * static_cast<double>(load.steps()));
    comm::all_reduce(group, std::span<double>(rows));
    const auto E = static_cast<index_t>(rows.size());
    std::vector<std::int32_t> next(holds_.size(), -1);
    std::vector<index_t> copies(static_cast<std::size_t>(E), 1);
    std::vector<std::vector<int>> on(static_cast<std::size_t>(E));  // ranks with a copy of e
    for (index_t e = 0; e < E; ++e) on[e].push_back(static_cast<int>(e / local));
    auto rank_rows = [&] {
      std::vector<double> r(static_cast<std::size_t>(P), 0.0);
      for (index_t e = 0; e < E; ++e)
        for (int p : on[e]) r[p] += rows[e] / static_cast<double>(copies[e]);
      return r;
    };
    std::vector<index_t> free(static_cast<std::size_t>(P), Slots);
    for (;;) {
      const auto r = rank_rows();
      const int busiest = static_cast<int>(std::max_element(r.begin(), r.end()) - r.begin());
      // The expert with the most rows per copy on the busiest rank.
      index_t best = -1;
      for (index_t e = 0; e < E; ++e)
        if (std::find(on[e].begin(), on[e].end(), busiest) != on[e].end() &&
            (best < 0 || rows[e] / copies[e] > rows[best] / copies[best]))
          best = e;
      // The least busy rank with a free slot and no copy of it yet.
      int to = -1;
      for (int p = 0; p < P; ++p)
        if (free[p] > 0 && std::find(on[best].begin(), on[best].end(), p) == on[best].end() && (to < 0 || r[p] < r[to]))
          to = p;
      if (best < 0 || to < 0) break;
      on[best].push_back(to);
      ++copies[best];
      const auto after = rank_rows();
      if (*std::max_element(after.begin(), after.end()) > r[busiest] * (1 - o_.min_gain)) break;  // not worth it
      --free[to];
      next[static_cast<std::size_t>(to * Slots + (Slots - 1 - free[to]))] = static_cast<std::int32_t>(best);
    }
    if (next != holds_) {
      holds_ = std::move(next);
      ++changes_;
    }
    set_shares(P, local, rows);
  }

  /// cuts_[e]: cumulative shares of e's rows over its copies (home, then
  /// replicas in slot order), water-filled so the copies' ranks end as even
  /// as they can; a few passes over the replicated experts, hottest first.
  void set_shares(int P, index_t local, const std::vector<double>& rows) {
    const auto E = static_cast<index_t>(rows.size());
    std::vector<std::vector<int>> on(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) on[e].push_back(static_cast<int>(e / local));
    for (int p = 0; p < P; ++p)
      for (index_t j = 0; j < Slots; ++j)
        if (const auto h = holds_[static_cast<std::size_t>(p * Slots + j)]; h >= 0) on[h].push_back(p);
    std::vector<index_t> hot;
    std::vector<double> load(static_cast<std::size_t>(P), 0.0);
    std::vector<std::vector<double>> take(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) {
      const auto c = on[e].size();
      take[e].assign(c, rows[e] / static_cast<double>(c));
      for (std::size_t q = 0; q < c; ++q) load[on[e][q]] += take[e][q];
      if (c > 1) hot.push_back(e);
    }
    std::sort(hot.begin(), hot.end(), [&](index_t a, index_t b) { return rows[a] > rows[b] || (rows[a] == rows[b] && a < b); });
    for (int pass = 0; pass < 8; ++pass)
      for (index_t e : hot) {
        const auto c = on[e].size();
        for (std::size_t q = 0; q < c; ++q) load[on[e][q]] -= take[e][q];
        // Level L with sum over copies of max(0, L - load) = rows[e].
        std::vector<double> lv;
        for (int p : on[e]) lv.push_back(load[p]);
        std::sort(lv.begin(), lv.end());
        double level = lv[0] + rows[e], filled = 0;
        for (std::size_t k = 0; k < lv.size(); ++k) {
          filled += lv[k];
          const double l = (rows[e] + filled) / static_cast<double>(k + 1);
          if (k + 1 == lv.size() || l <= lv[k + 1]) {
            level = l;
            break;
          }
        }
        for (std::size_t q = 0; q < c; ++q) {
          take[e][q] = std::max(0.0, level - load[on[e][q]]);
          load[on[e][q]] += take[e][q];
        }
      }
    cuts_.assign(static_cast<std::size_t>(E), {});
    for (index_t e : hot) {
      auto& f = cuts_[e];
      f.push_back(0.0);
      for (double t : take[e]) f.push_back(f.back() + (rows[e] > 0 ? t / rows[e] : 1.0 / static_cast<double>(take[e].size())));
      f.back() = 1.0;
    }
  }

  options o_;
  std::vector<std::int32_t> holds_;
  std::vector<std::vector<double>> cuts_;     // per replicated expert: cumulative shares of its copies
  std::vector<std::vector<index_t>> copies_;  // per expert: its slots, rank-major (scratch of assign)
  std::vector<std::vector<index_t>> bounds_;  // per expert: its copies' parts of this step's rows
  std::uint64_t steps_ = 0, changes_ = 0;
};

}  // namespace semoe::placement
