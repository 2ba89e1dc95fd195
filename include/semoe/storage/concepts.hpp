// semoe/storage/concepts.hpp: the storage contract. A layer
// never owns expert weights; it asks its store for the block of (layer,
// expert) and holds the view only between acquire() and release(). The
// resident store keeps everything in fast memory; tiered stores move blocks
// between device, host and SSD behind the same calls.
#pragma once

#include <concepts>
#include <functional>
#include <span>
#include <type_traits>
#include <string_view>

#include "semoe/core/config.hpp"
#include "semoe/core/memory_space.hpp"

namespace semoe::storage {

struct storage_tag {};
struct tier_tag {};

/// Where a prefetch should bring a block.
enum class tier_level { device, host };

/// A level of the memory hierarchy (device_tier, host_tier, ssd_tier): it says
/// what it is (tier_kind) and its name; what it holds is the store's business.
template <class T>
concept Tier = std::same_as<typename T::tier_kind, tier_tag> && requires {
  { T::name } -> std::convertible_to<std::string_view>;
};

/// One expert's parameter block: weights, gradients and optimizer state.
/// `state` holds state_slots() arrays of the block's size (AdamW: m and v).
template <class T>
struct block_ref {
  std::span<T> params;
  std::span<T> grads;
  std::span<T> state;
};

namespace detail {
/// The visitor the Store concept probes visit() with (a named functor:
/// nvcc rejects lambdas inside requires-expressions).
template <class T>
struct probe_visitor {
  void operator()(block_ref<T>) const {}
};

// One sub-concept per requirement of Store; store_contract below gives each
// its fix-it sentence.

template <class S>
concept store_has_layers = requires(S& s, index_t i) {
  { s.add_layer(i, i) } -> std::convertible_to<index_t>;
  { s.layers() } -> std::convertible_to<index_t>;
  { s.experts(i) } -> std::convertible_to<index_t>;
  { s.block_elems(i) } -> std::convertible_to<index_t>;
};

template <class S, class T>
concept store_has_acquire_release = requires(S& s, index_t i) {
  { s.acquire(i, i) } -> std::same_as<block_ref<T>>;
  s.release(i, i);
};

template <class S>
concept store_has_reserve_state = requires(S& s, index_t i) { s.reserve_state(i); };

template <class S>
concept store_has_zero_grads = requires(S& s, index_t i) { s.zero_grads(i); };

template <class S, class T>
concept store_has_visit = requires(S& s, index_t i) { s.visit(i, i, probe_visitor<T>{}); };

/// The Store contract, one requirement per entry: its sub-concept and its
/// fix-it. Diagnose = false answers the concept; Diagnose = true stops
/// compilation with the sentence of every broken requirement.
template <class S, class T, bool Diagnose>
constexpr bool store_contract() {
  bool ok = true;
  if constexpr (!store_has_layers<S>) {
    static_assert(!Diagnose, "semoe::storage: a store must provide add_layer(experts, block_elems), layers(), "
                  "experts(layer) and block_elems(layer) returning index_t; see storage/concepts.hpp");
    ok = false;
  }
  if constexpr (!store_has_acquire_release<S, T>) {
    static_assert(!Diagnose, "semoe::storage: a store must provide acquire(layer, expert) returning "
                  "block_ref<T>, and release(layer, expert); see storage/concepts.hpp");
    ok = false;
  }
  if constexpr (!store_has_reserve_state<S>) {
    static_assert(!Diagnose, "semoe::storage: a store must provide reserve_state(slots); see "
                  "storage/concepts.hpp");
    ok = false;
  }
  if constexpr (!store_has_zero_grads<S>) {
    static_assert(!Diagnose, "semoe::storage: a store must provide zero_grads(layer); see storage/concepts.hpp");
    ok = false;
  }
  if constexpr (!store_has_visit<S, T>) {
    static_assert(!Diagnose, "semoe::storage: a store must provide visit(layer, expert, f) calling "
                  "f(block_ref<T>); see storage/concepts.hpp");
    ok = false;
  }
  return ok || Diagnose;
}

template <class P>
concept storage_opted_in = requires { requires std::same_as<typename P::policy_kind, storage_tag>; };

template <class P, class T>
concept storage_makes_store = requires { typename P::template store<T>; };

/// The Storage contract for scalar T: the tag, a store<T>, and that store's
/// own contract (the sentences above).
template <class P, class T, bool Diagnose>
constexpr bool storage_contract() {
  bool ok = true;
  if constexpr (!storage_opted_in<P>) {
    static_assert(!Diagnose, "semoe::moe_layer: Storage must opt in with `using policy_kind = "
                  "semoe::storage::storage_tag;`; see storage/concepts.hpp");
    ok = false;
  }
  if constexpr (!storage_makes_store<P, T>) {
    static_assert(!Diagnose, "semoe::moe_layer: Storage must provide `template <class T> using store` (or "
                  "class), the store it makes for a layer of scalar T; see storage/concepts.hpp");
    ok = false;
  } else {
    ok = store_contract<typename P::template store<T>, T, Diagnose>() && ok;
  }
  return ok || Diagnose;
}

}  // namespace detail

/// What a store of scalar T provides. `Storage::store<T>` is the store type a
/// storage policy makes for a layer of scalar T.
///  * add_layer(experts, block_elems) -> layer id; layers(), experts(layer),
///    block_elems(layer);
///  * acquire/release: the block in fast memory for compute (params, grads;
///    `state` may be empty where the optimizer state does not live there);
///    the layer holds the spans only between the two;
///  * reserve_state(slots): room for the optimizer's state arrays;
///  * visit(layer, expert, f): f(block_ref) on the whole block where its
///    optimizer state lives (host DRAM for offloaded blocks);
///  * zero_grads(layer): every gradient of the layer's blocks reads as zero.
template <class S, class T>
concept Store = detail::store_contract<S, T, false>();

/// Whether a store moves or reuses a block's fast memory after release()
/// (tiered stores evict, the ring reloads its slots): a store says
/// `static constexpr bool moves_blocks = false;` when it never does
/// (storage::resident). Compute on a device may still be reading a released
/// block, so the layer hands such stores a wait with the release:
///   release(layer, expert, compute_done)   compute_done() blocks the calling
///                                          thread until that compute is over
/// and the store calls it before it copies the block out or reuses its
/// memory. A store that moves blocks without this form gets a stream
/// synchronize before each release instead.
template <class S>
inline constexpr bool moves_blocks_v = [] {
  if constexpr (requires { S::moves_blocks; })
    return static_cast<bool>(S::moves_blocks);
  else
    return true;
}();

/// Stores that take the wait with release().
template <class S>
concept event_released = requires(S& s, index_t i, std::function<void()> done) {
  s.release(i, i, std::move(done));
};

/// Where a store's acquire() spans point (host memory for stores that do
/// not say), and where its visit() spans point (the same unless it says).
template <class S>
struct memory_space_of {
  using type = host_space;
};
template <class S>
  requires requires { typename S::memory_space; }
struct memory_space_of<S> {
  using type = typename S::memory_space;
};
template <class S>
struct visit_space_of {
  using type = typename memory_space_of<S>::type;
};
template <class S>
  requires requires { typename S::visit_space; }
struct visit_space_of<S> {
  using type = typename S::visit_space;
};
template <class S>
using visit_space_t = typename visit_space_of<S>::type;

/// The store a storage policy makes for scalar T in memory space Space: the
/// policy's store<T, Space> where it has one, its store<T> in host memory.
template <class Storage, class T, class Space>
struct store_for {
  static_assert(std::is_same_v<Space, host_space>,
                "semoe::moe_layer: this storage policy keeps blocks in host memory only; on a device backend use "
                "storage::resident (device-memory tiers for tiered stores are not built yet)");
  using type = typename Storage::template store<T>;
};
template <class Storage, class T, class Space>
  requires requires { typename Storage::template store<T, Space>; }
struct store_for<Storage, T, Space> {
  using type = typename Storage::template store<T, Space>;
};

/// A storage policy: `using policy_kind = storage_tag;` and a store<T> that is
/// a Store, for float and double. A policy for device backends also provides
/// store<T, Space> (see store_for).
template <class P>
concept Storage = detail::storage_contract<P, float, false>() && detail::storage_contract<P, double, false>();

/// Fix-it diagnostics: one sentence per broken requirement of Storage for the
/// layer's scalar T.
template <class P, class T = float>
constexpr bool check_storage() {
  return detail::storage_contract<P, T, true>();
}

}  // namespace semoe::storage
