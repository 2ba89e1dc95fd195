// semoe/comm/detail/exchange_plan.hpp: the checks and offsets of a variable
// all-to-all, shared by every communicator (comm::local, comm::tcp,
// comm::nccl): counts are one per rank and never negative, they fit the
// buffers, a rank sends itself what it expects from itself, and the
// message to or from peer p starts at the sum of the counts before it.
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"

namespace semoe::comm::detail {

/// Where each peer's message starts in the send and receive buffers, in
/// elements: send_offset[p] .. send_offset[p + 1] goes to rank p.
struct exchange_plan {
  std::vector<std::size_t> send_offset, recv_offset;  // size + 1 prefix sums

  std::size_t send_count(int p) const { return send_offset[p + 1] - send_offset[p]; }
  std::size_t recv_count(int p) const { return recv_offset[p + 1] - recv_offset[p]; }
};

/// Prefix sums of `counts`, checked to be non-negative and to total at most
/// `have` elements. `who` names the collective in errors.
inline std::vector<std::size_t> exchange_offsets(const char* who, std::span<const index_t> counts, std::size_t have,
                                                 const char* what) {
  std::vector<std::size_t> off(counts.size() + 1, 0);
  for (std::size_t p = 0; p < counts.size(); ++p) {
    SEMOE_CHECK(counts[p] >= 0, who, ": negative ", what, " count ", counts[p], " for rank ", p);
    off[p + 1] = off[p] + static_cast<std::size_t>(counts[p]);
  }
  SEMOE_CHECK(off.back() <= have, who, ": ", what, " counts total ", off.back(), " elements but the buffer holds ",
              have);
  return off;
}

/// The plan of one rank's all_to_all_v over `size` ranks, or a semoe::error
/// naming what is wrong with the arguments.
inline exchange_plan plan_exchange(const char* who, int rank, int size, std::span<const index_t> send_counts,
                                   std::size_t send_have, std::span<const index_t> recv_counts,
                                   std::size_t recv_have) {
  SEMOE_CHECK(static_cast<int>(send_counts.size()) == size && static_cast<int>(recv_counts.size()) == size, who,
              ": expected ", size, " send and receive counts, got ", send_counts.size(), " and ", recv_counts.size());
  exchange_plan plan{exchange_offsets(who, send_counts, send_have, "send"),
                     exchange_offsets(who, recv_counts, recv_have, "receive")};
  SEMOE_CHECK(send_counts[rank] == recv_counts[rank], who, ": rank ", rank, " sends ", send_counts[rank],
              " elements to itself but expects ", recv_counts[rank]);
  return plan;
}

}  // namespace semoe::comm::detail
