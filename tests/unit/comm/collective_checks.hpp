// Collective checks written once and run on every communicator (comm::local,
// comm::tcp): the body takes one rank's handle and asserts on what it sees.
#pragma once

#include <doctest/doctest.h>

#include <span>
#include <vector>

#include "semoe/comm/concepts.hpp"

namespace semoe::test {

/// Five async collectives in flight at once; even ranks wait newest first,
/// odd ranks oldest first, and one request is dropped unwaited. Every result
/// must still be right (collectives complete in issue order).
template <class C>
void check_async_in_flight(C& c) {
  using comm::reduce_op;
  const int me = c.rank(), P = c.size();
  std::vector<double> sum{double(me), 1.0};
  std::vector<int> mine{me}, all(P, -1);
  std::vector<int> b(3, me == P - 1 ? 7 : 0);
  std::vector<index_t> ones(P, 1);
  std::vector<int> send(P), recv(P, -1);
  for (int p = 0; p < P; ++p) send[p] = me * 10 + p;
  std::vector<double> dropped{1.0};

  auto r1 = c.all_reduce_async(std::span<double>(sum), reduce_op::sum);
  auto r2 = c.all_gather_async(std::span<const int>(mine), std::span<int>(all));
  auto r3 = c.broadcast_async(std::span<int>(b), P - 1);
  auto r4 = c.all_to_all_v_async(std::span<const int>(send), std::span<const index_t>(ones), std::span<int>(recv),
                                 std::span<const index_t>(ones));
  { auto r5 = c.all_reduce_async(std::span<double>(dropped), reduce_op::max); }  // a dropped request waits
  CHECK(dropped[0] == 1.0);
  CHECK(r1.pending());
  if (me % 2 == 0) {
    r4.wait(), r3.wait(), r2.wait(), r1.wait();
  } else {
    r1.wait(), r2.wait(), r3.wait(), r4.wait();
  }
  CHECK_FALSE(r1.pending());
  r1.wait();  // idempotent
  CHECK(sum == std::vector<double>{P * (P - 1) / 2.0, double(P)});
  for (int p = 0; p < P; ++p) CHECK(all[p] == p);
  CHECK(b == std::vector<int>(3, 7));
  for (int p = 0; p < P; ++p) CHECK(recv[p] == p * 10 + me);
}

}  // namespace semoe::test
