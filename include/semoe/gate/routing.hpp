// semoe/gate/routing.hpp: the routing plan, the gate's whole output for one
// step, and the capacity limit that turns a gate's choices
// into slots (SE-MoE §3.1: number_count, assign_pos, limit_by_capacity).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <span>
#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/tensor.hpp"

namespace semoe::gate {

/// What a gate may know about the step beyond its logits. The collectives are
/// type-erased so that a gate never depends on the communicator type; with
/// one rank they are the identity. Every rank must call them in the same order.
struct route_context {
  int rank = 0;
  int ranks = 1;
  index_t global_tokens = 0;  ///< tokens over all ranks of the expert-parallel group
  index_t token_offset = 0;   ///< global index of this rank's first token
  std::uint64_t seed = 0;     ///< RNG seed shared by all ranks
  std::uint64_t step = 0;     ///< advances every training step: fresh noise
  bool training = true;
  /// Optional token identities (the hash gate routes by them); empty: the
  /// global token index is the identity.
  std::span<const std::int64_t> token_keys = {};
  std::function<void(std::span<double>)> all_reduce_sum = [](std::span<double>) {};
  std::function<void(std::span<std::uint64_t>)> all_reduce_sum_u64 = [](std::span<std::uint64_t>) {};
  /// mine (n values) -> all (ranks * n values, rank-major).
  std::function<void(std::span<const std::uint64_t>, std::span<std::uint64_t>)> all_gather =
      [](std::span<const std::uint64_t> mine, std::span<std::uint64_t> all) {
        std::copy(mine.begin(), mine.end(), all.begin());
      };
};

/// How tokens beyond an expert's capacity are chosen for dropping.
enum class drop_policy {
  position,     ///< GShard: first choices before second, earlier tokens first
  probability,  ///< keep the highest routing probabilities (BASE/expert-choice style)
};

/// The gate's output for one step. Assignment a = t * k + c is choice c of
/// token t. `expert[a] < 0` means the gate chose not to route it; `slot[a] < 0`
/// means it was routed but dropped by capacity. Kept assignments of expert e
/// occupy rows offsets[e] .. offsets[e] + counts[e] of the dispatch buffer in
/// token order, so expert-major order is also destination-rank-major order.
template <class T>
struct routing_plan {
  index_t tokens = 0;   ///< local tokens
  index_t experts = 0;  ///< global experts
  index_t k = 0;        ///< choices per token
  index_t capacity = 0; ///< per expert over the whole group; 0: dropless

  buffer<std::int32_t> expert;  ///< [tokens * k]
  buffer<T> weight;             ///< [tokens * k] combine weight
  buffer<float> score;          ///< [tokens * k] priority for drop_policy::probability (higher kept)
  buffer<std::int32_t> slot;    ///< [tokens * k] row within the expert's local block, or -1

  buffer<std::int32_t> counts;  ///< [experts] kept assignments of this rank per expert
  buffer<index_t> offsets;      ///< [experts + 1] exclusive prefix of counts

  buffer<T> probs;              ///< [tokens, experts] saved by gates for backward
  buffer<T> aux_saved;          ///< gate-defined saved values (e.g. per-expert load)

  index_t dropped = 0;          ///< routed assignments dropped by capacity (this rank)
  T balance_loss = 0;           ///< load-balancing loss, coefficient applied
  T z_loss = 0;                 ///< router z-loss, coefficient applied
  T aux_loss() const { return balance_loss + z_loss; }

  index_t assignments() const { return tokens * k; }
  index_t kept() const { return offsets.empty() ? 0 : offsets[experts]; }

  /// Size every per-assignment array for `tokens` x `k` over `experts`.
  void reset(index_t tokens_, index_t experts_, index_t k_) {
    tokens = tokens_;
    experts = experts_;
    k = k_;
    capacity = 0;
    dropped = 0;
    balance_loss = z_loss = 0;
    const index_t a = tokens * k;
    expert.resize_discard(a);
    weight.resize_discard(a);
    score.resize_discard(a);
    slot.resize_discard(a);
    counts.resize_discard(experts);
    offsets.resize_discard(experts + 1);
  }
};

/// Capacity of one expert over the whole group: ceil(factor * tokens * k / experts),
/// at least 1. factor <= 0 is an error; callers pass dropless separately.
inline index_t expert_capacity(double factor, index_t global_tokens, index_t k, index_t experts) {
  SEMOE_CHECK(factor > 0 && std::isfinite(factor), "semoe::gate: capacity_factor = ", factor,
              ": expected a finite value > 0 (or dropless = true)");
  const double c = std::ceil(factor * static_cast<double>(global_tokens) * static_cast<double>(k) /
                             static_cast<double>(experts));
  return std::max<index_t>(1, static_cast<index_t>(c));
}

namespace detail {

/// An order-preserving map of a float to unsigned: a < b iff key(a) < key(b).
inline std::uint32_t float_order_key(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace detail

/// Decide which routed assignments each expert keeps, then number the kept
/// ones. Every key is unique across the group, so the same assignments are
/// kept whether the batch is on one rank or spread over many: the selection
/// is a radix select over 8-bit digits whose histograms are summed over ranks
/// (8 small all-reduces), independent of how tokens are split.
template <class T>
void limit_by_capacity(routing_plan<T>& plan, const route_context& ctx, drop_policy policy) {
  const index_t A = plan.assignments(), E = plan.experts, k = plan.k;
  const auto G = static_cast<std::uint64_t>(ctx.global_tokens);
  SEMOE_CHECK(static_cast<std::uint64_t>(k) * G < (std::uint64_t{1} << 32),
              "semoe::gate::limit_by_capacity: tokens * k = ", k * ctx.global_tokens,
              " exceeds 2^32 assignments per step");
  // Smaller key = kept first. Low 32 bits: the GShard position (choice-major,
  // then global token), which also breaks ties of equal scores.
  std::vector<std::uint64_t> key(static_cast<std::size_t>(A), ~std::uint64_t{0});
  for (index_t a = 0; a < A; ++a) {
    if (plan.expert[a] < 0) continue;
    const index_t t = a / k, c = a % k;
    const std::uint64_t pos = static_cast<std::uint64_t>(c) * G + static_cast<std::uint64_t>(ctx.token_offset + t);
    const std::uint64_t hi =
        policy == drop_policy::position ? 0 : std::uint64_t{~detail::float_order_key(plan.score[a])};
    key[static_cast<std::size_t>(a)] = (hi << 32) | pos;
  }

  // Per expert: the largest kept key (threshold); ~0 keeps everything.
  std::vector<std::uint64_t> threshold(static_cast<std::size_t>(E), ~std::uint64_t{0});
  if (plan.capacity > 0) {
    std::vector<std::uint64_t> routed(static_cast<std::size_t>(E), 0);
    for (index_t a = 0; a < A; ++a)
      if (plan.expert[a] >= 0) ++routed[static_cast<std::size_t>(plan.expert[a])];
    ctx.all_reduce_sum_u64(routed);
    const auto cap = static_cast<std::uint64_t>(plan.capacity);
    // need[e]: how many keys with the chosen prefix must still be kept.
    std::vector<std::uint64_t> prefix(static_cast<std::size_t>(E), 0), need(static_cast<std::size_t>(E), 0);
    std::vector<bool> limited(static_cast<std::size_t>(E));
    bool any = false;
    for (index_t e = 0; e < E; ++e) {
      limited[e] = routed[e] > cap;
      need[e] = cap;
      any = any || limited[e];
    }
    if (any) {
      std::vector<std::uint64_t> hist(static_cast<std::size_t>(E) * 256);
      for (int shift = 56; shift >= 0; shift -= 8) {
        std::fill(hist.begin(), hist.end(), 0);
        const std::uint64_t high_mask = shift == 56 ? 0 : ~std::uint64_t{0} << (shift + 8);
        for (index_t a = 0; a < A; ++a) {
          const auto e = plan.expert[a];
          if (e < 0 || !limited[e]) continue;
          const std::uint64_t kk = key[a];
          if ((kk & high_mask) != prefix[e]) continue;
          ++hist[static_cast<std::size_t>(e) * 256 + ((kk >> shift) & 0xff)];
        }
        ctx.all_reduce_sum_u64(hist);
        for (index_t e = 0; e < E; ++e) {
          if (!limited[e]) continue;
          std::uint64_t acc = 0;
          int d = 0;
          for (; d < 256; ++d) {
            const std::uint64_t h = hist[static_cast<std::size_t>(e) * 256 + d];
            if (acc + h >= need[e]) break;
            acc += h;
          }
          prefix[e] |= static_cast<std::uint64_t>(d) << shift;
          need[e] -= acc;
        }
      }
      for (index_t e = 0; e < E; ++e)
        if (limited[e]) threshold[e] = prefix[e];
    }
  }

  plan.dropped = 0;
  std::fill(plan.counts.begin(), plan.counts.end(), 0);
  for (index_t a = 0; a < A; ++a) {
    const auto e = plan.expert[a];
    if (e < 0) {
      plan.slot[a] = -1;
    } else if (key[a] <= threshold[e]) {
      plan.slot[a] = plan.counts[e]++;
    } else {
      plan.slot[a] = -1;
      ++plan.dropped;
    }
  }
  plan.offsets[0] = 0;
  for (index_t e = 0; e < E; ++e) plan.offsets[e + 1] = plan.offsets[e] + plan.counts[e];
}

}  // namespace semoe::gate
