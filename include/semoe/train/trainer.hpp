// semoe/train/trainer.hpp: data + expert parallel training (SE-MoE §3).
// Every rank of the world trains on its own slice of each global batch (data
// parallel). Ranks form expert-parallel groups of size EP that shard the
// experts of each MoE layer; the W / EP groups hold replicas of the same
// experts. Dense gradients are summed over the world, expert gradients over
// the replicas of their expert, and the global-norm clip sees every gradient
// exactly once, so W ranks take the same step as one rank on the whole batch.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <optional>
#include <span>
#include <vector>

#include "semoe/comm/bucket.hpp"
#include "semoe/comm/concepts.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/trace.hpp"
#include "semoe/prefetch/dense_shards.hpp"
#include "semoe/train/optimizer.hpp"

namespace semoe::train {

/// The groups a rank belongs to. `expert` is the communicator MoE layers take.
template <class Comm>
struct parallel_groups {
  Comm expert;   ///< ranks that shard one copy of the experts
  Comm replica;  ///< ranks holding the same experts, one per expert group
};

/// Split `world` into expert-parallel groups of `expert_parallel` consecutive
/// ranks (0: the whole world) and the replica groups across them.
template <class Comm>
parallel_groups<Comm> make_groups(Comm& world, int expert_parallel = 0) {
  const int W = world.size(), ep = expert_parallel > 0 ? expert_parallel : W;
  SEMOE_CHECK(W % ep == 0, "semoe::train::make_groups: expert_parallel = ", ep, " must divide the world size ", W);
  const int r = world.rank();
  Comm expert = world.split(r / ep, r % ep);
  Comm replica = world.split(r % ep, r / ep);
  return {std::move(expert), std::move(replica)};
}

/// Sum every local expert gradient over the replicas of its expert, in one
/// flat collective.
template <class Model, class Comm>
void reduce_expert_grads(Model& m, Comm& replica) {
  if (replica.size() == 1) return;
  index_t n = 0;
  for_each_expert_block(m, [&](auto& blk, auto&) { n += static_cast<index_t>(blk.grads.size()); }, block_access::read);
  using T = typename decltype(m.parameters())::value_type::value_type;
  using space = typename detail::model_space<Model>::type;  // device gradients go through the host
  buffer<T> flat(n);
  index_t off = 0;
  for_each_expert_block(
      m, [&](auto& blk, auto&) {
        copy_bytes<host_space, space>(flat.data() + off, blk.grads.data(), blk.grads.size_bytes());
        off += static_cast<index_t>(blk.grads.size());
      },
      block_access::read);
  comm::all_reduce(replica, flat.span());
  off = 0;
  for_each_expert_block(m, [&](auto& blk, auto&) {
    copy_bytes<space, host_space>(blk.grads.data(), flat.data() + off, blk.grads.size_bytes());
    off += static_cast<index_t>(blk.grads.size());
  });
}

/// Runs optimizer steps of a model over the groups of one rank.
template <class Model, class Optimizer, class Comm>
class trainer {
 public:
  using value_type = typename decltype(std::declval<Model&>().parameters())::value_type::value_type;
  struct options {
    double clip_norm = 1.0;  ///< 0: no clipping
    /// Reduce dense gradients in buckets of this size, each launched as soon as
    /// backward has finished the layers that fill it (SE-MoE's fusion
    /// communication), when the model reports finished layers
    /// (set_backward_hook). 0: one fused all-reduce after backward.
    std::size_t bucket_bytes = std::size_t{4} << 20;
    /// Update each MoE layer's experts as soon as its backward is done,
    /// while its blocks are still near compute (with an offloading store
    /// this saves bringing every block back for the optimizer). Needs
    /// clip_norm = 0 and no expert replicas: both change gradients later.
    bool update_experts_in_backward = false;
  };

  trainer(Model& model, Optimizer& opt, Comm& world, parallel_groups<Comm>& groups)
      : trainer(model, opt, world, groups, options{}) {}
  trainer(Model& model, Optimizer& opt, Comm& world, parallel_groups<Comm>& groups, options o)
      : model_(&model), opt_(&opt), world_(&world), groups_(&groups), opt_o_(o) {
    if (o.update_experts_in_backward) {
      SEMOE_CHECK(o.clip_norm == 0, "semoe::train::trainer: update_experts_in_backward needs clip_norm = 0 (got ",
                  o.clip_norm, "): clipping scales gradients after backward");
      SEMOE_CHECK(groups.replica.size() == 1, "semoe::train::trainer: update_experts_in_backward needs one replica "
                  "per expert (got ", groups.replica.size(), "): replica gradients are summed after backward");
      for_each_moe_layer(model, [&](auto& l) {
        l.set_expert_backward_hook([this, &l](index_t e) { opt_->update_block_now(l, e); });
      });
    }
    for_each_moe_layer(model, [&](auto& l) {
      if constexpr (requires { std::remove_cvref_t<decltype(l)>::prefetch_type::horizontal; }) horizontal_ = true;
    });
    if (horizontal_) shard_dense();
  }
  // The model's backward hook points at this trainer: it stays where it is.
  trainer(const trainer&) = delete;
  trainer& operator=(const trainer&) = delete;

  /// One step. `forward_backward(model)` runs forward, the loss and backward
  /// on this rank's slice and returns this rank's share of the task loss
  /// (its loss sum divided by the GLOBAL batch). Returns the global loss:
  /// task loss plus the aux losses of the MoE layers.
  template <class F>
  double step(F&& forward_backward) {
    trace::scope ts("train_step", "train", world_->rank());
    model_->zero_grad();
    const bool overlap = !horizontal_ && prepare_buckets();
    double loss[2] = {static_cast<double>(forward_backward(*model_)), 0.0};
    for_each_moe_layer(*model_, [&](auto& l) { loss[1] += static_cast<double>(l.aux_loss()); });
    {
      trace::scope tr("reduce_grads", "comm", world_->rank());
      if (horizontal_) {
        dense_->finish_reduce_scatters();
      } else if (overlap) {
        buckets_->mark_all_ready();  // layers the hook did not report (none, normally)
        buckets_->finish();
      } else {
        reduce_dense_grads(*model_, *world_);
      }
      reduce_expert_grads(*model_, groups_->replica);
    }
    // Each expert group computed the same aux loss on every member: count it once per group.
    loss[1] /= static_cast<double>(groups_->expert.size());
    comm::all_reduce(*world_, std::span<double>(loss, 2));
    if (opt_o_.clip_norm > 0) last_norm_ = clip_grad_norm(*model_, groups_->expert, *world_, opt_o_.clip_norm);
    if (horizontal_) {
      sharded_view view{this};
      opt_->step(view);  // each rank updates its shard of the dense parameters
      dense_->shards_updated();
    } else {
      opt_->step(*model_);
    }
    model_->end_step();
    ++steps_;
    return loss[0] + loss[1];
  }

  double last_grad_norm() const { return last_norm_; }
  /// Dense parameters kept sharded over the world with layer-ahead gathers
  /// (a layer's prefetch policy asked for it: prefetch::two_d).
  bool shards_dense() const { return horizontal_; }
  /// Bytes of dense parameters this rank owns (its shards), for reports.
  std::size_t dense_shard_bytes() const { return dense_ ? dense_->shard_bytes() : 0; }
  /// Make every layer's dense parameters whole now (before reading them
  /// outside a forward: saving, evaluating another way).
  void gather_dense() {
    if (dense_) dense_->gather_all();
  }
  /// The dense model parameters were overwritten whole (a restored
  /// checkpoint): this rank's shards take their values from them.
  void reload_dense_shards() {
    if (dense_) dense_->reload_from_params();
  }
  /// The tensors the optimizer keeps dense state for, in its order: the
  /// model's parameters, or with sharded dense parameters this rank's shards
  /// (after the parameters sharded by their layer). Checkpoints use it.
  param_list<value_type> optimizer_parameters() {
    if (horizontal_) return sharded_view{this}.parameters();
    return model_->parameters();
  }
  std::uint64_t steps() const { return steps_; }
  /// Set by load_checkpoint: the step the restored run had reached.
  void set_steps(std::uint64_t s) { steps_ = s; }
  Model& model() { return *model_; }
  Comm& world() { return *world_; }
  parallel_groups<Comm>& groups() { return *groups_; }
  Optimizer& optimizer() { return *opt_; }
  /// Gradient buckets reduced while backward runs (0: not overlapping).
  std::size_t overlapped_buckets() const { return buckets_ ? buckets_->bucket_count() : 0; }

 private:
  /// Buckets and the backward hook that fills them, made on the first step
  /// (parameter spans are stable from then on). False: reduce after backward.
  bool prepare_buckets() {
    // Buckets pack gradients with host copies: device models reduce after backward.
    if constexpr (!detail::model_space<Model>::type::host_accessible) {
      return false;
    } else if constexpr (requires { model_->set_backward_hook(std::function<void(std::size_t)>{}); }) {
      if (opt_o_.bucket_bytes == 0 || world_->size() == 1) return false;
      if (!buckets_) {
        // Parameters of top-level layer i are params[first_[i] .. first_[i + 1]).
        first_.assign(1, 0);
        model_->for_each_layer([&](auto& l) { first_.push_back(first_.back() + l.parameters().size()); });
        buckets_.emplace(model_->parameters(), *world_, comm::bucket_options{.bucket_bytes = opt_o_.bucket_bytes});
        model_->set_backward_hook([this](std::size_t layer) {
          for (std::size_t p = first_[layer]; p < first_[layer + 1]; ++p) buckets_->mark_ready(p);
        });
      }
      return true;
    } else {
      return false;
    }
  }

  /// SE-MoE's horizontal prefetch (prefetch/dense_shards.hpp): the model's
  /// replicated dense parameters sharded over the world, layer by layer,
  /// each gathered while the layer before it computes.
  void shard_dense() {
    SEMOE_CHECK(opt_o_.clip_norm == 0, "semoe::train::trainer: sharded dense parameters (prefetch::two_d) need "
                "clip_norm = 0 (got ", opt_o_.clip_norm, ")");
    if constexpr (!detail::model_space<Model>::type::host_accessible) {
      ::semoe::detail::fail("semoe::train::trainer: sharded dense parameters (prefetch::two_d) run on host backends "
                            "only; on a device backend the flat shards are not built yet");
    } else if constexpr (prefetch::shardable_container<Model>) {
      dense_ = std::make_unique<prefetch::dense_shards<value_type, Comm>>(*world_);
      dense_->install(*model_);
    } else {
      ::semoe::detail::fail("semoe::train::trainer: sharded dense parameters (prefetch::two_d) need a model with "
                            "set_forward_hook and set_backward_hook (layer::sequential, layer::repeated)");
    }
  }

  /// What the optimizer sees in horizontal mode: this rank's dense shards
  /// (and parameters sharded by their layer), and the model's MoE layers.
  struct sharded_view {
    trainer* t;
    param_list<value_type> parameters() {
      param_list<value_type> out;
      for (auto& p : t->model_->parameters())
        if (p.scope == param_scope::sharded) out.push_back(p);
      for (auto& p : t->dense_->shard_parameters()) out.push_back(p);
      return out;
    }
    template <class F>
    void for_each_layer(F&& f) {
      t->model_->for_each_layer(std::forward<F>(f));
    }
  };

  bool horizontal_ = false;
  std::unique_ptr<prefetch::dense_shards<value_type, Comm>> dense_;  ///< with horizontal_

  Model* model_;
  Optimizer* opt_;
  Comm* world_;
  parallel_groups<Comm>* groups_;
  options opt_o_;
  double last_norm_ = 0;
  std::uint64_t steps_ = 0;
  std::optional<comm::gradient_buckets<value_type, Comm>> buckets_;
  std::vector<std::size_t> first_;
};

}  // namespace semoe::train
