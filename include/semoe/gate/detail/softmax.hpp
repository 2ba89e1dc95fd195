// semoe/gate/detail/softmax.hpp: the row kernels every softmax gate shares.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "semoe/core/config.hpp"
#include "semoe/core/tensor.hpp"

namespace semoe::gate::detail {

/// p = softmax(x[t, :]); returns log-sum-exp of the row (the z-loss needs it).
/// Sums run in double so that float routers round once, not E times.
template <class T>
T softmax_row(matrix_view<const T> x, index_t t, T* p) {
  const index_t n = x.cols();
  T mx = x(t, 0);
  for (index_t e = 1; e < n; ++e) mx = std::max(mx, x(t, e));
  double sum = 0;
  for (index_t e = 0; e < n; ++e) {
    p[e] = std::exp(x(t, e) - mx);
    sum += static_cast<double>(p[e]);
  }
  const double inv = 1.0 / sum;
  for (index_t e = 0; e < n; ++e) p[e] = static_cast<T>(static_cast<double>(p[e]) * inv);
  return static_cast<T>(static_cast<double>(mx) + std::log(sum));
}

/// Indices of the k largest of s[0, n), largest first. Equal values keep the
/// lower index first, so routing never depends on sort stability.
template <class S>
void top_k_indices(const S* s, index_t n, index_t k, std::int32_t* out) {
  index_t m = 0;  // filled so far
  for (index_t e = 0; e < n; ++e) {
    index_t pos = m;
    while (pos > 0 && s[out[pos - 1]] < s[e]) --pos;
    if (pos >= k) continue;
    for (index_t j = std::min(m, k - 1); j > pos; --j) out[j] = out[j - 1];
    out[pos] = static_cast<std::int32_t>(e);
    m = std::min(m + 1, k);
  }
}

/// dx[i] = w[i] * (g[i] - sum_j w[j] g[j]): the softmax Jacobian applied to g.
template <class T>
void softmax_backward(const T* w, const T* g, index_t n, T* dx) {
  double dot = 0;
  for (index_t i = 0; i < n; ++i) dot += static_cast<double>(w[i]) * static_cast<double>(g[i]);
  for (index_t i = 0; i < n; ++i)
    dx[i] = static_cast<T>(static_cast<double>(w[i]) * (static_cast<double>(g[i]) - dot));
}

}  // namespace semoe::gate::detail
