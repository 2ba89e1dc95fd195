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

namespace detail {

// One sub-concept per requirement of Placement; placement_contract below gives
// each its fix-it sentence.

template <class P>
concept placement_opted_in = requires { requires std::same_as<typename P::policy_kind, placement_tag>; };

template <class P>
concept placement_has_options = requires { typename P::options; } && std::default_initializable<typename P::options>;

template <class P>
concept placement_constructible_from_options =
    !placement_has_options<P> || std::constructible_from<P, const typename P::options&>;

template <class P>
concept placement_has_replica_slots = requires {
  { P::replica_slots } -> std::convertible_to<index_t>;
};

/// The Placement contract, one requirement per entry: its sub-concept and its
/// fix-it. Diagnose = false answers the concept; Diagnose = true stops
/// compilation with the sentence of every broken requirement.
template <class P, bool Diagnose>
constexpr bool placement_contract() {
  bool ok = true;
  if constexpr (!placement_opted_in<P>) {
    static_assert(!Diagnose, "semoe::moe_layer: Placement must opt in with `using policy_kind = "
                  "semoe::placement::placement_tag;` (placement::static_placement, placement::replicate_hot); "
                  "see placement/static_placement.hpp");
    ok = false;
  }
  if constexpr (!placement_has_options<P>) {
    static_assert(!Diagnose, "semoe::moe_layer: Placement must define a nested, default-constructible `options` "
                  "struct; see placement/static_placement.hpp");
    ok = false;
  }
  if constexpr (!placement_constructible_from_options<P>) {
    static_assert(!Diagnose, "semoe::moe_layer: Placement must be constructible from its options; see "
                  "placement/static_placement.hpp");
    ok = false;
  }
  if constexpr (!placement_has_replica_slots<P>) {
    static_assert(!Diagnose, "semoe::moe_layer: Placement must provide `static constexpr index_t "
                  "replica_slots`; see placement/static_placement.hpp");
    ok = false;
  }
  return ok || Diagnose;
}

}  // namespace detail

/// What a layer asks of a placement policy: the tag, its options (the layer
/// constructs it from them), and how many replica blocks it keeps per rank
/// (0: the layer's code for copies compiles away; more: the layer also calls
/// the members placement::replicate_hot has).
template <class P>
concept Placement = detail::placement_contract<P, false>();

/// Fix-it diagnostics: one sentence per broken requirement of Placement.
template <class P>
constexpr bool check_placement() {
  return detail::placement_contract<P, true>();
}

}  // namespace semoe::placement
