// semoe/layer/expert_backward.hpp: the dy an MoE layer hands its experts'
// backward. The layer wants dx in the rows dy arrived in (one buffer less);
// that is safe only for an expert that reads dy before writing dx there, so
// only one that says so (expert::backward_in_place_v) shares the memory.
#pragma once

#include <cstddef>

#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/executor.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/expert/concepts.hpp"

namespace semoe::layer {

/// dy for an expert's backward whose dx is `dy_dx` (contiguous rows): dy_dx
/// itself for an expert that opts in to in-place backward, else a copy of it
/// in `scratch`, so dx and dy are distinct memory.
template <class Expert, Executor Exec, class T, class Space>
matrix_view<const T> expert_dy(Exec& ex, matrix_view<T> dy_dx, buffer<T, Space>& scratch) {
  if constexpr (expert::backward_in_place_v<Expert>) {
    return dy_dx;
  } else {
    const index_t rows = dy_dx.rows(), cols = dy_dx.cols();
    SEMOE_EXPECTS(dy_dx.ld() == cols);
    scratch.resize_discard(rows * cols);
    ex.copy(scratch.data(), dy_dx.data(), static_cast<std::size_t>(rows * cols) * sizeof(T));
    return scratch.matrix(rows, cols);
  }
}

}  // namespace semoe::layer
