// semoe/prefetch/vertical.hpp: SE-MoE's vertical prefetch (§3.2). While layer
// i runs, the experts of layers i+1 .. i+Depth (i-1 .. i-Depth in backward)
// move toward compute: the next layer to the device, the ones after it from
// SSD to host DRAM. Which experts is predicted from the gate counts recorded
// in earlier steps (expert_prediction.hpp); an expert the prediction missed
// loads on demand. With prefetch::two_d this is the vertical half of 2D
// prefetch; the horizontal half is prefetch/dense_shards.hpp.
#pragma once

#include <span>

#include "semoe/prefetch/concepts.hpp"
#include "semoe/prefetch/expert_prediction.hpp"
#include "semoe/storage/concepts.hpp"

namespace semoe::prefetch {

template <int Depth = 1>
struct vertical {
  static_assert(Depth >= 1, "semoe::prefetch::vertical<Depth>: Depth must be at least 1");
  using policy_kind = prefetch_tag;
  static constexpr int depth = Depth;
  /// Blocks the optimizer pass asks ahead for in host DRAM.
  static constexpr index_t read_ahead = 2;

  /// counts: routed rows per local expert of `layer` this step.
  template <class Store>
  void before(Store& s, index_t layer, phase ph, std::span<const std::int32_t> counts) {
    if constexpr (can_prefetch<Store>) {
      if (ph == phase::forward) s.record_counts(layer, counts);
      for (int d = 1; d <= Depth; ++d) {
        const index_t j = ph == phase::forward ? layer + d : layer - d;
        if (j < 0 || j >= s.layers()) break;
        ahead(s, j, d);
      }
    }
  }
  template <class Store>
  void after(Store&, index_t, phase) {}

  /// After the optimizer: the first layers of the next forward.
  template <class Store>
  void end_step(Store& s) {
    if constexpr (can_prefetch<Store>)
      for (int d = 1; d <= Depth && d <= s.layers(); ++d) ahead(s, d - 1, d);
  }

 private:
  template <class Store>
  static constexpr bool can_prefetch = requires(Store& s, index_t i, std::span<const std::int32_t> c) {
    s.prefetch(i, i, storage::tier_level::device);
    s.record_counts(i, c);
    s.recorded_counts(i);
  };

  template <class Store>
  static void ahead(Store& s, index_t layer, int distance) {
    const auto to = distance == 1 ? storage::tier_level::device : storage::tier_level::host;
    const auto recorded = s.recorded_counts(layer);
    for (index_t e : predict_experts(recorded, s.experts(layer))) s.prefetch(layer, e, to);
  }
};

static_assert(Prefetcher<vertical<1>> && Prefetcher<vertical<2>>);

}  // namespace semoe::prefetch
