// semoe/gate/detail/softmax.hpp: the row kernels every softmax gate shares.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "semoe/core/config.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/gate/detail/kernels.hpp"

namespace semoe::gate::detail {

/// p = softmax(x[t, :]); returns log-sum-exp of the row (the z-loss needs it).
template <class T>
T softmax_row(matrix_view<const T> x, index_t t, T* p) {
  return softmax_row(x.data() + t * x.ld(), x.cols(), p);
}

/// Indices of the k largest of s[0, n), largest first; ties keep the lower index.
template <class S>
void top_k_indices(const S* s, index_t n, index_t k, std::int32_t* out) {
  top_k_by([s](index_t e) { return s[e]; }, n, k, out);
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
