// semoe/placement/static_placement.hpp: where an MoE layer's experts live.
// A placement policy is the layer's last template parameter; this one is the
// default: expert e on rank e / local_experts of the expert-parallel group,
// one copy each, never moved. placement/replicate_hot.hpp gives the hottest
// experts extra copies on the least-loaded ranks.
#pragma once

#include <concepts>

#include "semoe/core/config.hpp"

namespace semoe::placement {

struct placement_tag {};

struct static_placement {
  using policy_kind = placement_tag;
  /// Store blocks a rank keeps beyond its own experts: none.
  static constexpr index_t replica_slots = 0;
  struct options {};
  explicit static_placement(options = {}) {}
};

/// What a layer asks of a placement policy: the tag, its options, and how
/// many replica blocks it keeps per rank (0: the layer's code for copies
/// compiles away).
template <class P>
concept Placement = requires {
  requires std::same_as<typename P::policy_kind, placement_tag>;
  typename P::options;
  { P::replica_slots } -> std::convertible_to<index_t>;
};

}  // namespace semoe::placement
