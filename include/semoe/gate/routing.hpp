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
#include <type_traits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "semoe/core/algorithm.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/executor.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/gate/detail/kernels.hpp"

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
/// The per-assignment arrays live in Space (the memory of the executor that
/// routed them); counts and offsets, which size the exchange and the GEMMs,
/// are always on the host.
template <class T, class Space = host_space>
struct routing_plan {
  using memory_space = Space;
  index_t tokens = 0;   ///< local tokens
  index_t experts = 0;  ///< global experts
  index_t k = 0;        ///< choices per token
  index_t capacity = 0; ///< per expert over the whole group; 0: dropless

  buffer<std::int32_t, Space> expert;  ///< [tokens * k]
  buffer<T, Space> weight;             ///< [tokens * k] combine weight
  buffer<float, Space> score;          ///< [tokens * k] priority for drop_policy::probability (higher kept)
  buffer<std::int32_t, Space> slot;    ///< [tokens * k] row within the expert's local block, or -1

  buffer<std::int32_t> counts;  ///< [experts] kept assignments of this rank per expert
  buffer<index_t> offsets;      ///< [experts + 1] exclusive prefix of counts

  buffer<T, Space> probs;       ///< [tokens, experts] saved by gates for backward
  buffer<T, Space> aux_saved;   ///< gate-defined saved values (e.g. per-expert load)

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

/// A host copy of a plan routed on executor `ex` (to inspect or test it).
template <class Exec, class T, class Space>
routing_plan<T> copy_to_host(Exec& ex, const routing_plan<T, Space>& p) {
  routing_plan<T> h;
  h.tokens = p.tokens;
  h.experts = p.experts;
  h.k = p.k;
  h.capacity = p.capacity;
  h.dropped = p.dropped;
  h.balance_loss = p.balance_loss;
  h.z_loss = p.z_loss;
  h.counts = p.counts;
  h.offsets = p.offsets;
  auto copy = [&ex]<class U>(buffer<U>& dst, const buffer<U, Space>& src) {
    dst.resize_discard(src.size());
    ex.copy(dst.data(), src.data(), src.bytes());
  };
  copy(h.expert, p.expert);
  copy(h.weight, p.weight);
  copy(h.score, p.score);
  copy(h.slot, p.slot);
  copy(h.probs, p.probs);
  copy(h.aux_saved, p.aux_saved);
  return h;
}

/// Capacity of one expert over the whole group: ceil(factor * tokens * k / experts),
/// at least 1. factor <= 0 is an error; callers pass dropless separately.
inline index_t expert_capacity(double factor, index_t global_tokens, index_t k, index_t experts) {
  SEMOE_CHECK(factor > 0 && std::isfinite(factor), "semoe::gate: capacity_factor = ", factor,
              ": expected a finite value > 0 (or dropless = true)");
  const double c = std::ceil(factor * static_cast<double>(global_tokens) * static_cast<double>(k) /
                             static_cast<double>(experts));
  return std::max<index_t>(1, static_cast<index_t>(c));
}

/// Decide which routed assignments each expert keeps, then number the kept
/// ones in token order. Every key is unique across the group, so the same
/// assignments are kept whether the batch is on one rank or spread over
/// many: the selection is a radix select over 8-bit digits whose histograms
/// are summed over ranks (8 small all-reduces, only when some expert is over
/// capacity), independent of how tokens are split. The numbering is a stable
/// sort by kept expert: position i of the sorted order is dispatch row i.
/// Runs on executor `ex` over a plan in its memory; the per-expert tables
/// come to the host for the collectives and the counts.
template <class Exec, class T, class Space>
void limit_by_capacity(Exec& ex, routing_plan<T, Space>& plan, const route_context& ctx, drop_policy policy) {
  static_assert(std::is_same_v<Space, typename Exec::memory_space>,
                "semoe::gate::limit_by_capacity: the plan must live in the executor's memory space");
  const index_t A = plan.assignments(), E = plan.experts, k = plan.k;
  const auto G = static_cast<std::uint64_t>(ctx.global_tokens);
  SEMOE_CHECK(static_cast<std::uint64_t>(k) * G < (std::uint64_t{1} << 32),
              "semoe::gate::limit_by_capacity: tokens * k = ", k * ctx.global_tokens,
              " exceeds 2^32 assignments per step");
  SEMOE_CHECK(A < (index_t{1} << 31), "semoe::gate::limit_by_capacity: tokens * k = ", A,
              " on one rank exceeds 2^31 assignments per step");
  auto to_host = [&ex]<class U>(std::vector<U>& dst, const buffer<U, Space>& src) {
    dst.resize(static_cast<std::size_t>(src.size()));
    ex.copy(dst.data(), src.data(), src.bytes());
  };
  auto to_space = [&ex]<class U>(buffer<U, Space>& dst, const std::vector<U>& src) {
    dst.resize_discard(static_cast<index_t>(src.size()));
    ex.copy(dst.data(), src.data(), dst.bytes());
  };

  buffer<std::uint64_t, Space> key(A);
  ex.parallel_for(A, detail::capacity_key_kernel{plan.expert.data(), plan.score.data(), k, G,
                                                 static_cast<std::uint64_t>(ctx.token_offset),
                                                 policy == drop_policy::probability, key.data()});

  // Routed choices per expert, here ([E, 2E) of the count) and over the group.
  buffer<std::uint64_t, Space> count_dev(2 * E);
  count_dev.zero();
  detail::count_choices(ex, plan.expert.data(), A, k, E, k, count_dev.data());
  std::vector<std::uint64_t> count;
  to_host(count, count_dev);
  std::uint64_t routed_here = 0;
  for (index_t e = 0; e < E; ++e) routed_here += count[static_cast<std::size_t>(E + e)];

  // Per expert: the largest kept key (threshold); ~0 keeps everything.
  std::vector<std::uint64_t> threshold(static_cast<std::size_t>(E), ~std::uint64_t{0});
  if (plan.capacity > 0) {
    std::vector<std::uint64_t> routed(count.begin() + E, count.end());
    ctx.all_reduce_sum_u64(routed);
    const auto cap = static_cast<std::uint64_t>(plan.capacity);
    // need[e]: how many keys with the chosen prefix must still be kept.
    std::vector<std::uint64_t> prefix(static_cast<std::size_t>(E), 0), need(static_cast<std::size_t>(E), cap);
    std::vector<std::uint8_t> limited(static_cast<std::size_t>(E));
    bool any = false;
    for (index_t e = 0; e < E; ++e) {
      limited[e] = routed[e] > cap;
      any = any || limited[e];
    }
    if (any) {
      buffer<std::uint8_t, Space> limited_dev;
      buffer<std::uint64_t, Space> prefix_dev, hist_dev(E * 256);
      to_space(limited_dev, limited);
      std::vector<std::uint64_t> hist;
      for (int shift = 56; shift >= 0; shift -= 8) {
        const std::uint64_t high_mask = shift == 56 ? 0 : ~std::uint64_t{0} << (shift + 8);
        to_space(prefix_dev, prefix);
        hist_dev.zero();
        ex.parallel_for(A, detail::digit_histogram_kernel{plan.expert.data(), key.data(), limited_dev.data(),
                                                          prefix_dev.data(), shift, high_mask, hist_dev.data()});
        to_host(hist, hist_dev);
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

  // Kept rows per expert, their offsets, and each one's row: a histogram, an
  // exclusive sum and a stable sort by expert (token order inside an expert).
  buffer<std::uint64_t, Space> threshold_dev;
  to_space(threshold_dev, threshold);
  buffer<std::uint32_t, Space> kept(A), kept_sorted(A);
  buffer<std::int32_t, Space> order(A), order_sorted(A), offsets_dev(E + 1);
  ex.parallel_for(A, detail::keep_kernel{plan.expert.data(), key.data(), threshold_dev.data(), E, kept.data(),
                                         order.data()});
  algo::histogram(ex, kept.data(), A, offsets_dev.data(), static_cast<int>(E + 1));  // [E]: not kept
  algo::exclusive_sum(ex, offsets_dev.data(), offsets_dev.data(), E + 1);
  algo::sort_pairs(ex, kept.data(), kept_sorted.data(), order.data(), order_sorted.data(), A,
                   std::bit_width(static_cast<std::uint32_t>(E)));
  ex.parallel_for(A, detail::slot_kernel{kept_sorted.data(), order_sorted.data(), offsets_dev.data(), E,
                                         plan.slot.data()});
  std::vector<std::int32_t> offsets;
  to_host(offsets, offsets_dev);
  for (index_t e = 0; e <= E; ++e) plan.offsets[e] = offsets[static_cast<std::size_t>(e)];
  for (index_t e = 0; e < E; ++e) plan.counts[e] = offsets[static_cast<std::size_t>(e + 1)] - offsets[e];
  plan.dropped = static_cast<index_t>(routed_here) - plan.offsets[E];
}

/// limit_by_capacity on the calling thread, for a plan in host memory.
template <class T>
void limit_by_capacity(routing_plan<T>& plan, const route_context& ctx, drop_policy policy) {
  sequential_executor seq;
  limit_by_capacity(seq, plan, ctx, policy);
}

/// The name a gate's errors use: its `name` member where it has one.
template <class G>
constexpr std::string_view gate_name() {
  if constexpr (requires { std::string_view(G::name); })
    return G::name;
  else
    return "the gate (give it `static constexpr const char* name` to see its name here)";
}

/// What the layer relies on in the plan a gate's route() just filled:
/// arrays of tokens x k entries, counts for every expert with offsets their
/// running sum, each kept assignment's expert in [0, experts) and its slot in
/// [0, counts[expert]), each slot of an expert taken once, and no expert over
/// capacity. A gate that fills expert and weight itself must still call
/// gate::limit_by_capacity (or set counts, offsets and slot the same way).
/// The per-assignment checks run where the plan is in host memory.
template <class T, class Space>
void check_plan(const routing_plan<T, Space>& plan, index_t experts, index_t tokens, std::string_view gate) {
  const std::string who = "semoe::moe_layer: the plan " + std::string(gate) + " routed: ";
  const auto fix = " (call gate::limit_by_capacity after filling plan.expert and plan.weight)";
  SEMOE_CHECK(plan.experts == experts && plan.tokens == tokens && plan.k >= 1, who, "plan.experts = ", plan.experts,
              ", plan.tokens = ", plan.tokens, ", plan.k = ", plan.k, "; expected ", experts, " experts, ", tokens,
              " tokens and k >= 1 (call plan.reset(tokens, experts, k) first)");
  const index_t A = plan.assignments();
  SEMOE_CHECK(plan.expert.size() == A && plan.weight.size() == A && plan.slot.size() == A, who, "plan.expert, "
              "plan.weight and plan.slot hold ", plan.expert.size(), ", ", plan.weight.size(), " and ",
              plan.slot.size(), " entries; expected tokens x k = ", A);
  SEMOE_CHECK(plan.counts.size() == experts && plan.offsets.size() == experts + 1, who, "plan.counts has ",
              plan.counts.size(), " entries and plan.offsets ", plan.offsets.size(), "; expected ", experts, " and ",
              experts + 1, fix);
  SEMOE_CHECK(plan.offsets[0] == 0, who, "plan.offsets[0] = ", plan.offsets[0], "; expected 0", fix);
  for (index_t e = 0; e < experts; ++e) {
    SEMOE_CHECK(plan.counts[e] >= 0 && plan.offsets[e + 1] - plan.offsets[e] == plan.counts[e], who, "plan.counts[",
                e, "] = ", plan.counts[e], " but plan.offsets[", e + 1, "] - plan.offsets[", e, "] = ",
                plan.offsets[e + 1] - plan.offsets[e], fix);
    SEMOE_CHECK(plan.capacity == 0 || plan.counts[e] <= plan.capacity, who, "plan.counts[", e, "] = ", plan.counts[e],
                " is over plan.capacity = ", plan.capacity);
  }
  SEMOE_CHECK(plan.offsets[experts] <= A, who, "plan.offsets[", experts, "] = ", plan.offsets[experts],
              " kept assignments, more than tokens x k = ", A);
  if constexpr (Space::host_accessible) {
    std::vector<std::uint8_t> taken(static_cast<std::size_t>(plan.offsets[experts]), 0);
    for (index_t a = 0; a < A; ++a) {
      const index_t e = plan.expert[a], j = plan.slot[a];
      if (j < 0) continue;  // dropped
      SEMOE_CHECK(e >= 0 && e < experts, who, "plan.expert[", a, "] = ", e, " is outside [0, ", experts, ")");
      SEMOE_CHECK(j < plan.counts[e], who, "plan.slot[", a, "] = ", j, " but expert ", e, " keeps ", plan.counts[e],
                  " assignments", fix);
      auto& t = taken[static_cast<std::size_t>(plan.offsets[e] + j)];
      SEMOE_CHECK(!t, who, "plan.slot[", a, "] = ", j, " of expert ", e, " is taken twice", fix);
      t = 1;
    }
  }
}

}  // namespace semoe::gate
