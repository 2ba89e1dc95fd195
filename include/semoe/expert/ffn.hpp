// semoe/expert/ffn.hpp: the feed-forward expert, y = act(x W1 + b1) W2 + b2,
// with relu, gelu or swiglu. Forward and backward run over all local experts
// as grouped GEMMs with one elementwise pass between them; on a host executor
// that runs the GEMMs itself (OpenBLAS on one thread), as tasks of row tiles
// and gradient pieces spread over its threads (see "On a host executor ...").
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "semoe/expert/activation.hpp"
#include "semoe/expert/concepts.hpp"
#include "semoe/expert/grouped_gemm.hpp"

namespace semoe::expert {

namespace detail {

/// Forward activation over rows: a = act(pre) (gated: a = f(g) * u with pre = [g | u]).
template <class T, class Act>
struct activation_forward_kernel {
  const T* pre;
  index_t pre_ld;
  T* a;
  index_t a_ld, cols;
  SEMOE_HD void operator()(index_t r, index_t j0, index_t j1) const {
    const T* p = pre + r * pre_ld;
    T* out = a + r * a_ld;
    if constexpr (Act::gated) {
      for (index_t j = j0; j < j1; ++j) out[j] = Act::template f<T>(p[j]) * p[cols + j];
    } else {
      for (index_t j = j0; j < j1; ++j) out[j] = Act::template f<T>(p[j]);
    }
  }
  SEMOE_HD void operator()(index_t r) const { (*this)(r, 0, cols); }
};

/// Forward activation that keeps what backward needs, from one evaluation:
/// a = act(pre) into a and pre <- act'(pre) in place. Gated, with
/// pre = [g | u] and a = f(g) u: pre <- [u f'(g) | f(g)], the two factors
/// that turn da into dg and du.
template <class T, class Act>
struct activation_forward_keep_slope_kernel {
  T* pre;
  index_t pre_ld;
  T* a;
  index_t a_ld, cols;
  SEMOE_HD void operator()(index_t r, index_t j0, index_t j1) const {
    T* p = pre + r * pre_ld;
    T* out = a + r * a_ld;
    for (index_t j = j0; j < j1; ++j) {
      T v, d;
      act::value_and_slope<Act>(p[j], v, d);
      if constexpr (Act::gated) {
        const T u = p[cols + j];
        out[j] = v * u;  // the bits of activation_forward_kernel's f(g) * u
        p[j] = u * d;
        p[cols + j] = v;
      } else {
        out[j] = v;
        p[j] = d;
      }
    }
  }
  SEMOE_HD void operator()(index_t r) const { (*this)(r, 0, cols); }
};

/// Backward of the activation from the kept factors, in place over rows:
/// work <- da * act'(pre) (gated: [dg | du] = da * [u f'(g) | f(g)]).
template <class T, class Act>
struct times_slope_kernel {
  const T* slope;
  index_t slope_ld;
  T* work;
  index_t work_ld, cols;
  SEMOE_HD void operator()(index_t r, index_t j0, index_t j1) const {
    const T* s = slope + r * slope_ld;
    T* w = work + r * work_ld;
    for (index_t j = j0; j < j1; ++j) {
      const T da = w[j];
      if constexpr (Act::gated) w[cols + j] = da * s[cols + j];
      w[j] = da * s[j];
    }
  }
  SEMOE_HD void operator()(index_t r) const { (*this)(r, 0, cols); }
};

/// y[r, :] += b over rows.
template <class T>
struct add_bias_kernel {
  T* y;
  index_t ld, cols;
  const T* b;
  SEMOE_HD void operator()(index_t r, index_t j0, index_t j1) const {
    T* row = y + r * ld;
    for (index_t j = j0; j < j1; ++j) row[j] += b[j];
  }
  SEMOE_HD void operator()(index_t r) const { (*this)(r, 0, cols); }
};

/// db[j] += sum over rows of d[:, j], one column per index, rows in order.
template <class T>
struct column_sum_kernel {
  const T* d;
  index_t rows, ld;
  T* db;
  SEMOE_HD void operator()(index_t j) const {
    T acc = T(0);
    for (index_t r = 0; r < rows; ++r) acc += d[r * ld + j];
    db[j] += acc;
  }
};

/// db[j] += sum of rows of d[:, j]. On the host a block of 64 columns walks
/// the rows together (row-major memory, one pass); on a device each column is
/// a thread. Both add the rows in order: the same sums.
template <class T, Executor Exec>
void add_column_sums(Exec& ex, const T* d, index_t rows, index_t ld, index_t cols, T* db) {
  if constexpr (ChunkedExecutor<Exec>) {
    constexpr index_t block = 64;
    ex.parallel_chunks(cols, block, [&](index_t b, index_t e) {
      T acc[block] = {};
      for (index_t r = 0; r < rows; ++r) {
        const T* row = d + r * ld;
        for (index_t j = b; j < e; ++j) acc[j - b] += row[j];
      }
      for (index_t j = b; j < e; ++j) db[j] += acc[j - b];
    });
  } else {
    ex.parallel_for(cols, column_sum_kernel<T>{d, rows, ld, db});
  }
}

}  // namespace detail

/// The FFN expert. Parameter block layout, in this order: W1 [hidden, f1],
/// W2 [ffn, hidden], then b1 [f1] and b2 [hidden] only when options.bias is
/// set; f1 = ffn, or 2 * ffn when gated (columns [a | b], hidden act(a) * b).
template <class Act = act::gelu>
class ffn {
 public:
  using policy_kind = expert_tag;
  using activation = Act;
  /// backward may get dx in dy's memory: it reads all of dy (da = dy W2^T,
  /// dW2, db2) before it writes any dx (the last GEMM), which saves the layer
  /// a copy of the rows.
  static constexpr bool backward_in_place = true;

  struct options {
    index_t hidden = 0;
    index_t ffn = 0;
    bool bias = false;
    /// What the expert GEMMs multiply: the float values (native), or their
    /// bfloat16 roundings summed in fp32 (bf16: tensor cores on a GPU, the
    /// same products on the cpu). Weights, gradients and activations stay fp32.
    blas::precision gemm_inputs = blas::precision::native;
  };

  static void validate(const options& o) {
    SEMOE_CHECK(o.hidden > 0, "semoe::expert::ffn: options.hidden = ", o.hidden, ": expected > 0");
    SEMOE_CHECK(o.ffn > 0, "semoe::expert::ffn: options.ffn = ", o.ffn, ": expected > 0");
    SEMOE_CHECK(o.gemm_inputs == blas::precision::native || o.gemm_inputs == blas::precision::bf16,
                "semoe::expert::ffn: options.gemm_inputs = ", static_cast<int>(o.gemm_inputs),
                ": expected precision::native or precision::bf16");
  }

  ffn() = default;
  explicit ffn(options o) : opt_(o) { validate(o); }

  const options& opts() const { return opt_; }
  index_t f1() const { return Act::gated ? 2 * opt_.ffn : opt_.ffn; }

  static index_t block_elems(const options& o) {
    const index_t f1 = Act::gated ? 2 * o.ffn : o.ffn;
    return o.hidden * f1 + o.ffn * o.hidden + (o.bias ? f1 + o.hidden : 0);
  }
  index_t block_elems() const { return block_elems(opt_); }
  /// Per routed row, two rows of width f1 kept from forward to backward:
  /// saved holds act'(pre) (gated: [u f'(g) | f(g)]) and work the
  /// activation a, so backward evaluates no activation: dW2 = a^T dy first,
  /// then da = dy W2^T over a and dpre = da * act'(pre). Eval mode
  /// (backward_follows false) keeps nothing.
  index_t saved_cols() const { return f1(); }
  index_t work_cols() const { return f1(); }

  /// Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights, zero biases, from a
  /// counter-based stream per expert: the same on every rank and placement.
  template <class T>
  void init(std::span<T> block, philox rng, index_t expert_id) const {
    SEMOE_CHECK(static_cast<index_t>(block.size()) == block_elems(), "semoe::expert::ffn::init: block holds ",
                block.size(), " elements, expected ", block_elems());
    const auto base = static_cast<std::uint64_t>(expert_id) << 40;
    const T s1 = T(1) / std::sqrt(T(opt_.hidden)), s2 = T(1) / std::sqrt(T(opt_.ffn));
    auto [w1, b1, w2, b2] = split(block.data());
    for (index_t i = 0; i < opt_.hidden * f1(); ++i)
      w1[i] = s1 * (T(2) * T(rng.uniform(base + static_cast<std::uint64_t>(i))) - T(1));
    const auto base2 = base + (std::uint64_t{1} << 39);
    for (index_t i = 0; i < opt_.ffn * opt_.hidden; ++i)
      w2[i] = s2 * (T(2) * T(rng.uniform(base2 + static_cast<std::uint64_t>(i))) - T(1));
    if (opt_.bias) {
      std::fill_n(b1, f1(), T(0));
      std::fill_n(b2, opt_.hidden, T(0));
    }
  }

  /// y = act(x W1 + b1) W2 + b2 for every local expert; keeps a and act'(pre)
  /// for backward in b.work and b.saved (see saved_cols).
  template <class T, Executor Exec>
  void forward(Exec& ex, const expert_batch<T>& b, matrix_view<T> y) const {
    check(b, y, "forward");
    if constexpr (on_host_threads<Exec>)
      if (blas::gemms_on_executor(ex))
        if (auto tiles = row_tiles(b); enough_tiles(ex, tiles)) return forward_tiles(ex, b, tiles, y);
    forward_grouped(ex, b, y);
  }

  /// Accumulates parameter gradients into b.grads and writes dx. dx may be dy's
  /// memory (backward_in_place): dy's last use comes before dx is written.
  /// Destroys b.saved and b.work.
  template <class T, Executor Exec>
  void backward(Exec& ex, const expert_batch<T>& b, in_view<T> dy, matrix_view<T> dx) const {
    check(b, dx, "backward");
    if constexpr (on_host_threads<Exec>)
      if (blas::gemms_on_executor(ex))
        if (auto tiles = row_tiles(b); enough_tiles(ex, tiles)) return backward_tiles(ex, b, tiles, dy, dx);
    backward_grouped(ex, b, dy, dx);
  }

  /// GEMM shapes of one forward + backward of an expert with n rows, for
  /// benchmarks that time the bare GEMMs of exactly what the layer ran.
  std::vector<gemm_problem<float>> gemm_shapes(index_t n) const {
    const index_t H = opt_.hidden, F = opt_.ffn, F1 = f1();
    using blas::op;
    std::vector<gemm_problem<float>> shapes{{op::n, op::n, n, F1, H}, {op::n, op::n, n, H, F},
                                            {op::n, op::t, n, F, H},  {op::t, op::n, F, H, n},
                                            {op::t, op::n, H, F1, n}, {op::n, op::t, n, H, F1}};
    for (auto& p : shapes) p.inputs = opt_.gemm_inputs;
    return shapes;
  }

 private:
  // -- On a host executor that runs GEMMs on its own threads -------------
  //
  // (blas::gemms_on_executor: OpenBLAS on one thread.) The work is cut into
  // tasks that each run on one thread with single-threaded BLAS, handed out
  // largest first as threads come free:
  //  * row tiles: an expert's rows in tiles of 1024 to 2047 rows (fewer
  //    rows: one tile); forward runs x W1, bias, activation and W2 on a
  //    tile back to back, while its rows are still in cache; backward runs
  //    dy W2^T with dpre = da * act'(pre) from the factors forward kept,
  //    and later dpre W1^T;
  //  * weight gradients: dW1 and dW2 sum over all of an expert's rows, so
  //    each is one GEMM over them, cut into blocks of its output
  //    (blas::detail::cut_of), with the bias sums as one more task.
  // Tiles and cuts depend on the row counts and sizes alone, never on the
  // thread count: every thread count computes the same pieces, the same
  // bits (OpenBLAS's kernels give each element of C the same bits whichever
  // block of C a call computes, for blocks this large). With fewer than two
  // tiles per thread (one expert at a time: eval mode, a store that streams
  // blocks) the threads would idle, so each pass runs over all the experts
  // instead, with the engine cutting every GEMM over the threads: the same
  // GEMMs in blocks of C, the same bits.
  template <class Exec>
  static constexpr bool on_host_threads = ChunkedExecutor<Exec> && !Exec::on_device;

  struct tile {
    index_t expert, first, rows;
  };
  template <class T>
  static std::vector<tile> row_tiles(const expert_batch<T>& b) {
    constexpr index_t rows_per_tile = 1024;
    std::vector<tile> tiles;
    for (index_t e = 0; e < b.experts(); ++e) {
      const index_t n = b.rows(e), count = std::max<index_t>(1, n / rows_per_tile);
      for (index_t i = 0; i < count; ++i) {
        const index_t first = n * i / count, last = n * (i + 1) / count;
        if (last > first) tiles.push_back({e, b.offsets[e] + first, last - first});
      }
    }
    std::stable_sort(tiles.begin(), tiles.end(), [](const tile& u, const tile& v) { return u.rows > v.rows; });
    return tiles;
  }

  /// Two tiles per thread at least, so that the threads end together.
  template <class Exec>
  static bool enough_tiles(Exec& ex, const std::vector<tile>& tiles) {
    return static_cast<index_t>(tiles.size()) >= 2 * ex.concurrency();
  }

  /// f(item) for every item, each on one of ex's threads, in list order as
  /// threads come free.
  template <class Exec, class Item, class F>
  static void run_tasks(Exec& ex, const std::vector<Item>& items, const F& f) {
    ex.parallel_chunks(static_cast<index_t>(items.size()), 1, [&](index_t first, index_t last) {
      for (index_t i = first; i < last; ++i) f(items[static_cast<std::size_t>(i)]);
    });
  }

  /// a = act(x W1 + b1) into work for rows [r0, r0 + rows) of b and, when
  /// backward follows, act'(pre) (gated: [u f'(g) | f(g)]) over the
  /// pre-activation in saved.
  template <class T, class E>
  void activate(E& ex, const expert_batch<T>& b, index_t r0, index_t rows, index_t grain) const {
    const index_t F = opt_.ffn;
    T* pre = b.saved.row(r0);
    T* a = b.work.row(r0);
    if (b.backward_follows)
      return ex.parallel_rows(
          rows, F, detail::activation_forward_keep_slope_kernel<T, Act>{pre, b.saved.ld(), a, b.work.ld(), F}, grain);
    ex.parallel_rows(rows, F, detail::activation_forward_kernel<T, Act>{pre, b.saved.ld(), a, b.work.ld(), F}, grain);
  }

  template <class T>
  static void gemm1(blas::op ta, blas::op tb, index_t m, index_t n, index_t k, const T* a, index_t lda, const T* b,
                    index_t ldb, T beta, T* c, index_t ldc, blas::precision p) {
    const gemm_problem<T> g{ta, tb, m, n, k, T(1), a, lda, b, ldb, beta, c, ldc, p};
    sequential_executor seq;  // this thread, and its single-threaded BLAS
    if (p == blas::precision::native)
      blas::detail::run_native(g);
    else
      blas::grouped_gemm<sequential_executor, T>(seq, std::span<const gemm_problem<T>>(&g, 1));
  }

  template <class T, class Exec>
  void forward_tiles(Exec& ex, const expert_batch<T>& b, const std::vector<tile>& tiles, matrix_view<T> y) const {
    const index_t H = opt_.hidden, F = opt_.ffn, F1 = f1();
    const auto p = opt_.gemm_inputs;
    run_tasks(ex, tiles, [&](const tile& t) {
      sequential_executor seq;
      auto [w1, b1, w2, b2] = split(b.params[t.expert]);
      T* pre = b.saved.row(t.first);
      T* a = b.work.row(t.first);
      gemm1(blas::op::n, blas::op::n, t.rows, F1, H, b.x.row(t.first), b.x.ld(), w1, F1, T(0), pre, b.saved.ld(), p);
      if (opt_.bias) seq.parallel_rows(t.rows, F1, detail::add_bias_kernel<T>{pre, b.saved.ld(), F1, b1});
      activate(seq, b, t.first, t.rows, 1);
      gemm1(blas::op::n, blas::op::n, t.rows, H, F, a, b.work.ld(), w2, H, T(0), y.row(t.first), y.ld(), p);
      if (opt_.bias) seq.parallel_rows(t.rows, H, detail::add_bias_kernel<T>{y.row(t.first), y.ld(), H, b2});
    });
  }

  template <class T, class Exec>
  void backward_tiles(Exec& ex, const expert_batch<T>& b, const std::vector<tile>& tiles, in_view<T> dy,
                      matrix_view<T> dx) const {
    const index_t H = opt_.hidden, F = opt_.ffn, F1 = f1();
    const auto p = opt_.gemm_inputs;
    // dW2 += a^T dy reads a from work before da overwrites it.
    run_grads(ex, b, dy, /*w2=*/true, /*w1=*/false);
    // da = dy W2^T into work, then work <- dpre.
    run_tasks(ex, tiles, [&](const tile& t) {
      sequential_executor seq;
      T* work = b.work.row(t.first);
      gemm1(blas::op::n, blas::op::t, t.rows, F, H, dy.row(t.first), dy.ld(), split(b.params[t.expert]).w2, H, T(0),
            work, b.work.ld(), p);
      seq.parallel_rows(t.rows, F,
                        detail::times_slope_kernel<T, Act>{b.saved.row(t.first), b.saved.ld(), work, b.work.ld(), F});
    });
    run_grads(ex, b, dy, /*w2=*/false, /*w1=*/true);
    // dx = dpre W1^T (dy is dead by now, so dx may share its memory).
    run_tasks(ex, tiles, [&](const tile& t) {
      gemm1(blas::op::n, blas::op::t, t.rows, H, F1, b.work.row(t.first), b.work.ld(), split(b.params[t.expert]).w1,
            F1, T(0), dx.row(t.first), dx.ld(), p);
    });
  }

  /// dW2 += a^T dy and/or dW1 += x^T dpre (with the bias sums), each a
  /// whole-K GEMM over an expert's rows in blocks of its output, as tasks
  /// largest first; piece -1 of an expert is its bias sums.
  template <class T, class Exec>
  void run_grads(Exec& ex, const expert_batch<T>& b, in_view<T> dy, bool w2, bool w1) const {
    const index_t H = opt_.hidden, F = opt_.ffn, F1 = f1();
    const auto p = opt_.gemm_inputs;
    struct grad_task {
      index_t expert;
      bool w1;
      blas::detail::gemm_cut cut;
      index_t piece;
      double flops;
    };
    std::vector<grad_task> grads;
    for (index_t e = 0; e < b.experts(); ++e) {
      const index_t n = b.rows(e);
      if (n == 0) continue;
      for (bool first : {false, true}) {
        if (!(first ? w1 : w2)) continue;
        const index_t m = first ? H : F, cols = first ? F1 : H;
        const auto cut = blas::detail::cut_of(m, cols, n);
        const double per_piece = 2.0 * static_cast<double>(m) * static_cast<double>(cols) * static_cast<double>(n) /
                                 static_cast<double>(cut.count);
        for (index_t i = 0; i < cut.count; ++i) grads.push_back({e, first, cut, i, per_piece});
      }
      if (opt_.bias && w1) grads.push_back({e, false, {}, -1, 0.0});
    }
    std::stable_sort(grads.begin(), grads.end(),
                     [](const grad_task& u, const grad_task& v) { return u.flops > v.flops; });
    run_tasks(ex, grads, [&](const grad_task& g) {
      const index_t r0 = b.offsets[g.expert], n = b.rows(g.expert);
      auto [gw1, gb1, gw2, gb2] = split(b.grads[g.expert]);
      if (g.piece < 0) {
        sequential_executor seq;
        detail::add_column_sums(seq, dy.row(r0), n, dy.ld(), H, gb2);
        detail::add_column_sums(seq, b.work.row(r0), n, b.work.ld(), F1, gb1);
        return;
      }
      const gemm_problem<T> whole =
          g.w1 ? gemm_problem<T>{blas::op::t, blas::op::n, H, F1, n, T(1), b.x.row(r0), b.x.ld(), b.work.row(r0),
                                 b.work.ld(), T(1), gw1, F1, p}
               : gemm_problem<T>{blas::op::t, blas::op::n, F, H, n, T(1), b.work.row(r0), b.work.ld(), dy.row(r0),
                                 dy.ld(), T(1), gw2, H, p};
      const auto q = blas::detail::piece(whole, g.cut, g.piece);
      gemm1(q.ta, q.tb, q.m, q.n, q.k, q.a, q.lda, q.b, q.ldb, q.beta, q.c, q.ldc, p);
    });
  }

  /// Forward of every local expert, each pass one grouped call.
  template <class T, Executor Exec>
  void forward_grouped(Exec& ex, const expert_batch<T>& b, matrix_view<T> y) const {
    const index_t H = opt_.hidden, F = opt_.ffn, F1 = f1(), E = b.experts();
    std::vector<gemm_problem<T>> probs;
    probs.reserve(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) {
      const index_t r0 = b.offsets[e], n = b.rows(e);
      if (n == 0) continue;
      auto [w1, b1, w2, b2] = split(b.params[e]);
      probs.push_back({blas::op::n, blas::op::n, n, F1, H, T(1), b.x.row(r0), b.x.ld(), w1, F1, T(0),
                       b.saved.row(r0), b.saved.ld()});
    }
    run(ex, probs);
    if (opt_.bias)
      for (index_t e = 0; e < E; ++e)
        ex.parallel_rows(b.rows(e), F1, detail::add_bias_kernel<T>{b.saved.row(b.offsets[e]), b.saved.ld(), F1,
                                                                    split(b.params[e]).b1}, 16);
    activate(ex, b, b.offsets[0], b.offsets[E] - b.offsets[0], 16);
    probs.clear();
    for (index_t e = 0; e < E; ++e) {
      const index_t r0 = b.offsets[e], n = b.rows(e);
      if (n == 0) continue;
      auto [w1, b1, w2, b2] = split(b.params[e]);
      probs.push_back({blas::op::n, blas::op::n, n, H, F, T(1), b.work.row(r0), b.work.ld(), w2, H, T(0),
                       y.row(r0), y.ld()});
    }
    run(ex, probs);
    if (opt_.bias)
      for (index_t e = 0; e < E; ++e)
        ex.parallel_rows(b.rows(e), H,
                         detail::add_bias_kernel<T>{y.row(b.offsets[e]), y.ld(), H, split(b.params[e]).b2}, 16);
  }

  /// Backward of every local expert, each pass one grouped call.
  template <class T, Executor Exec>
  void backward_grouped(Exec& ex, const expert_batch<T>& b, in_view<T> dy, matrix_view<T> dx) const {
    const index_t H = opt_.hidden, F = opt_.ffn, F1 = f1(), E = b.experts();
    std::vector<gemm_problem<T>> probs;
    probs.reserve(static_cast<std::size_t>(E));
    // dW2 += a^T dy reads a from work before da overwrites it.
    for (index_t e = 0; e < E; ++e)
      if (const index_t r0 = b.offsets[e], n = b.rows(e); n > 0)
        probs.push_back({blas::op::t, blas::op::n, F, H, n, T(1), b.work.row(r0), b.work.ld(), dy.row(r0), dy.ld(),
                         T(1), split(b.grads[e]).w2, H});
    run(ex, probs);
    // da = dy W2^T into work.
    probs.clear();
    for (index_t e = 0; e < E; ++e) {
      const index_t r0 = b.offsets[e], n = b.rows(e);
      if (n == 0) continue;
      auto [w1, b1, w2, b2] = split(b.params[e]);
      probs.push_back({blas::op::n, blas::op::t, n, F, H, T(1), dy.row(r0), dy.ld(), w2, H, T(0), b.work.row(r0),
                       b.work.ld()});
    }
    run(ex, probs);
    // work <- dpre, from da and the kept factors.
    const index_t first = b.offsets[0], R = b.offsets[E] - first;
    ex.parallel_rows(
        R, F, detail::times_slope_kernel<T, Act>{b.saved.row(first), b.saved.ld(), b.work.row(first), b.work.ld(), F},
        16);
    // dW1 += x^T dpre.
    probs.clear();
    for (index_t e = 0; e < E; ++e) {
      const index_t r0 = b.offsets[e], n = b.rows(e);
      if (n == 0) continue;
      auto [gw1, gb1, gw2, gb2] = split(b.grads[e]);
      probs.push_back({blas::op::t, blas::op::n, H, F1, n, T(1), b.x.row(r0), b.x.ld(), b.work.row(r0), b.work.ld(),
                       T(1), gw1, F1});
      if (opt_.bias) {
        detail::add_column_sums(ex, dy.row(r0), n, dy.ld(), H, gb2);
        detail::add_column_sums(ex, b.work.row(r0), n, b.work.ld(), F1, gb1);
      }
    }
    run(ex, probs);
    // dx = dpre W1^T (dy is dead by now, so dx may share its memory).
    probs.clear();
    for (index_t e = 0; e < E; ++e) {
      const index_t r0 = b.offsets[e], n = b.rows(e);
      if (n == 0) continue;
      auto [w1, b1, w2, b2] = split(b.params[e]);
      probs.push_back({blas::op::n, blas::op::t, n, H, F1, T(1), b.work.row(r0), b.work.ld(), w1, F1, T(0),
                       dx.row(r0), dx.ld()});
    }
    run(ex, probs);
  }

  template <class P>
  struct parts {
    P w1, b1, w2, b2;
  };
  template <class P>
  parts<P> split(P block) const {
    const index_t H = opt_.hidden, F = opt_.ffn, F1 = f1();
    P w1 = block;
    P w2 = w1 + H * F1;
    P b1 = opt_.bias ? w2 + F * H : nullptr;
    P b2 = opt_.bias ? b1 + F1 : nullptr;
    return {w1, b1, w2, b2};
  }

  /// The problems at this expert's precision, as one grouped call.
  template <class T, Executor Exec>
  void run(Exec& ex, std::vector<gemm_problem<T>>& probs) const {
    for (auto& p : probs) p.inputs = opt_.gemm_inputs;
    grouped_gemm<T>(ex, probs);
  }

  template <class T, class M>
  void check(const expert_batch<T>& b, const M& out, const char* what) const {
    const index_t R = b.offsets.empty() ? 0 : b.offsets.back();
    SEMOE_CHECK(b.x.cols() == opt_.hidden && out.cols() == opt_.hidden, "semoe::expert::ffn::", what,
                ": rows must have hidden = ", opt_.hidden, " columns, got ", b.x.cols(), " and ", out.cols());
    SEMOE_CHECK(b.x.rows() >= R && out.rows() >= R && b.saved.rows() >= R && b.work.rows() >= R,
                "semoe::expert::ffn::", what, ": buffers hold fewer than the ", R, " routed rows");
    SEMOE_CHECK(b.saved.cols() >= saved_cols() && b.work.cols() >= work_cols(), "semoe::expert::ffn::", what,
                ": saved/work need ", saved_cols(), " columns");
  }

  options opt_{};
};

static_assert(Expert<ffn<act::gelu>> && Expert<ffn<act::swiglu>> && Expert<ffn<act::relu>>);

}  // namespace semoe::expert
