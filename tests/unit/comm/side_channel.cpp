// The side channel comm::nccl runs over (any host communicator, type-erased):
// rank 0's bytes reach every rank, counts are gathered, splits follow the
// communicator's, and after a failure the ranks that never issued the
// collective are named; a side channel that fails says so. On thread-ranks.
#include <doctest/doctest.h>

#include <atomic>
#include <string>
#include <vector>

#include "semoe/comm/detail/side_channel.hpp"
#include "semoe/comm/local.hpp"

using namespace semoe;
using comm::detail::make_side_channel;
using comm::detail::who_never_issued;

TEST_CASE("side channel: rank 0's bytes reach every rank, counts are gathered, splits follow the communicator") {
  std::vector<std::string> got(3);
  std::vector<std::vector<std::uint64_t>> gathered(3);
  std::vector<int> sub_sizes(3), sub_ranks(3);
  comm::local::run(3, [&](comm::local& c) {
    auto side = make_side_channel(c.split(0, c.rank()));
    CHECK(side.rank == c.rank());
    CHECK(side.size == 3);
    std::vector<std::uint8_t> id(16, 0);
    if (side.rank == 0)
      for (std::size_t i = 0; i < id.size(); ++i) id[i] = static_cast<std::uint8_t>(7 * i + 1);
    side.broadcast_from_0(std::span<std::uint8_t>(id));
    got[side.rank] = std::string(id.begin(), id.end());
    gathered[side.rank] = side.all_gather(100 + static_cast<std::uint64_t>(side.rank));
    auto sub = side.split(side.rank % 2, side.rank);
    sub_sizes[side.rank] = sub.size;
    sub_ranks[side.rank] = sub.rank;
  });
  for (int r = 0; r < 3; ++r) {
    CHECK(got[r] == got[0]);
    CHECK(gathered[r] == std::vector<std::uint64_t>{100, 101, 102});
  }
  CHECK(got[0][1] == 8);
  CHECK(sub_sizes == std::vector<int>{2, 1, 2});
  CHECK(sub_ranks == std::vector<int>{0, 0, 1});
}

TEST_CASE("side channel: after a failed collective, the ranks that never issued it are named") {
  std::vector<std::string> said(3);
  comm::local::run(3, [&](comm::local& c) {
    auto side = make_side_channel(c.split(0, c.rank()));
    // Collective #5 failed on ranks 0 and 2; rank 1 has issued only 4.
    said[side.rank] = who_never_issued(side, 5, side.rank == 1 ? 4 : 6);
  });
  CHECK(said[0] == "rank 1 (at #4) never issued it");
  CHECK(said[2] == said[0]);
  std::vector<std::string> all(2);
  comm::local::run(2, [&](comm::local& c) {
    all[c.rank()] = who_never_issued(make_side_channel(c.split(0, c.rank())), 3, 3);
  });
  CHECK(all[0] == "every rank issued it, so the transfer itself stalled (a hung GPU, link or NIC)");
}

TEST_CASE("side channel: when the side channel itself fails, its error is the answer") {
  comm::detail::side_channel broken;
  broken.all_gather = [](std::uint64_t) -> std::vector<std::uint64_t> {
    semoe::detail::fail("rank 3 made no progress for 60000 ms");
  };
  CHECK(who_never_issued(broken, 2, 2) ==
        "the side channel could not ask the other ranks: rank 3 made no progress for 60000 ms");
}
