// semoe/comm/bucket.hpp: fusion communication of SE-MoE §3.2 (Shen et al.,
// arXiv 2205.10034). Many small collectives cost a latency
// each; packing tensors into a few large flat buffers pays it a few times.
//  * gradient_buckets: dense gradients in fixed-size buckets, each summed by
//    one all_reduce launched the moment its last gradient is final, so the
//    reduction overlaps the rest of backward.
//  * flat_shards: a layer's dense parameters in one flat buffer sharded over
//    the data-parallel ranks (ZeRO-3 style), so one all_gather materializes
//    the layer and one reduce_scatter hands each rank its shard's gradient.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/parameter.hpp"

namespace semoe::comm {

/// Options of gradient_buckets (outside the class so `= {}` defaults work).
struct bucket_options {
  /// Capacity of one bucket. Large enough to amortize a collective's latency,
  /// small enough that the first bucket is full early in backward (PyTorch
  /// DDP's default of 25 MiB).
  std::size_t bucket_bytes = std::size_t{25} << 20;
};

namespace detail {

template <class T>
void check_dense(const param_list<T>& params, const char* who) {
  for (std::size_t i = 0; i < params.size(); ++i)
    SEMOE_CHECK(params[i].kind == param_kind::dense, "semoe::comm::", who, ": params[", i, "] ('", params[i].name,
                "') is an expert parameter; expert gradients stay with their expert, only dense ones are fused");
}

inline constexpr std::size_t no_bucket = static_cast<std::size_t>(-1);

}  // namespace detail

/// Dense gradients packed, in reverse registration order (backward finishes
/// the last layer first), into flat buckets of at most bucket_bytes; a
/// parameter larger than that gets a bucket of its own. Per step: call
/// mark_ready(i) once for every parameter as soon as its gradient is final,
/// then finish(). Results equal reduce_dense_grads (train/optimizer.hpp) bit
/// for bit on a communicator whose all_reduce sums each element in rank order
/// (comm::local), since every element is summed alone and in the same order.
/// Sharded parameters (param_scope::sharded) are skipped as there: their
/// gradients are already complete, so marking them ready only records it.
/// Not thread-safe: one rank's backward drives it.
template <class T, Communicator Comm>
class gradient_buckets {
 public:
  using options = bucket_options;

  static void validate(const options& opt) {
    SEMOE_CHECK(opt.bucket_bytes >= sizeof(T), "semoe::comm::gradient_buckets: options.bucket_bytes = ",
                opt.bucket_bytes, ": expected at least one element (", sizeof(T), " bytes)");
  }

  gradient_buckets(param_list<T> params, Comm& comm, options opt = {})
      : params_(std::move(params)), comm_(&comm) {
    validate(opt);
    detail::check_dense(params_, "gradient_buckets");
    const auto capacity = static_cast<index_t>(opt.bucket_bytes / sizeof(T));
    slot_.resize(params_.size());
    index_t flat = 0;
    bool close = true;  // the next parameter starts a new bucket
    for (std::size_t k = params_.size(); k-- > 0;) {
      if (params_[k].scope == param_scope::sharded) {
        slot_[k] = {detail::no_bucket, 0};
        continue;
      }
      const auto n = static_cast<index_t>(params_[k].grad.size());
      if (close || buckets_.back().elems + n > capacity) buckets_.push_back({flat, 0, 0, 0});
      bucket& b = buckets_.back();
      slot_[k] = {buckets_.size() - 1, flat};
      b.elems += n;
      ++b.params;
      flat += n;
      // An oversized parameter keeps its bucket to itself: sharing would only
      // delay the smaller gradients behind it.
      close = n > capacity;
    }
    flat_.resize_discard(flat);
    requests_.resize(buckets_.size());
    ready_.assign(params_.size(), false);
    reset_step();
  }

  std::size_t param_count() const { return params_.size(); }
  std::size_t bucket_count() const { return buckets_.size(); }
  /// The bucket that holds parameter i (none for a sharded one: ~0).
  std::size_t bucket_of(std::size_t i) const {
    check_index(i, "bucket_of");
    return slot_[i].bucket;
  }
  /// Elements of bucket k.
  index_t bucket_elements(std::size_t k) const {
    SEMOE_CHECK(k < buckets_.size(), "semoe::comm::gradient_buckets::bucket_elements: bucket = ", k,
                ": expected < ", buckets_.size());
    return buckets_[k].elems;
  }
  /// Staging memory the buckets hold (allocated once, reused every step).
  std::size_t workspace_bytes() const { return flat_.bytes(); }
  /// all_reduce collectives launched in the current step.
  std::size_t launched() const { return next_launch_; }

  /// Parameter i's gradient is final: stage it and, when that completes its
  /// bucket, launch the bucket's all_reduce. Buckets launch in index order on
  /// every rank whatever order gradients become ready in: collectives must be
  /// issued in the same order everywhere or they would pair up wrongly.
  void mark_ready(std::size_t i) {
    check_index(i, "mark_ready");
    SEMOE_CHECK(!ready_[i], "semoe::comm::gradient_buckets::mark_ready: params[", i, "] ('", params_[i].name,
                "') was already marked ready in this step");
    ready_[i] = true;
    const slot s = slot_[i];
    if (!communicates() || s.bucket == detail::no_bucket) return;
    const auto g = params_[i].grad;
    if (!g.empty()) std::memcpy(flat_.data() + s.offset, g.data(), sizeof(T) * g.size());
    ++buckets_[s.bucket].ready;
    while (next_launch_ < buckets_.size() && buckets_[next_launch_].ready == buckets_[next_launch_].params) {
      const bucket& b = buckets_[next_launch_];
      requests_[next_launch_] =
          comm_->all_reduce_async(std::span<T>(flat_.data() + b.offset, static_cast<std::size_t>(b.elems)),
                                  reduce_op::sum);
      ++next_launch_;
    }
  }

  /// Mark every parameter not yet marked, in backward order (for callers
  /// without per-parameter hooks: still one collective per bucket).
  void mark_all_ready() {
    for (std::size_t k = params_.size(); k-- > 0;)
      if (!ready_[k]) mark_ready(k);
  }

  /// Wait for every bucket and write the sums back into the gradients, times
  /// `scale` (say 1/P to average; 1 leaves the sums untouched; sharded
  /// gradients are left alone). Then the buckets are ready for the next step.
  void finish(T scale = T(1)) {
    for (std::size_t i = 0; i < params_.size(); ++i)
      SEMOE_CHECK(ready_[i], "semoe::comm::gradient_buckets::finish: params[", i, "] ('", params_[i].name,
                  "') was never marked ready in this step");
    if (communicates()) {
      for (auto& r : requests_) r.wait();
      for (std::size_t i = 0; i < params_.size(); ++i) {
        if (slot_[i].bucket == detail::no_bucket) continue;
        const auto g = params_[i].grad;
        const T* src = flat_.data() + slot_[i].offset;
        if (scale == T(1)) {
          if (!g.empty()) std::memcpy(g.data(), src, sizeof(T) * g.size());
        } else {
          for (std::size_t e = 0; e < g.size(); ++e) g[e] = src[e] * scale;
        }
      }
    } else if (scale != T(1)) {
      for (std::size_t i = 0; i < params_.size(); ++i)
        if (slot_[i].bucket != detail::no_bucket)
          for (auto& x : params_[i].grad) x = x * scale;
    }
    reset_step();
  }

 private:
  struct bucket {
    index_t offset, elems;
    std::size_t params, ready;
  };
  struct slot {
    std::size_t bucket;
    index_t offset;
  };

  /// One rank sums nothing, like reduce_dense_grads: no staging, no collective.
  bool communicates() const { return comm_->size() > 1; }

  void check_index(std::size_t i, const char* what) const {
    SEMOE_CHECK(i < params_.size(), "semoe::comm::gradient_buckets::", what, ": param = ", i, ": expected < ",
                params_.size());
  }

  void reset_step() {
    std::fill(ready_.begin(), ready_.end(), false);
    for (auto& b : buckets_) b.ready = 0;
    next_launch_ = 0;
  }

  param_list<T> params_;
  Comm* comm_;
  std::vector<bucket> buckets_;
  std::vector<slot> slot_;
  std::vector<bool> ready_;
  std::vector<request> requests_;
  buffer<T> flat_;
  std::size_t next_launch_ = 0;
};

/// A layer's dense parameters as one flat buffer of P equal shards (the last
/// padded with zeros): rank r owns elements [r * S, (r + 1) * S). Between
/// steps a rank keeps only its shard (parameters and, through the optimizer,
/// their state: P-fold less memory); all_gather() rebuilds the full layer with
/// one collective before it is used, and reduce_scatter() returns the summed
/// gradient of the rank's shard with one collective after backward.
template <class T, Communicator Comm>
class flat_shards {
 public:
  /// Packs params in registration order; each rank's shard starts as its
  /// slice of the values the params hold now (replicated at initialization).
  flat_shards(param_list<T> params, Comm& comm) : params_(std::move(params)), comm_(&comm) {
    detail::check_dense(params_, "flat_shards");
    const int P = comm.size();
    offsets_.reserve(params_.size() + 1);
    offsets_.push_back(0);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      SEMOE_CHECK(p.scope == param_scope::replicated, "semoe::comm::flat_shards: params[", i, "] ('", p.name,
                  "') is already sharded; only replicated parameters are packed");
      SEMOE_CHECK(p.grad.size() == p.value.size(), "semoe::comm::flat_shards: params[", i, "] ('", p.name, "') has ",
                  p.value.size(), " values but ", p.grad.size(), " gradients");
      offsets_.push_back(offsets_.back() + static_cast<index_t>(p.value.size()));
    }
    total_ = offsets_.back();
    shard_ = (total_ + P - 1) / P;
    full_.assign(shard_ * P, T{});
    mine_.resize_discard(shard_);
    grad_shard_.assign(shard_, T{});
    take_from_params();
  }

  /// Make the parameters' current values the flat buffer and this rank's
  /// shard: at construction, and after the parameters were overwritten
  /// whole outside a step (a restored checkpoint).
  void take_from_params() {
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (!params_[i].value.empty())
        std::memcpy(full_.data() + offsets_[i], params_[i].value.data(), sizeof(T) * params_[i].value.size());
    if (shard_) std::memcpy(mine_.data(), full_.data() + shard_ * comm_->rank(), sizeof(T) * shard_);
  }

  /// Elements of all parameters, of one shard, and of the padded flat buffer.
  index_t total_elements() const { return total_; }
  index_t shard_elements() const { return shard_; }
  index_t padded_elements() const { return full_.size(); }
  std::size_t workspace_bytes() const {
    return full_.bytes() + mine_.bytes() + grad_shard_.bytes() + grad_flat_.bytes();
  }

  /// This rank's slice of the parameters: the optimizer updates it in place.
  std::span<T> shard() { return mine_.span(); }
  /// This rank's slice of the summed gradient, after reduce_scatter().
  std::span<T> grad_shard() { return grad_shard_.span(); }

  /// Gather every rank's shard into the flat buffer: one collective per layer.
  /// shard() must not change until the request completes.
  request all_gather_async() {
    return comm_->all_gather_async(std::span<const T>(mine_.data(), static_cast<std::size_t>(shard_)), full_.span());
  }
  void all_gather() { all_gather_async().wait(); }

  /// The whole flat buffer, padding excluded (valid after all_gather()).
  std::span<T> full() { return full_.span().first(static_cast<std::size_t>(total_)); }
  /// Parameter i's values inside the flat buffer (valid after all_gather()).
  std::span<T> view(std::size_t i) {
    SEMOE_CHECK(i < params_.size(), "semoe::comm::flat_shards::view: param = ", i, ": expected < ", params_.size());
    return full_.span().subspan(static_cast<std::size_t>(offsets_[i]), params_[i].value.size());
  }
  /// For models that own their storage: copy the gathered values into them.
  void copy_to_params() {
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (!params_[i].value.empty())
        std::memcpy(params_[i].value.data(), full_.data() + offsets_[i], sizeof(T) * params_[i].value.size());
  }

  /// Sum the registered parameters' gradients over the ranks; rank r gets the
  /// sum of shard r in grad_shard(). Pack, then one reduce_scatter.
  request reduce_scatter_async() {
    grad_flat_.resize_discard(full_.size());
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (!params_[i].grad.empty())
        std::memcpy(grad_flat_.data() + offsets_[i], params_[i].grad.data(), sizeof(T) * params_[i].grad.size());
    std::fill(grad_flat_.data() + total_, grad_flat_.data() + grad_flat_.size(), T{});
    return launch_reduce_scatter(grad_flat_.span());
  }
  /// The same for a gradient already flat: total_elements() long (it is
  /// padded in a copy) or padded_elements() long (used in place; it must live
  /// until the request completes).
  request reduce_scatter_async(std::span<const T> grads) {
    SEMOE_CHECK(static_cast<index_t>(grads.size()) == total_ || static_cast<index_t>(grads.size()) == full_.size(),
                "semoe::comm::flat_shards::reduce_scatter: grads holds ", grads.size(), " elements, expected ", total_,
                " (every parameter) or ", full_.size(), " (padded to ", comm_->size(), " shards)");
    if (static_cast<index_t>(grads.size()) == full_.size()) return launch_reduce_scatter(grads);
    grad_flat_.resize_discard(full_.size());
    std::copy(grads.begin(), grads.end(), grad_flat_.data());
    std::fill(grad_flat_.data() + total_, grad_flat_.data() + grad_flat_.size(), T{});
    return launch_reduce_scatter(grad_flat_.span());
  }
  void reduce_scatter() { reduce_scatter_async().wait(); }
  void reduce_scatter(std::span<const T> grads) { reduce_scatter_async(grads).wait(); }

 private:
  request launch_reduce_scatter(std::span<const T> in) {
    return comm_->reduce_scatter_async(in, grad_shard_.span(), reduce_op::sum);
  }

  param_list<T> params_;
  Comm* comm_;
  std::vector<index_t> offsets_;
  index_t total_ = 0, shard_ = 0;
  buffer<T> full_, mine_, grad_shard_, grad_flat_;
};

}  // namespace semoe::comm
