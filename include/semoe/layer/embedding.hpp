// semoe/layer/embedding.hpp: the token embedding, ids -> rows of a [vocab, dim]
// table, and its column-partitioned form across data-parallel ranks (SE-MoE
// §4.3, "embedding partition").
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/backend.hpp"
#include "semoe/core/parameter.hpp"
#include "semoe/core/random.hpp"
#include "semoe/core/tensor.hpp"

namespace semoe::layer {

/// y[i] = table[ids[i]]. Not a Module (its input is ids, not rows of T): it
/// sits in front of a sequential. The table starts N(0, 1), as in PyTorch.
template <class T, Backend B = cpu>
class embedding {
 public:
  using backend = B;
  static_assert(!B::executor::on_device, "semoe::layer::embedding runs on host backends (semoe::cpu) only; its device "
                                          "kernels are not written yet");

  using value_type = T;

  struct options {
    index_t vocab = 0;
    index_t dim = 0;
  };

  static void validate(const options& o) {
    SEMOE_CHECK(o.vocab > 0 && o.vocab <= index_t{1} << 31, "semoe::layer::embedding: options.vocab = ", o.vocab,
                "; expected 1 to 2^31 (ids are int32)");
    SEMOE_CHECK(o.dim > 0, "semoe::layer::embedding: options.dim = ", o.dim, "; expected a positive width");
  }

  embedding(typename B::executor& ex, const options& o, std::uint64_t seed) : ex_(&ex), opt_(o) {
    validate(o);
    table_.resize_discard(o.vocab * o.dim);
    grad_.assign(o.vocab * o.dim, T(0));
    const philox rng(seed, 0);
    T* t = table_.data();
    ex.parallel_for(table_.size(), [=](index_t k) { t[k] = static_cast<T>(rng.normal(static_cast<std::uint64_t>(k))); });
  }

  const options& opts() const { return opt_; }
  index_t dim() const { return opt_.dim; }

  /// ids stay valid (the caller keeps them) until backward.
  void forward(std::span<const std::int32_t> ids, matrix_view<T> y) {
    const auto n = static_cast<index_t>(ids.size());
    check_shape(y, n, opt_.dim, "semoe::layer::embedding::forward: y");
    // Check every id before touching y: a bad id never becomes an out-of-bounds read.
    for (index_t i = 0; i < n; ++i)
      SEMOE_CHECK(ids[i] >= 0 && ids[i] < opt_.vocab, "semoe::layer::embedding::forward: ids[", i, "] = ", ids[i],
                  " is out of range; expected 0 <= id < vocab = ", opt_.vocab);
    const T* t = table_.data();
    const index_t d = opt_.dim;
    const std::int32_t* id = ids.data();
    ex_->parallel_for(n, [=](index_t i) { std::copy_n(t + id[i] * d, d, y.row(i)); },
                      std::max<index_t>(1, 16384 / d));
    ids_ = ids;
    has_input_ = true;
  }

  /// grad[ids[i]] += dy[i]; repeated ids accumulate.
  void backward(matrix_view<const T> dy) {
    SEMOE_CHECK(has_input_, "semoe::layer::embedding::backward: called before forward");
    const auto n = static_cast<index_t>(ids_.size());
    check_shape(dy, n, opt_.dim, "semoe::layer::embedding::backward: dy");
    // Threads own disjoint column blocks, so repeated ids never race and each
    // element sums its rows in order: deterministic for any thread count.
    T* g = grad_.data();
    const index_t d = opt_.dim;
    const std::int32_t* id = ids_.data();
    ex_->parallel_chunks(d, 64, [=](index_t b, index_t e) {
      for (index_t i = 0; i < n; ++i) {
        T* gr = g + id[i] * d;
        const T* dyi = dy.row(i);
        for (index_t j = b; j < e; ++j) gr[j] += dyi[j];
      }
    });
  }

  param_list<T> parameters() { return {{"weight", table_.span(), grad_.span(), param_kind::dense}}; }
  void zero_grad() { grad_.zero(); }

  matrix_view<T> weight() { return table_.matrix(opt_.vocab, opt_.dim); }
  matrix_view<T> weight_grad() { return grad_.matrix(opt_.vocab, opt_.dim); }

 private:
  typename B::executor* ex_;
  options opt_;
  buffer<T> table_, grad_;
  std::span<const std::int32_t> ids_{};
  bool has_input_ = false;
};

/// The embedding partition of SE-MoE: the [vocab, dim] table is split by
/// columns across the n ranks of a data-parallel communicator, rank r holding
/// columns [r*dim/n, (r+1)*dim/n) of every row, so the table, its gradient and
/// its optimizer state are n-fold smaller per rank. Every rank must call
/// forward and backward together (they are collectives), each with its own
/// tokens; token counts may differ between ranks, and may be 0.
///
///   forward:  counts and ids to every rank; each rank looks up its columns
///             for all ranks' tokens; an all-to-all returns each rank its own
///             tokens' column slices, assembled into y [tokens, dim].
///   backward: one all-to-all sends each rank the dy columns of every rank's
///             tokens; a scatter-add into the local slice of the gradient.
///
/// The slice's gradient is already summed over every rank's tokens, so it
/// must NOT be all-reduced over the data-parallel group like a replicated
/// dense parameter (that would add other ranks' columns into this rank's):
/// parameters() marks it param_scope::sharded, which train::reduce_dense_grads
/// skips and train::grad_norm sums over the group.
/// With the same seed the union of the slices is embedding<T>'s table, and
/// outputs and gradients equal its own bit for bit.
template <class T, comm::Communicator Comm, Backend B = cpu>
class partitioned_embedding {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "semoe::layer::partitioned_embedding: T must be float or double, the element types every "
                "Communicator moves; see comm/concepts.hpp");

 public:
  using backend = B;
  static_assert(!B::executor::on_device, "semoe::layer::partitioned_embedding runs on host backends (semoe::cpu) only; its device "
                                          "kernels are not written yet");

  using value_type = T;
  using comm_type = Comm;
  /// vocab and dim of the whole (unpartitioned) table.
  using options = typename embedding<T>::options;
  static void validate(const options& o, int ranks) {
    embedding<T>::validate(o);
    SEMOE_CHECK(ranks >= 1, "semoe::layer::partitioned_embedding: the communicator has ", ranks,
                " ranks; expected at least 1");
    SEMOE_CHECK(o.dim % ranks == 0, "semoe::layer::partitioned_embedding: options.dim = ", o.dim,
                " is not divisible by the ", ranks, " ranks of the communicator; expected a multiple of ", ranks);
  }

  /// Bytes of scratch one forward + backward uses for `local_tokens` tokens
  /// here and `total_tokens` over all ranks (allocated on first use, kept).
  static std::size_t workspace_bytes(const options& o, int ranks, index_t local_tokens, index_t total_tokens) {
    const auto P = static_cast<std::size_t>(ranks), n = static_cast<std::size_t>(local_tokens),
               N = static_cast<std::size_t>(total_tokens), h = static_cast<std::size_t>(o.dim) / P;
    return sizeof(float) * (2 * P + P * n + N) + sizeof(std::int32_t) * N +
           sizeof(T) * (N * h + n * static_cast<std::size_t>(o.dim));
  }

  /// Builds this rank's slice; no communication. `comm` must outlive this.
  partitioned_embedding(typename B::executor& ex, Comm& comm, const options& o, std::uint64_t seed)
      : ex_(&ex), comm_(&comm), opt_(o), ranks_(comm.size()), rank_(comm.rank()) {
    validate(o, ranks_);
    width_ = o.dim / ranks_;
    col0_ = rank_ * width_;
    table_.resize_discard(o.vocab * width_);
    grad_.assign(o.vocab * width_, T(0));
    // Element (v, col0 + j) draws the counter embedding<T> gives it, so the
    // union of the slices is the unpartitioned table.
    const philox rng(seed, 0);
    T* t = table_.data();
    const index_t h = width_, d = o.dim, c0 = col0_;
    ex.parallel_for(table_.size(), [=](index_t k) {
      const index_t v = k / h, j = k % h;
      t[k] = static_cast<T>(rng.normal(static_cast<std::uint64_t>(v * d + c0 + j)));
    });
    counts_.assign(static_cast<std::size_t>(ranks_), 0);
    send_counts_.assign(static_cast<std::size_t>(ranks_), 0);
    recv_counts_.assign(static_cast<std::size_t>(ranks_), 0);
  }

  const options& opts() const { return opt_; }
  index_t dim() const { return opt_.dim; }
  /// Columns held here: [column_begin(), column_begin() + local_dim()).
  index_t local_dim() const { return width_; }
  index_t column_begin() const { return col0_; }
  int ranks() const { return ranks_; }
  int rank() const { return rank_; }

  /// Collective. ids (this rank's tokens) stay valid until backward; y is
  /// [ids.size(), dim]. A bad id or y on any rank is an error on every rank.
  void forward(std::span<const std::int32_t> ids, matrix_view<T> y) {
    has_input_ = false;
    const int P = ranks_;
    const index_t h = width_, d = opt_.dim;
    const auto n = static_cast<index_t>(ids.size());
    SEMOE_CHECK(n <= std::numeric_limits<std::int32_t>::max(), "semoe::layer::partitioned_embedding::forward: ",
                n, " tokens; expected at most 2^31 - 1 per rank");
    const bool y_ok = y.rows() == n && y.cols() == d;

    // (1) Token counts, plus whether y fits, so a bad call fails on every rank
    // rather than leaving its peers waiting in the next collective.
    const float head[2] = {std::bit_cast<float>(static_cast<std::int32_t>(n)),
                           std::bit_cast<float>(static_cast<std::int32_t>(y_ok))};
    heads_.resize_discard(2 * P);
    comm::all_gather(*comm_, std::span<const float>(head, 2), heads_.span());
    index_t total = 0;
    for (int p = 0; p < P; ++p) {
      counts_[p] = std::bit_cast<std::int32_t>(heads_[2 * p]);
      total += counts_[p];
    }
    if (!y_ok) check_shape(y, n, d, "semoe::layer::partitioned_embedding::forward: y");
    for (int p = 0; p < P; ++p)
      SEMOE_CHECK(std::bit_cast<std::int32_t>(heads_[2 * p + 1]) != 0,
                  "semoe::layer::partitioned_embedding::forward: rank ", p,
                  " passed y of the wrong shape (its own error says which)");

    // (2) Every rank's ids to every rank. Ids travel bit-cast into float, the
    // one element type every Communicator carries; nothing does arithmetic on them.
    id_send_.resize_discard(P * n);
    for (int p = 0; p < P; ++p)
      for (index_t i = 0; i < n; ++i) id_send_[p * n + i] = std::bit_cast<float>(ids[i]);
    id_recv_.resize_discard(total);
    for (int p = 0; p < P; ++p) {
      send_counts_[p] = n;
      recv_counts_[p] = counts_[p];
    }
    comm::all_to_all_v(*comm_, std::span<const float>(id_send_.data(), static_cast<std::size_t>(P * n)),
                       std::span<const index_t>(send_counts_), id_recv_.span(),
                       std::span<const index_t>(recv_counts_));
    // Every rank checks every id, so all throw the same error at the same point.
    all_ids_.resize_discard(total);
    index_t at = 0;
    for (int p = 0; p < P; ++p)
      for (index_t i = 0; i < counts_[p]; ++i, ++at) {
        const auto id = std::bit_cast<std::int32_t>(id_recv_[at]);
        SEMOE_CHECK(id >= 0 && id < opt_.vocab, "semoe::layer::partitioned_embedding::forward: rank ", p,
                    ": ids[", i, "] = ", id, " is out of range; expected 0 <= id < vocab = ", opt_.vocab);
        all_ids_[at] = id;
      }

    // (3) This rank's columns for all tokens, already grouped by owning rank.
    rows_.resize_discard(total * h);
    {
      const T* tab = table_.data();
      const std::int32_t* id = all_ids_.data();
      T* out = rows_.data();
      ex_->parallel_for(total, [=](index_t t) { std::copy_n(tab + id[t] * h, h, out + t * h); },
                        std::max<index_t>(1, 16384 / h));
    }
    // (4) Back to the owners: from rank q, [n, h] = columns q*h.. of my tokens.
    cols_.resize_discard(n * d);
    for (int p = 0; p < P; ++p) {
      send_counts_[p] = counts_[p] * h;
      recv_counts_[p] = n * h;
    }
    comm::all_to_all_v(*comm_, std::span<const T>(rows_.data(), static_cast<std::size_t>(total * h)),
                       std::span<const index_t>(send_counts_), cols_.span(), std::span<const index_t>(recv_counts_));
    {
      const T* in = cols_.data();
      ex_->parallel_for(n, [=](index_t i) {
        for (int q = 0; q < P; ++q) std::copy_n(in + (q * n + i) * h, h, y.row(i) + q * h);
      }, std::max<index_t>(1, 16384 / d));
    }
    tokens_ = n;
    total_ = total;
    has_input_ = true;
  }

  /// Collective. grad[ids[t]] += dy[t] over every rank's tokens t, for this
  /// rank's columns; repeated ids accumulate in (rank, position) order.
  void backward(matrix_view<const T> dy) {
    SEMOE_CHECK(has_input_, "semoe::layer::partitioned_embedding::backward: called before forward");
    const int P = ranks_;
    const index_t h = width_, d = opt_.dim, n = tokens_, total = total_;
    check_shape(dy, n, d, "semoe::layer::partitioned_embedding::backward: dy");
    // Pack dy by destination: rank q gets [n, h] = columns q*h.. of my tokens.
    {
      T* out = cols_.data();
      ex_->parallel_for(n, [=](index_t i) {
        for (int q = 0; q < P; ++q) std::copy_n(dy.row(i) + q * h, h, out + (q * n + i) * h);
      }, std::max<index_t>(1, 16384 / d));
    }
    for (int p = 0; p < P; ++p) {
      send_counts_[p] = n * h;
      recv_counts_[p] = counts_[p] * h;
    }
    comm::all_to_all_v(*comm_, std::span<const T>(cols_.data(), static_cast<std::size_t>(n * d)),
                       std::span<const index_t>(send_counts_), rows_.span(), std::span<const index_t>(recv_counts_));
    // As in embedding<T>: threads own disjoint column blocks, so repeated ids
    // never race and each element sums its tokens in order (deterministic).
    T* g = grad_.data();
    const T* in = rows_.data();
    const std::int32_t* id = all_ids_.data();
    ex_->parallel_chunks(h, 64, [=](index_t b, index_t e) {
      for (index_t t = 0; t < total; ++t) {
        T* gr = g + id[t] * h;
        const T* r = in + t * h;
        for (index_t j = b; j < e; ++j) gr[j] += r[j];
      }
    });
  }

  /// This rank's [vocab, dim/n] slice, marked sharded: see the class comment.
  param_list<T> parameters() {
    return {{"weight", table_.span(), grad_.span(), param_kind::dense, param_scope::sharded}};
  }
  void zero_grad() { grad_.zero(); }

  matrix_view<T> weight() { return table_.matrix(opt_.vocab, width_); }
  matrix_view<T> weight_grad() { return grad_.matrix(opt_.vocab, width_); }

 private:
  typename B::executor* ex_;
  Comm* comm_;
  options opt_;
  int ranks_, rank_;
  index_t width_ = 0, col0_ = 0;
  buffer<T> table_, grad_;
  // Scratch, sized on first use and kept (steady-state steps allocate nothing).
  buffer<float> heads_, id_send_, id_recv_;
  buffer<std::int32_t> all_ids_;  // every rank's ids, in (rank, position) order
  buffer<T> rows_;                // [all tokens, h]: lookups out, dy slices in
  buffer<T> cols_;                // [ranks, tokens, h]: y slices in, dy slices out
  std::vector<index_t> counts_, send_counts_, recv_counts_;
  index_t tokens_ = 0, total_ = 0;
  bool has_input_ = false;
};

}  // namespace semoe::layer
