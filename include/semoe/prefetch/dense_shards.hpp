// semoe/prefetch/dense_shards.hpp: the horizontal half of SE-MoE's 2D
// prefetch (§3.2). The replicated dense parameters of each layer of a model
// are packed into one flat buffer sharded over the data-parallel ranks: each
// rank keeps 1/P of them (and the optimizer keeps state for that 1/P only,
// ZeRO-3 style). Just before layer i's forward its buffer is made whole and
// layer i+1's all-gather starts, so it runs while layer i computes; after
// layer i's backward its gradients are reduce-scattered while the layers
// before it run backward. The vertical half (experts moved SSD -> DRAM ->
// device ahead of need) is prefetch/vertical.hpp; prefetch::two_d asks the
// trainer for both.
//
// Units of sharding: every layer of a container (layer::sequential,
// layer::repeated) that has replicated parameters, except a nested container,
// whose layers are units in turn, so a repeated stack shards layer by layer.
// Units are numbered in forward order: unit k+1 runs right after unit k.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "semoe/comm/bucket.hpp"
#include "semoe/core/trace.hpp"
#include "semoe/core/parameter.hpp"

namespace semoe::prefetch {

/// A container whose layers can be sharded: it reports each layer's forward
/// and backward and lists its layers.
template <class L>
concept shardable_container = requires(L& l) {
  l.set_forward_hook(std::function<void(std::size_t)>{});
  l.set_backward_hook(std::function<void(std::size_t)>{});
  l.for_each_layer([](auto&) {});
};

template <class T, class Comm>
class dense_shards {
 public:
  explicit dense_shards(Comm& world) : world_(&world) {}
  // The model's hooks point at this object: it stays where it is.
  dense_shards(const dense_shards&) = delete;
  dense_shards& operator=(const dense_shards&) = delete;

  /// Shard container c's layers and hook their forwards and backwards. The
  /// parameters keep their values: every rank's shard starts as its slice.
  template <shardable_container Container>
  void install(Container& c) {
    std::vector<int> unit;  // c's layer -> shard index, -1: none (no parameters, or a nested container)
    c.for_each_layer([&](auto& l) {
      using L = std::remove_cvref_t<decltype(l)>;
      if constexpr (shardable_container<L>) {
        unit.push_back(-1);
        install(l);
      } else {
        param_list<T> mine;
        for (auto& p : l.parameters())
          if (p.scope == param_scope::replicated) mine.push_back(p);
        if (mine.empty()) {
          unit.push_back(-1);
        } else {
          unit.push_back(static_cast<int>(shards_.size()));
          shards_.emplace_back();
          shards_.back().fs = std::make_unique<comm::flat_shards<T, Comm>>(std::move(mine), *world_);
        }
      }
    });
    c.set_forward_hook([this, unit](std::size_t i) {
      if (unit[i] < 0) return;
      const auto k = static_cast<std::size_t>(unit[i]);
      make_whole(k);
      if (k + 1 < shards_.size()) start_gather(k + 1);  // overlaps unit k's forward
    });
    c.set_backward_hook([this, unit](std::size_t i) {
      if (unit[i] < 0) return;
      auto& sh = shards_[static_cast<std::size_t>(unit[i])];
      sh.scatter = sh.fs->reduce_scatter_async();  // overlaps the backward of the units before
      sh.scatter_started = true;
    });
  }

  /// Units of sharding.
  std::size_t size() const { return shards_.size(); }
  /// Bytes of dense parameters this rank owns.
  std::size_t shard_bytes() const {
    std::size_t n = 0;
    for (const auto& sh : shards_) n += static_cast<std::size_t>(sh.fs->shard_elements()) * sizeof(T);
    return n;
  }

  /// After backward: every unit's gradient shard is summed over the ranks
  /// (those whose backward the hook did not report start now).
  void finish_reduce_scatters() {
    for (auto& sh : shards_) {
      if (!sh.scatter_started) sh.scatter = sh.fs->reduce_scatter_async();
      sh.scatter.wait();
      sh.scatter_started = false;
    }
  }

  /// The optimizer changed the shards: each unit is gathered again as the
  /// next forward reaches it, and the first unit's gather starts now, while
  /// the caller prepares a batch.
  void shards_updated() {
    for (auto& sh : shards_) sh.stale = true;
    if (!shards_.empty()) start_gather(0);
  }

  /// Make every unit's parameters whole now (before reading them outside a
  /// forward: saving, evaluating another way).
  void gather_all() {
    for (std::size_t k = 0; k < shards_.size(); ++k) make_whole(k);
  }

  /// The parameters were overwritten whole (a restored checkpoint): this
  /// rank's shards take their values from them.
  void reload_from_params() {
    for (auto& sh : shards_) {
      if (sh.gathering) {  // the gather started after the last step writes the flat buffer: let it land first
        sh.gather.wait();
        sh.gathering = false;
      }
      sh.fs->take_from_params();
      sh.stale = false;
    }
  }

  /// What the optimizer updates on this rank: one parameter per unit, its
  /// shard and gradient shard, named "shard.<k>".
  param_list<T> shard_parameters() {
    param_list<T> out;
    for (std::size_t k = 0; k < shards_.size(); ++k)
      out.push_back({"shard." + std::to_string(k), shards_[k].fs->shard(), shards_[k].fs->grad_shard(),
                     param_kind::dense, param_scope::sharded});
    return out;
  }

 private:
  void start_gather(std::size_t k) {
    auto& sh = shards_[k];
    if (!sh.stale || sh.gathering) return;
    sh.gather = sh.fs->all_gather_async();
    sh.gathering = true;
  }

  /// Wait for unit k's gather (started a unit ahead) and copy it into the
  /// parameters. Traced as "gather wait <k>" on the rank's compute lane: a
  /// gather that overlapped the unit before ended before this began.
  void make_whole(std::size_t k) {
    auto& sh = shards_[k];
    if (!sh.stale) return;
    auto& rec = trace::recorder::instance();
    const double t0 = rec.now_us();
    if (!sh.gathering) sh.gather = sh.fs->all_gather_async();
    sh.gather.wait();
    sh.gathering = false;
    sh.fs->copy_to_params();
    sh.stale = false;
    if (rec.enabled())
      rec.add({"gather wait " + std::to_string(k), "comm", t0, rec.now_us() - t0, world_->rank(),
               trace::this_thread_lane()});
  }

  struct shard {
    std::unique_ptr<comm::flat_shards<T, Comm>> fs;
    comm::request gather, scatter;
    bool stale = false, gathering = false, scatter_started = false;
  };

  Comm* world_;
  std::vector<shard> shards_;
};

}  // namespace semoe::prefetch
