// semoe/storage/cache.hpp: which block host DRAM gives up when it is full.
// `lfu` is SE-MoE's DRAM cache policy (§3.2): a hit counter per block, every
// counter decayed by beta every K steps so that experts which stop being
// chosen lose their place, the least-hit block evicted (the least recently
// used among equal counts), and an admission threshold theta: a block hit
// fewer than theta times does not displace a cached block. The store reads
// such a block through a staging buffer instead (tiered_store.hpp). `lru` is
// the usual baseline for comparison: it admits every block.
#pragma once

#include <concepts>
#include <cstdint>
#include <tuple>
#include <span>
#include <vector>

#include "semoe/core/error.hpp"

namespace semoe::storage {

struct cache_policy_tag {};

namespace detail {

/// Hit counts and last-use times of blocks 0..n-1.
class block_stats {
 public:
  void resize(std::size_t n) {
    hits_.resize(n, 0.0);
    last_.resize(n, 0);
  }
  void touch(std::size_t b) {
    hits_[b] += 1.0;
    last_[b] = ++clock_;
  }
  double hits(std::size_t b) const { return hits_[b]; }
  std::uint64_t last_use(std::size_t b) const { return last_[b]; }

 protected:
  std::vector<double> hits_;
  std::vector<std::uint64_t> last_;
  std::uint64_t clock_ = 0;
};

}  // namespace detail

class lfu : public detail::block_stats {
 public:
  using policy_kind = cache_policy_tag;
  static constexpr const char* name = "lfu";
  struct options {
    double decay = 0.5;             ///< beta: counters are multiplied by it ...
    std::uint64_t decay_every = 8;  ///< ... every K steps
    double threshold = 1.0;         ///< theta: fewer (decayed) hits than this and a block is not admitted
  };
  static void validate(const options& o) {
    SEMOE_CHECK(o.decay >= 0 && o.decay <= 1, "semoe::storage::lfu: options.decay = ", o.decay,
                ": expected in [0, 1]");
    SEMOE_CHECK(o.decay_every >= 1, "semoe::storage::lfu: options.decay_every = ", o.decay_every,
                ": expected >= 1");
    SEMOE_CHECK(o.threshold >= 0, "semoe::storage::lfu: options.threshold = ", o.threshold, ": expected >= 0");
  }

  lfu() : lfu(options{}) {}
  explicit lfu(options o) : opt_(o) { validate(o); }

  void end_step() {
    if (++steps_ % opt_.decay_every != 0) return;
    for (auto& h : hits_) h *= opt_.decay;
  }

  /// Whether block b may displace a cached block: its decayed hit count has
  /// reached the threshold.
  bool admits(std::size_t b) const { return hits_[b] >= opt_.threshold; }

  /// The block to evict among `candidates` (not empty): the least-hit one;
  /// ties go to the least recently used.
  std::size_t pick(std::span<const std::size_t> candidates) const {
    SEMOE_EXPECTS(!candidates.empty());
    std::size_t best = candidates.front();
    auto key = [&](std::size_t b) { return std::tuple(hits_[b], last_[b]); };
    for (std::size_t b : candidates)
      if (key(b) < key(best)) best = b;
    return best;
  }

 private:
  options opt_;
  std::uint64_t steps_ = 0;
};

class lru : public detail::block_stats {
 public:
  using policy_kind = cache_policy_tag;
  static constexpr const char* name = "lru";
  struct options {};
  lru() = default;
  explicit lru(options) {}
  void end_step() {}
  bool admits(std::size_t) const { return true; }
  std::size_t pick(std::span<const std::size_t> candidates) const {
    SEMOE_EXPECTS(!candidates.empty());
    std::size_t best = candidates.front();
    for (std::size_t b : candidates)
      if (last_[b] < last_[best]) best = b;
    return best;
  }
};

template <class C>
concept CachePolicy = std::same_as<typename C::policy_kind, cache_policy_tag> &&
                      requires(C& c, const C& cc, std::size_t b, std::span<const std::size_t> cand) {
                        c.resize(b);
                        c.touch(b);
                        c.end_step();
                        { cc.admits(b) } -> std::same_as<bool>;
                        { cc.pick(cand) } -> std::same_as<std::size_t>;
                      };

static_assert(CachePolicy<lfu> && CachePolicy<lru>);

}  // namespace semoe::storage
