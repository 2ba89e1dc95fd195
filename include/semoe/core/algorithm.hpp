// semoe/core/algorithm.hpp: the device-wide primitives routing is built from
// (histogram, exclusive sum, stable sort by key), dispatched on the executor
// as blas::engine is: algo::engine<Exec> runs them on the host here, and
// cuda/algorithm.cuh specializes it with CUB on the executor's stream.
// Pointers are in the executor's memory space; results are ordered after the
// work issued before, like a kernel's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/executor.hpp"

namespace semoe::algo {

/// The host implementations: plain loops in index order (stable, exact).
/// Executors whose memory the host addresses use them.
struct host_engine {
  /// counts[b] = #{i < n : values[i] == b} for b in [0, bins); values >= bins
  /// are not counted.
  template <class Exec>
  static void histogram(Exec& ex, const std::uint32_t* values, index_t n, std::int32_t* counts, int bins) {
    ex.synchronize();
    std::fill_n(counts, bins, 0);
    for (index_t i = 0; i < n; ++i)
      if (values[i] < static_cast<std::uint32_t>(bins)) ++counts[values[i]];
  }

  /// out[i] = in[0] + ... + in[i - 1], out[0] = 0. in and out may alias.
  template <class Exec, class I>
  static void exclusive_sum(Exec& ex, const I* in, I* out, index_t n) {
    ex.synchronize();
    std::exclusive_scan(in, in + n, out, I(0));
  }

  /// (keys_out, values_out) = (keys_in, values_in) ordered by key, equal
  /// keys in input order. Keys use bits [0, end_bit) only. Up to 16 bits
  /// (routing sorts by expert: a few bits) it is a counting sort, one pass
  /// to count and one to place; wider keys go to std::stable_sort.
  template <class Exec>
  static void sort_pairs(Exec& ex, const std::uint32_t* keys_in, std::uint32_t* keys_out,
                         const std::int32_t* values_in, std::int32_t* values_out, index_t n, int end_bit) {
    ex.synchronize();
    if (end_bit <= 16) {
      const std::uint32_t mask = (1u << end_bit) - 1u;
      std::vector<index_t> start((std::size_t{1} << end_bit) + 1, 0);
      for (index_t i = 0; i < n; ++i) ++start[(keys_in[i] & mask) + 1];
      for (std::size_t b = 1; b < start.size(); ++b) start[b] += start[b - 1];
      std::vector<std::uint32_t> k(static_cast<std::size_t>(n));  // in and out may alias
      std::vector<std::int32_t> v(static_cast<std::size_t>(n));
      for (index_t i = 0; i < n; ++i) {
        const index_t at = start[keys_in[i] & mask]++;
        k[static_cast<std::size_t>(at)] = keys_in[i];
        v[static_cast<std::size_t>(at)] = values_in[i];
      }
      std::copy(k.begin(), k.end(), keys_out);
      std::copy(v.begin(), v.end(), values_out);
      return;
    }
    std::vector<index_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), index_t{0});
    const std::uint32_t mask = end_bit >= 32 ? ~0u : (1u << end_bit) - 1u;
    std::stable_sort(order.begin(), order.end(),
                     [&](index_t a, index_t b) { return (keys_in[a] & mask) < (keys_in[b] & mask); });
    std::vector<std::uint32_t> k(static_cast<std::size_t>(n));
    std::vector<std::int32_t> v(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) {
      k[static_cast<std::size_t>(i)] = keys_in[order[static_cast<std::size_t>(i)]];
      v[static_cast<std::size_t>(i)] = values_in[order[static_cast<std::size_t>(i)]];
    }
    std::copy(k.begin(), k.end(), keys_out);
    std::copy(v.begin(), v.end(), values_out);
  }
};

/// The primitives of executor Exec. Host executors get host_engine; a device
/// executor specializes this (cuda/algorithm.cuh).
template <class Exec>
struct engine : host_engine {
  static_assert(Exec::memory_space::host_accessible,
                "semoe::algo::engine: no primitives for this executor's memory; include its backend's "
                "algorithm header (semoe/cuda/algorithm.cuh for the cuda executor)");
};

template <class Exec>
void histogram(Exec& ex, const std::uint32_t* values, index_t n, std::int32_t* counts, int bins) {
  SEMOE_CHECK(n >= 0 && bins >= 1, "semoe::algo::histogram: n = ", n, ", bins = ", bins,
              ": expected n >= 0 and bins >= 1");
  engine<Exec>::histogram(ex, values, n, counts, bins);
}

template <class Exec, class I>
void exclusive_sum(Exec& ex, const I* in, I* out, index_t n) {
  SEMOE_CHECK(n >= 0, "semoe::algo::exclusive_sum: n = ", n, ": expected >= 0");
  if (n > 0) engine<Exec>::exclusive_sum(ex, in, out, n);
}

template <class Exec>
void sort_pairs(Exec& ex, const std::uint32_t* keys_in, std::uint32_t* keys_out, const std::int32_t* values_in,
                std::int32_t* values_out, index_t n, int end_bit = 32) {
  SEMOE_CHECK(n >= 0 && end_bit >= 1 && end_bit <= 32, "semoe::algo::sort_pairs: n = ", n, ", end_bit = ", end_bit,
              ": expected n >= 0 and 1 <= end_bit <= 32");
  if (n > 0) engine<Exec>::sort_pairs(ex, keys_in, keys_out, values_in, values_out, n, end_bit);
}

}  // namespace semoe::algo
