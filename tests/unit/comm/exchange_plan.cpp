// The all-to-all plan every communicator shares (comm::local, comm::tcp and,
// on GPUs, comm::nccl): offsets are prefix sums of the counts, and bad
// arguments are errors naming the collective.
#include <doctest/doctest.h>

#include <vector>

#include "semoe/comm/detail/exchange_plan.hpp"

using semoe::index_t;
using semoe::comm::detail::plan_exchange;

TEST_CASE("exchange plan: offsets are the prefix sums of the counts, zero counts included") {
  const std::vector<index_t> send{3, 0, 5}, recv{2, 0, 7};
  const auto plan = plan_exchange("test::all_to_all_v", 1, 3, send, 8, recv, 10);
  CHECK(plan.send_offset == std::vector<std::size_t>{0, 3, 3, 8});
  CHECK(plan.recv_offset == std::vector<std::size_t>{0, 2, 2, 9});
  CHECK(plan.send_count(2) == 5);
  CHECK(plan.recv_count(0) == 2);
  CHECK(plan.recv_count(1) == 0);
}

TEST_CASE("exchange plan: wrong arguments name the collective and what is wrong") {
  const std::vector<index_t> two{1, 1}, three{1, 1, 1}, negative{1, -2, 1};
  CHECK_THROWS_WITH_AS(plan_exchange("x::all_to_all_v", 0, 3, two, 9, three, 9),
                       doctest::Contains("x::all_to_all_v: expected 3 send and receive counts, got 2 and 3"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(plan_exchange("x::all_to_all_v", 0, 3, negative, 9, three, 9),
                       doctest::Contains("negative send count -2 for rank 1"), semoe::error);
  CHECK_THROWS_WITH_AS(plan_exchange("x::all_to_all_v", 0, 3, three, 2, three, 9),
                       doctest::Contains("send counts total 3 elements but the buffer holds 2"), semoe::error);
  CHECK_THROWS_WITH_AS(plan_exchange("x::all_to_all_v", 0, 3, three, 9, three, 1),
                       doctest::Contains("receive counts total 3 elements but the buffer holds 1"), semoe::error);
  const std::vector<index_t> self_two{2, 1, 1};
  CHECK_THROWS_WITH_AS(plan_exchange("x::all_to_all_v", 0, 3, self_two, 9, three, 9),
                       doctest::Contains("rank 0 sends 2 elements to itself but expects 1"), semoe::error);
}
