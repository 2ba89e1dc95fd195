// semoe/layer/dispatch.hpp: moving token rows between token order and the
// expert-major dispatch order of a routing plan (SE-MoE §3.1: the permute
// before global_scatter and the weighted combine after global_gather), each
// with its exact backward. Every kernel is a SEMOE_HD body over one index or,
// for the row copies and sums, over a row and a range of its columns
// (Executor::parallel_rows), so a GPU reads rows with whole warps.
#pragma once

#include "semoe/core/buffer.hpp"
#include "semoe/core/executor.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::layer {

namespace detail {
/// row[a] = offsets[expert[a]] + slot[a] for kept assignments, else -1.
struct dispatch_row_kernel {
  const std::int32_t* expert;
  const std::int32_t* slot;
  const index_t* offsets;
  index_t* row;
  SEMOE_HD void operator()(index_t a) const { row[a] = slot[a] < 0 ? -1 : offsets[expert[a]] + slot[a]; }
};
}  // namespace detail

/// Dispatch row of every assignment (offsets[e] + slot), or -1 when it is not
/// kept, in the memory of executor `ex` where the plan lives. Computed once
/// per step, read by every kernel below.
template <Executor Exec, class T, class Space>
void dispatch_rows(Exec& ex, const gate::routing_plan<T, Space>& plan, buffer<index_t, Space>& row) {
  row.resize_discard(plan.assignments());
  buffer<index_t, Space> staged;  // the plan's offsets, on the host always
  const index_t* offsets = plan.offsets.data();
  if constexpr (!accessible_from<Space, Exec>) {
    staged.resize_discard(plan.offsets.size());
    ex.copy(staged.data(), plan.offsets.data(), staged.bytes());
    offsets = staged.data();
  }
  ex.parallel_for(plan.assignments(), detail::dispatch_row_kernel{plan.expert.data(), plan.slot.data(), offsets,
                                                                  row.data()});
}
template <class T>
void dispatch_rows(const gate::routing_plan<T>& plan, buffer<index_t>& row) {
  sequential_executor seq;
  dispatch_rows(seq, plan, row);
}

namespace detail {

template <class T>
SEMOE_HD inline void copy_cols(T* SEMOE_RESTRICT dst, const T* SEMOE_RESTRICT src, index_t j0, index_t j1) {
  for (index_t j = j0; j < j1; ++j) dst[j] = src[j];
}

/// x_disp[row(a)] = x[token(a)] for kept assignments.
template <class T>
struct permute_kernel {
  const index_t* row;
  index_t k, cols;
  const T* x;
  index_t x_ld;
  T* out;
  index_t out_ld;
  SEMOE_HD void operator()(index_t a, index_t j0, index_t j1) const {
    const index_t r = row[a];
    if (r >= 0) copy_cols(out + r * out_ld, x + (a / k) * x_ld, j0, j1);
  }
  SEMOE_HD void operator()(index_t a) const { (*this)(a, 0, cols); }
};

/// y[t] = sum over kept choices c of weight * y_disp[row(t, c)].
template <class T>
struct combine_kernel {
  const index_t* row;
  const T* weight;
  index_t k, cols;
  const T* y_disp;
  index_t yd_ld;
  T* y;
  index_t y_ld;
  SEMOE_HD void operator()(index_t t, index_t j0, index_t j1) const {
    T* out = y + t * y_ld;
    for (index_t j = j0; j < j1; ++j) out[j] = T(0);
    for (index_t c = 0; c < k; ++c) {
      const index_t a = t * k + c, r = row[a];
      if (r < 0) continue;
      const T w = weight[a];
      const T* src = y_disp + r * yd_ld;
      for (index_t j = j0; j < j1; ++j) out[j] += w * src[j];
    }
  }
  SEMOE_HD void operator()(index_t t) const { (*this)(t, 0, cols); }
};

/// Backward of combine: dy_disp[row(a)] = weight * dy[t] and
/// dweight[a] = <dy[t], y_disp[row(a)]>; dweight is 0 for unkept choices.
/// The dot product keeps `lanes` partial sums, column j in sum j % lanes,
/// added together in lane order at the end: a fixed order that the
/// compiler can run as one vector of sums (a single running sum is a chain
/// of dependent adds, each waiting for the last).
template <class T>
struct combine_backward_kernel {
  static constexpr index_t lanes = 16;
  const index_t* row;
  const T* weight;
  index_t k, cols;
  const T* dy;
  index_t dy_ld;
  const T* y_disp;
  index_t yd_ld;
  T* dy_disp;
  index_t dd_ld;
  T* dweight;
  SEMOE_HD void operator()(index_t a) const {
    const index_t r = row[a];
    if (r < 0) {
      dweight[a] = T(0);
      return;
    }
    const T* g = dy + (a / k) * dy_ld;
    const T* yr = y_disp + r * yd_ld;
    T* out = dy_disp + r * dd_ld;
    const T w = weight[a];
    T sum[lanes] = {};
    index_t j = 0;
    for (; j + lanes <= cols; j += lanes)
      for (index_t l = 0; l < lanes; ++l) {
        sum[l] += g[j + l] * yr[j + l];
        out[j + l] = w * g[j + l];
      }
    for (index_t l = 0; j < cols; ++j, ++l) {
      sum[l] += g[j] * yr[j];
      out[j] = w * g[j];
    }
    T dot = T(0);
    for (index_t l = 0; l < lanes; ++l) dot += sum[l];
    dweight[a] = dot;
  }
};

/// Backward of permute: dx[t] = sum over kept choices of dx_disp[row(t, c)].
template <class T>
struct unpermute_sum_kernel {
  const index_t* row;
  index_t k, cols;
  const T* dx_disp;
  index_t dd_ld;
  T* dx;
  index_t dx_ld;
  SEMOE_HD void operator()(index_t t, index_t j0, index_t j1) const {
    T* out = dx + t * dx_ld;
    for (index_t j = j0; j < j1; ++j) out[j] = T(0);
    for (index_t c = 0; c < k; ++c) {
      const index_t r = row[t * k + c];
      if (r < 0) continue;
      const T* src = dx_disp + r * dd_ld;
      for (index_t j = j0; j < j1; ++j) out[j] += src[j];
    }
  }
  SEMOE_HD void operator()(index_t t) const { (*this)(t, 0, cols); }
};

/// out[dst(i)] = in[i] for a row permutation given as a destination map.
template <class T>
struct scatter_rows_kernel {
  const index_t* dst;
  index_t cols;
  const T* in;
  T* out;
  SEMOE_HD void operator()(index_t i, index_t j0, index_t j1) const {
    copy_cols(out + dst[i] * cols, in + i * cols, j0, j1);
  }
  SEMOE_HD void operator()(index_t i) const { (*this)(i, 0, cols); }
};

/// out[i] = in[dst(i)]: the inverse of scatter_rows_kernel.
template <class T>
struct gather_rows_kernel {
  const index_t* dst;
  index_t cols;
  const T* in;
  T* out;
  SEMOE_HD void operator()(index_t i, index_t j0, index_t j1) const {
    copy_cols(out + i * cols, in + dst[i] * cols, j0, j1);
  }
  SEMOE_HD void operator()(index_t i) const { (*this)(i, 0, cols); }
};

}  // namespace detail

// Row kernels are memory-bound: a grain of 64 rows keeps scheduling cheap.
inline constexpr index_t row_grain = 64;

/// What the row kernels read of a routing plan, as pointers in the memory
/// of the executor that runs them: the plan itself on the host, its device
/// mirror on a GPU.
template <class T>
struct dispatch_map {
  const index_t* row = nullptr;   ///< [assignments] dispatch row or -1 (dispatch_rows)
  const T* weight = nullptr;      ///< [assignments] combine weight
  index_t k = 0, tokens = 0;

  index_t assignments() const { return tokens * k; }
};

/// The map of a host plan and its dispatch rows.
template <class T>
dispatch_map<T> host_map(const gate::routing_plan<T>& plan, const buffer<index_t>& row) {
  return {row.data(), plan.weight.data(), plan.k, plan.tokens};
}

template <Executor Exec, class T>
void permute(Exec& ex, const dispatch_map<T>& m, in_view<T> x, matrix_view<T> x_disp) {
  ex.parallel_rows(m.assignments(), x.cols(),
                   detail::permute_kernel<T>{m.row, m.k, x.cols(), x.data(), x.ld(), x_disp.data(), x_disp.ld()},
                   row_grain);
}

template <Executor Exec, class T>
void combine(Exec& ex, const dispatch_map<T>& m, in_view<T> y_disp, matrix_view<T> y) {
  ex.parallel_rows(m.tokens, y.cols(),
                   detail::combine_kernel<T>{m.row, m.weight, m.k, y.cols(), y_disp.data(), y_disp.ld(), y.data(),
                                             y.ld()},
                   row_grain);
}

template <Executor Exec, class T>
void combine_backward(Exec& ex, const dispatch_map<T>& m, in_view<T> dy, in_view<T> y_disp, matrix_view<T> dy_disp,
                      T* dweight) {
  ex.parallel_for(m.assignments(),
                  detail::combine_backward_kernel<T>{m.row, m.weight, m.k, dy.cols(), dy.data(), dy.ld(),
                                                     y_disp.data(), y_disp.ld(), dy_disp.data(), dy_disp.ld(),
                                                     dweight},
                  row_grain);
}

template <Executor Exec, class T>
void unpermute_sum(Exec& ex, const dispatch_map<T>& m, in_view<T> dx_disp, matrix_view<T> dx) {
  ex.parallel_rows(m.tokens, dx.cols(),
                   detail::unpermute_sum_kernel<T>{m.row, m.k, dx.cols(), dx_disp.data(), dx_disp.ld(), dx.data(),
                                                   dx.ld()},
                   row_grain);
}

}  // namespace semoe::layer
