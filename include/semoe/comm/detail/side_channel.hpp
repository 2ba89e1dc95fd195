// semoe/comm/detail/side_channel.hpp: what a device communicator (comm::nccl)
// needs from a host communicator, type-erased so that the device
// communicator's header does not include the host one's (comm::tcp's
// Boost.Asio does not compile under nvcc): rank 0's bootstrap bytes sent to
// all, every rank's count of issued collectives after a failure, and the same
// split. Any Communicator provides it; comm::local and comm::tcp do.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/core/error.hpp"

namespace semoe::comm::detail {

/// The side channel of one rank (copies share the communicator behind it).
struct side_channel {
  int rank = 0, size = 1, local_rank = 0, local_size = 1;
  std::function<void(std::span<std::uint8_t>)> broadcast_from_0;
  std::function<std::vector<std::uint64_t>(std::uint64_t)> all_gather;
  std::function<side_channel(int, int)> split;
};

template <class C>
side_channel make_side_channel(C c) {
  auto sp = std::make_shared<C>(std::move(c));
  side_channel s;
  s.rank = sp->rank();
  s.size = sp->size();
  s.local_rank = sp->local_rank();
  s.local_size = sp->local_size();
  s.broadcast_from_0 = [sp](std::span<std::uint8_t> bytes) { comm::broadcast(*sp, bytes, 0); };
  s.all_gather = [sp](std::uint64_t mine) {
    std::vector<std::uint64_t> all(static_cast<std::size_t>(sp->size()));
    comm::all_gather(*sp, std::span<const std::uint64_t>(&mine, 1), std::span<std::uint64_t>(all));
    return all;
  };
  s.split = [sp](int color, int key) { return make_side_channel(sp->split(color, key)); };
  return s;
}

/// After collective number `id` failed on this rank, which has issued
/// `issued` so far: every rank's count of issued collectives, gathered over
/// the side channel, as a sentence naming the ranks that never issued it. The side channel's own failure (a rank
/// that died or went silent, which comm::tcp names) is the answer then.
inline std::string who_never_issued(const side_channel& side, std::uint64_t id, std::uint64_t issued) {
  try {
    const auto seen = side.all_gather(issued);
    std::string behind;
    int n = 0;
    for (std::size_t r = 0; r < seen.size(); ++r)
      if (seen[r] < id) behind += semoe::detail::concat(n++ ? ", " : "", r, " (at #", seen[r], ")");
    if (n == 0) return "every rank issued it, so the transfer itself stalled (a hung GPU, link or NIC)";
    return semoe::detail::concat(n == 1 ? "rank " : "ranks ", behind, " never issued it");
  } catch (const std::exception& e) {
    return std::string("the side channel could not ask the other ranks: ") + e.what();
  }
}

}  // namespace semoe::comm::detail
