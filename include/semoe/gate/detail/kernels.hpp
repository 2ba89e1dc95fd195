// semoe/gate/detail/kernels.hpp: the bodies of routing, one functor each,
// run by every executor: a loop on the host, a kernel on a device. The host
// gates call the same functors through a sequential executor, so a plan built
// on a GPU is the plan the cpu builds, bit for bit: sums run in a fixed order
// in double, counts are integer atomics, and ties break by index.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "semoe/core/config.hpp"
#include "semoe/core/executor.hpp"

namespace semoe::gate::detail {

/// False for NaN and +-Inf (x - x is NaN exactly then); callable on a device.
template <class T>
SEMOE_HD inline bool finite(T x) {
  return x - x == x - x;
}

/// An order-preserving map of a float to unsigned: a < b iff key(a) < key(b).
SEMOE_HD inline std::uint32_t float_order_key(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/// p = softmax(x[0, n)); returns the row's log-sum-exp (the z-loss needs
/// it). exp, the sum and the scaling run in double, so float routers round
/// once per value and host and device libraries agree.
template <class T>
SEMOE_HD T softmax_row(const T* x, index_t n, T* p) {
  T mx = x[0];
  for (index_t e = 1; e < n; ++e) mx = x[e] > mx ? x[e] : mx;
  double sum = 0;
  for (index_t e = 0; e < n; ++e) sum += ::exp(static_cast<double>(x[e]) - static_cast<double>(mx));
  const double inv = 1.0 / sum;
  for (index_t e = 0; e < n; ++e)
    p[e] = static_cast<T>(::exp(static_cast<double>(x[e]) - static_cast<double>(mx)) * inv);
  return static_cast<T>(static_cast<double>(mx) + ::log(sum));
}

/// Indices of the k largest of score(0 .. n), largest first. Equal values
/// keep the lower index first, so routing never depends on sort stability.
template <class Score>
SEMOE_HD void top_k_by(const Score& score, index_t n, index_t k, std::int32_t* out) {
  index_t m = 0;  // filled so far
  for (index_t e = 0; e < n; ++e) {
    const auto s = score(e);
    index_t pos = m;
    while (pos > 0 && score(out[pos - 1]) < s) --pos;
    if (pos >= k) continue;
    for (index_t j = (m < k - 1 ? m : k - 1); j > pos; --j) out[j] = out[j - 1];
    out[pos] = static_cast<std::int32_t>(e);
    m = m + 1 < k ? m + 1 : k;
  }
}

/// Any non-finite logit sets *flag (row t).
template <class T>
struct nonfinite_kernel {
  const T* x;
  index_t ld, cols;
  std::uint32_t* flag;
  SEMOE_HD void operator()(index_t t) const {
    for (index_t e = 0; e < cols; ++e)
      if (!finite(x[t * ld + e])) atomic_max(flag, 1u);
  }
};

/// probs[t, :] = softmax(logits[t, :]), lse[t] = its log-sum-exp.
template <class T>
struct softmax_kernel {
  const T* logits;
  index_t ld, experts;
  T* probs;
  T* lse;
  SEMOE_HD void operator()(index_t t) const { lse[t] = softmax_row(logits + t * ld, experts, probs + t * experts); }
};

/// Top-k of probs + bias per token (bias: aux-free balancing; selection only);
/// weights are the unbiased probs, over their sum when `normalize`.
template <class T>
struct top_k_select_kernel {
  const T* probs;
  index_t experts, k;
  const double* bias;  // [experts] or null
  bool normalize;
  std::int32_t* expert;
  T* weight;
  float* score;
  SEMOE_HD void operator()(index_t t) const {
    const T* p = probs + t * experts;
    std::int32_t* sel = expert + t * k;
    const double* b = bias;
    top_k_by([p, b](index_t e) { return static_cast<double>(p[e]) + (b ? b[e] : 0.0); }, experts, k, sel);
    double sum = 0;
    for (index_t c = 0; c < k; ++c) sum += static_cast<double>(p[sel[c]]);
    for (index_t c = 0; c < k; ++c) {
      const T pe = p[sel[c]];
      weight[t * k + c] = normalize ? static_cast<T>(static_cast<double>(pe) / sum) : pe;
      score[t * k + c] = static_cast<float>(pe);
    }
  }
};

/// counts[E + e] += routed choices of expert e; counts[e] += those among the
/// first `counted` choices of their token (GShard counts first choices only).
struct choice_count_kernel {
  const std::int32_t* expert;
  index_t k, experts, counted;
  std::uint64_t* counts;  // [2 * experts], zeroed
  SEMOE_HD void operator()(index_t a) const {
    const std::int32_t e = expert[a];
    if (e < 0) return;
    atomic_add(counts + experts + e, 1);
    if (a % k < counted) atomic_add(counts + e, 1);
  }
};

/// choice_count_kernel over assignments [0, A) into counts (zeroed). A host
/// executor tallies each chunk of 4096 assignments apart and adds the tallies
/// under a lock: an atomic add per choice on a few shared cache lines makes
/// threads wait on each other. Integer sums: the same counts either way.
template <Executor Exec>
void count_choices(Exec& ex, const std::int32_t* expert, index_t A, index_t k, index_t experts, index_t counted,
                   std::uint64_t* counts) {
  if constexpr (ChunkedExecutor<Exec> && !Exec::on_device) {
    std::mutex m;
    ex.parallel_chunks(A, 4096, [&](index_t first, index_t last) {
      std::vector<std::uint64_t> mine(static_cast<std::size_t>(2 * experts), 0);  // choice_count_kernel's tally
      for (index_t a = first; a < last; ++a) {
        const std::int32_t e = expert[a];
        if (e < 0) continue;
        ++mine[static_cast<std::size_t>(experts + e)];
        if (a % k < counted) ++mine[static_cast<std::size_t>(e)];
      }
      std::lock_guard lock(m);
      for (index_t i = 0; i < 2 * experts; ++i) counts[i] += mine[static_cast<std::size_t>(i)];
    });
  } else {
    ex.parallel_for(A, choice_count_kernel{expert, k, experts, counted, counts});
  }
}

/// The capacity order of every routed assignment: smaller keys are kept
/// first. Low 32 bits: the GShard position (choice-major, then global token),
/// which also breaks ties; high 32 bits: the inverted score under
/// drop_policy::probability. Unrouted choices get ~0.
struct capacity_key_kernel {
  const std::int32_t* expert;
  const float* score;
  index_t k;
  std::uint64_t global_tokens, token_offset;
  bool by_probability;
  std::uint64_t* key;
  SEMOE_HD void operator()(index_t a) const {
    if (expert[a] < 0) {
      key[a] = ~std::uint64_t{0};
      return;
    }
    const auto t = static_cast<std::uint64_t>(a / k), c = static_cast<std::uint64_t>(a % k);
    const std::uint64_t pos = c * global_tokens + token_offset + t;
    const std::uint64_t hi = by_probability ? std::uint64_t{~float_order_key(score[a])} : 0;
    key[a] = (hi << 32) | pos;
  }
};

/// One round of the capacity radix select: the histogram of the 8-bit digit
/// at `shift` of the keys of limited experts that match the prefix so far.
struct digit_histogram_kernel {
  const std::int32_t* expert;
  const std::uint64_t* key;
  const std::uint8_t* limited;  // [experts]
  const std::uint64_t* prefix;  // [experts]
  int shift;
  std::uint64_t high_mask;
  std::uint64_t* hist;  // [experts * 256], zeroed
  SEMOE_HD void operator()(index_t a) const {
    const std::int32_t e = expert[a];
    if (e < 0 || !limited[e]) return;
    const std::uint64_t kk = key[a];
    if ((kk & high_mask) != prefix[e]) return;
    atomic_add(hist + static_cast<index_t>(e) * 256 + static_cast<index_t>((kk >> shift) & 0xff), 1);
  }
};

/// kept[a] = the expert of a kept assignment, `experts` otherwise (so a
/// histogram over [0, experts) counts kept rows and a sort puts the rest
/// last); order[a] = a, the values the sort carries.
struct keep_kernel {
  const std::int32_t* expert;
  const std::uint64_t* key;
  const std::uint64_t* threshold;  // [experts] largest kept key
  index_t experts;
  std::uint32_t* kept;
  std::int32_t* order;
  SEMOE_HD void operator()(index_t a) const {
    const std::int32_t e = expert[a];
    kept[a] = e >= 0 && key[a] <= threshold[e] ? static_cast<std::uint32_t>(e) : static_cast<std::uint32_t>(experts);
    order[a] = static_cast<std::int32_t>(a);
  }
};

/// After the stable sort by kept expert, position i is dispatch row i: the
/// slot of assignment order[i] is i minus its expert's offset.
struct slot_kernel {
  const std::uint32_t* kept;   // sorted
  const std::int32_t* order;   // sorted
  const std::int32_t* offsets; // [experts + 1]
  index_t experts;
  std::int32_t* slot;
  SEMOE_HD void operator()(index_t i) const {
    const std::uint32_t e = kept[i];
    slot[order[i]] = e < static_cast<std::uint32_t>(experts) ? static_cast<std::int32_t>(i - offsets[e]) : -1;
  }
};

/// Sums over tokens in token order, in double: red[j] = sum_t probs[t, j]
/// for j < experts, red[experts] = sum_t lse[t]^2.
template <class T>
struct router_sums_kernel {
  const T* probs;
  const T* lse;
  index_t tokens, experts;
  double* red;  // [experts + 1]
  SEMOE_HD void operator()(index_t j) const {
    double s = 0;
    if (j < experts) {
      for (index_t t = 0; t < tokens; ++t) s += static_cast<double>(probs[t * experts + j]);
    } else {
      for (index_t t = 0; t < tokens; ++t) s += static_cast<double>(lse[t]) * static_cast<double>(lse[t]);
    }
    red[j] = s;
  }
};

/// dlogits[t, :] = gradient of sum_c dweight * weight + aux losses through
/// the router softmax, for the top-k selection `selected(a)` (also the
/// choices the gate then did not route: GShard's second expert still
/// normalizes the first; their dweight is ignored). saved: dL/dp of the
/// balance loss [experts], the z-loss factor, then lse per token.
template <class T, class Selected>
struct top_k_backward_kernel {
  const T* probs;
  const T* saved;
  const std::int32_t* expert;  // routed or not (< 0)
  Selected selected;
  const T* dweight;
  index_t experts, k;
  bool normalize;
  T* dlogits;
  index_t ld;

  SEMOE_HD double g(index_t a) const { return expert[a] >= 0 ? static_cast<double>(dweight[a]) : 0.0; }

  /// dL/dp[t, e] from the selection, then the balance term, in that order.
  SEMOE_HD T dp(index_t t, index_t e, double sum, double gw) const {
    T acc = T(0);
    for (index_t c = 0; c < k; ++c) {
      const index_t a = t * k + c;
      if (selected(a) != e) continue;
      acc += normalize ? static_cast<T>((g(a) - gw) / sum) : static_cast<T>(g(a));
    }
    return acc + saved[e];
  }

  SEMOE_HD void operator()(index_t t) const {
    const T* p = probs + t * experts;
    double sum = 0, gw = 0;
    if (normalize) {  // w_c = p_c / S  =>  dL/dp_c = (g_c - sum_j g_j w_j) / S; S over the selected (>= 0)
      for (index_t c = 0; c < k; ++c)
        if (selected(t * k + c) >= 0) sum += static_cast<double>(p[selected(t * k + c)]);
      for (index_t c = 0; c < k; ++c)
        if (selected(t * k + c) >= 0) gw += g(t * k + c) * static_cast<double>(p[selected(t * k + c)]) / sum;
    }
    double dot = 0;
    for (index_t e = 0; e < experts; ++e) dot += static_cast<double>(p[e]) * static_cast<double>(dp(t, e, sum, gw));
    const double zt = static_cast<double>(saved[experts]) * static_cast<double>(saved[experts + 1 + t]);
    T* out = dlogits + t * ld;
    for (index_t e = 0; e < experts; ++e)
      out[e] = T(0) + static_cast<T>(static_cast<double>(p[e]) * (static_cast<double>(dp(t, e, sum, gw)) - dot + zt));
  }
};

/// The selection of top_k and switch: the expert each choice names.
struct selected_expert {
  const std::int32_t* expert;
  SEMOE_HD std::int32_t operator()(index_t a) const { return expert[a]; }
};

/// The selection after re-normalizing over kept choices: the expert of a
/// choice capacity kept, -1 for one it dropped.
struct kept_expert {
  const std::int32_t* expert;
  const std::int32_t* slot;
  SEMOE_HD std::int32_t operator()(index_t a) const { return slot[a] >= 0 ? expert[a] : -1; }
};

/// DeepSpeed's re-normalization after drops: each token's kept weights
/// become p / (sum of p over its kept choices); weights of dropped choices
/// are left as they are (nothing combines them). A token with nothing kept
/// keeps its weights too.
template <class T>
struct renormalize_kept_kernel {
  const T* probs;
  const std::int32_t* expert;
  const std::int32_t* slot;
  index_t experts, k;
  T* weight;
  SEMOE_HD void operator()(index_t t) const {
    double sum = 0;
    for (index_t c = 0; c < k; ++c)
      if (slot[t * k + c] >= 0) sum += static_cast<double>(probs[t * experts + expert[t * k + c]]);
    if (sum <= 0) return;
    for (index_t c = 0; c < k; ++c)
      if (slot[t * k + c] >= 0)
        weight[t * k + c] = static_cast<T>(static_cast<double>(probs[t * experts + expert[t * k + c]]) / sum);
  }
};

}  // namespace semoe::gate::detail
