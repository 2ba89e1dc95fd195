// Collective checks written once and run on every communicator (comm::local,
// comm::tcp, comm::mpi): the body takes one rank's handle and asserts on what
// it sees, or returns the bytes it ended up with, to compare with what
// comm::local's thread-ranks end up with.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <type_traits>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/comm/local.hpp"

namespace semoe::test {

using bytes = std::vector<unsigned char>;
using comm::reduce_op;

inline std::vector<std::vector<index_t>> random_counts(int P, unsigned seed, int scale = 1) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(-3, 6);
  std::vector<std::vector<index_t>> c(P, std::vector<index_t>(P));
  for (auto& row : c)
    for (auto& x : row) x = std::max(0, d(rng)) * scale;
  return c;
}

template <class T>
std::vector<T> reduce_input(int r, std::size_t n, unsigned seed) {
  std::mt19937_64 rng(1000 + r + 7919 * seed);
  std::vector<T> v(n);
  for (auto& x : v) {
    if constexpr (std::is_floating_point_v<T>)
      x = static_cast<T>(std::uniform_real_distribution<double>(-1, 1)(rng) * std::pow(10.0, int(rng() % 7) - 3));
    else if constexpr (std::is_signed_v<T>)
      x = static_cast<T>(rng() % (std::uint64_t{1} << 58)) - (T{1} << 57);
    else
      x = static_cast<T>(rng() >> 4);
  }
  return v;
}

template <class T>
void put(bytes& out, const std::vector<T>& v) {
  const auto* p = reinterpret_cast<const unsigned char*>(v.data());
  out.insert(out.end(), p, p + v.size() * sizeof(T));
}

template <class C, class T>
void a2a(C& c, bytes& out, unsigned seed, int scale = 1) {
  const int P = c.size(), me = c.rank();
  const auto counts = random_counts(P, seed, scale);
  std::vector<index_t> sc = counts[me], rc(P);
  std::vector<T> send;
  for (int dst = 0; dst < P; ++dst)
    for (index_t i = 0; i < counts[me][dst]; ++i) send.push_back(static_cast<T>(me * 10000 + dst * 1000 + i % 997));
  index_t total = 0;
  for (int src = 0; src < P; ++src) total += rc[src] = counts[src][me];
  std::vector<T> recv(static_cast<std::size_t>(total) + 2, T(-1));
  comm::all_to_all_v(c, std::span<const T>(send), std::span<const index_t>(sc), std::span<T>(recv),
                     std::span<const index_t>(rc));
  put(out, recv);
}

template <class C, class T>
void reductions(C& c, bytes& out, unsigned seed) {
  for (reduce_op op : {reduce_op::sum, reduce_op::max, reduce_op::min})
    for (std::size_t n : {0, 1, 3, 37, 1000}) {
      auto x = reduce_input<T>(c.rank(), n, seed);
      comm::all_reduce(c, std::span<T>(x), op);
      put(out, x);
      const std::size_t m = n / 2 + 1;
      const auto in = reduce_input<T>(c.rank(), m * c.size(), seed + 1);
      std::vector<T> o(m);
      comm::reduce_scatter(c, std::span<const T>(in), std::span<T>(o), op);
      put(out, o);
    }
}

/// Every collective of the concept, in a fixed order; the bytes each rank ends up with.
template <class C>
bytes everything(C& c, unsigned seed) {
  bytes out;
  const int P = c.size(), me = c.rank();
  a2a<C, float>(c, out, seed);
  a2a<C, double>(c, out, seed + 1);
  a2a<C, std::int64_t>(c, out, seed + 2);
  reductions<C, float>(c, out, seed);
  reductions<C, double>(c, out, seed);
  reductions<C, std::int64_t>(c, out, seed);
  reductions<C, std::uint64_t>(c, out, seed);
  for (std::size_t m : {0, 1, 5}) {
    std::vector<int> mine(m), all(m * P, -1);
    for (std::size_t i = 0; i < m; ++i) mine[i] = me * 100 + int(i);
    comm::all_gather(c, std::span<const int>(mine), std::span<int>(all));
    put(out, all);
  }
  for (int root = 0; root < P; ++root) {
    std::vector<double> d(9, me == root ? root + 0.5 : -1.0);
    comm::broadcast(c, std::span<double>(d), root);
    put(out, d);
  }
  c.barrier();
  // A split group ordered by descending world rank, and collectives inside it.
  C g = c.split(me % 2, -me);
  out.push_back(static_cast<unsigned char>(g.rank()));
  out.push_back(static_cast<unsigned char>(g.size()));
  reductions<C, float>(g, out, seed + 5);
  a2a<C, double>(g, out, seed + 6);
  std::vector<int> mine{me}, order(g.size());
  comm::all_gather(g, std::span<const int>(mine), std::span<int>(order));
  put(out, order);
  // Async: several in flight at once, waited newest first.
  std::vector<double> s = reduce_input<double>(me, 100, seed + 9);
  std::vector<int> all(P, -1);
  std::vector<float> b(5, me == P - 1 ? 7.5f : 0.f);
  auto r1 = c.all_reduce_async(std::span<double>(s), reduce_op::sum);
  auto r2 = c.all_gather_async(std::span<const int>(mine), std::span<int>(all));
  auto r3 = c.broadcast_async(std::span<float>(b), P - 1);
  r3.wait(), r2.wait(), r1.wait();
  put(out, s);
  put(out, all);
  put(out, b);
  return out;
}

/// Multi-MiB messages: an exchange of up to 6 x 128 Ki floats per pair, an
/// 8 MiB all_reduce and a 2 MiB-per-rank all_gather; the bytes a rank ends with.
template <class C>
bytes large_exchanges(C& c) {
  bytes out;
  a2a<C, float>(c, out, 5, 1 << 17);
  std::vector<double> x = reduce_input<double>(c.rank(), 1 << 20, 3);
  comm::all_reduce(c, std::span<double>(x));
  put(out, x);
  std::vector<std::int64_t> all((1 << 18) * c.size()), mine(1 << 18, c.rank() + 1);
  comm::all_gather(c, std::span<const std::int64_t>(mine), std::span<std::int64_t>(all));
  put(out, all);
  return out;
}

/// Each rank's `everything` bytes under comm::local.
inline std::vector<bytes> local_reference(int P, unsigned seed) {
  std::vector<bytes> ref(P);
  comm::local::run(P, [&](comm::local& c) { ref[c.rank()] = everything(c, seed); });
  return ref;
}

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
