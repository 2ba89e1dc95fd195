// semoe/layer/expert_exchange.hpp: the expert-parallel exchange of one MoE
// layer (SE-MoE's global_scatter / global_gather). Rows leave a rank in
// dispatch order (destination rank, then its local experts), an all-to-all
// carries them, and they are regrouped expert-major for the grouped GEMM;
// the way back mirrors it. Counts are exchanged first, so every rank knows
// how many rows each peer sends. On a device backend the host communicators
// (comm::local, comm::tcp) carry the rows through host staging buffers;
// comm::nccl moves the device buffers themselves.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/core/backend.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/trace.hpp"
#include "semoe/layer/dispatch.hpp"

namespace semoe::layer {

/// The group's token count and this rank's first global token: every rank's
/// batch size, learned in one all-gather (one rank: no collective).
template <class Comm>
std::pair<index_t, index_t> group_tokens(Comm& comm, index_t tokens) {
  const int P = comm.size();
  if (P == 1) return {tokens, 0};
  std::vector<std::uint64_t> mine{static_cast<std::uint64_t>(tokens)}, all(static_cast<std::size_t>(P));
  comm::all_gather(comm, std::span<const std::uint64_t>(mine), std::span<std::uint64_t>(all));
  index_t global = 0, offset = 0;
  for (int p = 0; p < P; ++p) {
    if (p < comm.rank()) offset += static_cast<index_t>(all[p]);
    global += static_cast<index_t>(all[p]);
  }
  return {global, offset};
}

template <class T, Backend B, class Comm>
class expert_exchange {
  static constexpr bool on_device = B::executor::on_device;

 public:
  /// counts[e]: rows this rank sends to global expert e (experts are split
  /// over the ranks in blocks of `local_experts`). Sizes every buffer of the
  /// step and computes the regrouping.
  void plan(typename B::executor& ex, Comm& comm, std::span<const std::int32_t> counts, index_t local_experts,
            index_t hidden) {
    const int P = comm.size();
    const index_t L = local_experts;
    hidden_ = hidden;
    std::vector<index_t> send(static_cast<std::size_t>(P * L)), recv(static_cast<std::size_t>(P * L));
    std::vector<index_t> per_rank(static_cast<std::size_t>(P), L);
    for (index_t e = 0; e < P * L; ++e) send[e] = counts[e];
    comm::all_to_all_v(comm, std::span<const index_t>(send), std::span<const index_t>(per_rank),
                       std::span<index_t>(recv), std::span<const index_t>(per_rank));
    send_elems_.assign(static_cast<std::size_t>(P), 0);
    recv_elems_.assign(static_cast<std::size_t>(P), 0);
    for (int p = 0; p < P; ++p)
      for (index_t i = 0; i < L; ++i) {
        send_elems_[p] += counts[p * L + i] * hidden;
        recv_elems_[p] += recv[p * L + i] * hidden;
      }
    offsets_.resize_discard(L + 1);
    offsets_[0] = 0;
    for (index_t i = 0; i < L; ++i) {
      index_t n = 0;
      for (int p = 0; p < P; ++p) n += recv[p * L + i];
      offsets_[i + 1] = offsets_[i] + n;
    }
    rows_ = offsets_[L];
    to_expert_major_.resize_discard(rows_);
    std::vector<index_t> cursor(offsets_.begin(), offsets_.end() - 1);
    index_t r = 0;
    for (int p = 0; p < P; ++p)
      for (index_t i = 0; i < L; ++i)
        for (index_t j = 0; j < recv[p * L + i]; ++j) to_expert_major_[r++] = cursor[i]++;
    if constexpr (on_device) {
      to_expert_major_dev_.resize_discard(rows_);
      ex.copy(to_expert_major_dev_.data(), to_expert_major_.data(), to_expert_major_.bytes());
    }
    recv_.resize_discard(rows_ * hidden);
  }

  /// Rows this rank's local experts receive, and where each expert's start.
  index_t rows() const { return rows_; }
  std::span<const index_t> expert_offsets() const { return offsets_.span(); }

  /// Rows in dispatch order to the local experts' rows, expert-major.
  void to_experts(typename B::executor& ex, Comm& comm, const T* dispatched, T* expert_major) {
    all_to_all(ex, comm, dispatched, send_elems_, recv_.data(), recv_elems_);
    ex.parallel_rows(rows_, hidden_, detail::scatter_rows_kernel<T>{map(), hidden_, recv_.data(), expert_major},
                     row_grain);
  }

  /// The way back: expert-major rows regrouped by source rank, then returned.
  void from_experts(typename B::executor& ex, Comm& comm, const T* expert_major, T* dispatched) {
    ex.parallel_rows(rows_, hidden_, detail::gather_rows_kernel<T>{map(), hidden_, expert_major, recv_.data()},
                     row_grain);
    all_to_all(ex, comm, recv_.data(), recv_elems_, dispatched, send_elems_);
  }

 private:
  const index_t* map() const {
    if constexpr (on_device)
      return to_expert_major_dev_.data();
    else
      return to_expert_major_.data();
  }

  void all_to_all(typename B::executor& ex, Comm& comm, const T* send, const std::vector<index_t>& send_counts,
                  T* recv, const std::vector<index_t>& recv_counts) {
    trace::scope ts("all_to_all", "comm", comm.rank());
    index_t ns = 0, nr = 0;
    for (auto c : send_counts) ns += c;
    for (auto c : recv_counts) nr += c;
    if constexpr (on_device && !comm::moves_device_memory_v<Comm>) {  // a host communicator: stage through host memory
      send_host_.resize_discard(ns);
      recv_host_.resize_discard(nr);
      ex.copy(send_host_.data(), send, send_host_.bytes());
      comm::all_to_all_v(comm, std::span<const T>(send_host_.span()), std::span<const index_t>(send_counts),
                         recv_host_.span(), std::span<const index_t>(recv_counts));
      ex.copy(recv, recv_host_.data(), recv_host_.bytes());
    } else {
      comm::all_to_all_v(comm, std::span<const T>(send, static_cast<std::size_t>(ns)),
                         std::span<const index_t>(send_counts), std::span<T>(recv, static_cast<std::size_t>(nr)),
                         std::span<const index_t>(recv_counts));
    }
  }

  index_t hidden_ = 0, rows_ = 0;
  std::vector<index_t> send_elems_, recv_elems_;  // per peer, in elements
  buffer<index_t> offsets_, to_expert_major_;
  buffer<index_t, typename B::memory_space> to_expert_major_dev_;
  buffer<T, typename B::memory_space> recv_;                          // rows in receive order
  buffer<T, typename B::host_memory_space> send_host_, recv_host_;  // device backends: staging
};

}  // namespace semoe::layer
