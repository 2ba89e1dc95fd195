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
}  // namespace detail

/// What a store of scalar T provides. `Storage::store<T>` is the store type a
/// storage policy makes for a layer of scalar T.
///  * acquire/release: the block in fast memory for compute (params, grads;
///    `state` may be empty where the optimizer state does not live there);
///  * visit(layer, expert, f): f(block_ref) on the whole block where its
///    optimizer state lives (host DRAM for offloaded blocks);
///  * zero_grads(layer): every gradient of the layer's blocks reads as zero.
template <class S, class T>
concept Store = requires(S& s, index_t i) {
  { s.add_layer(i, i) } -> std::convertible_to<index_t>;
  { s.layers() } -> std::convertible_to<index_t>;
  { s.experts(i) } -> std::convertible_to<index_t>;
  { s.block_elems(i) } -> std::convertible_to<index_t>;
  { s.acquire(i, i) } -> std::same_as<block_ref<T>>;
  { s.release(i, i) };
  { s.reserve_state(i) };
  { s.zero_grads(i) };
  { s.visit(i, i, detail::probe_visitor<T>{}) };
};

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

template <class P>
concept Storage = std::same_as<typename P::policy_kind, storage_tag> &&
                  Store<typename P::template store<float>, float> && Store<typename P::template store<double>, double>;

}  // namespace semoe::storage
