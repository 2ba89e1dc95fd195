// semoe/gate/with_prior.hpp: a gate whose tokens prefer some experts. The
// router logits get log(prior_e) added before gate G routes them, so G's
// softmax probabilities are proportional to prior_e * exp(logit_e): the
// routing of a model whose load is skewed, for placement experiments and
// benchmarks (zipf_prior(E, 1.2): expert 0 draws about 2.3x its even share
// of 8). The shift is a constant, so the gradient with respect to the logits
// is G's gradient at the shifted logits: training stays exact.
#pragma once

#include <cmath>
#include <span>
#include <type_traits>
#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/gate/concepts.hpp"
#include "semoe/gate/routing.hpp"

namespace semoe::gate {

/// p_e proportional to 1 / (e + 1)^s, summing to 1.
inline std::vector<double> zipf_prior(index_t experts, double s) {
  SEMOE_CHECK(experts > 0, "semoe::gate::zipf_prior: experts = ", experts, ": expected > 0");
  SEMOE_CHECK(std::isfinite(s) && s >= 0, "semoe::gate::zipf_prior: s = ", s, ": expected a finite value >= 0");
  std::vector<double> p(static_cast<std::size_t>(experts));
  double sum = 0;
  for (index_t e = 0; e < experts; ++e) sum += p[static_cast<std::size_t>(e)] = std::pow(double(e + 1), -s);
  for (auto& v : p) v /= sum;
  return p;
}

template <class G>
class with_prior {
 public:
  using policy_kind = gate_tag;
  struct options {
    typename G::options gate{};
    std::vector<double> prior;  ///< per expert, > 0 (need not sum to 1)
  };
  static void validate(const options& o) {
    G::validate(o.gate);
    SEMOE_CHECK(!o.prior.empty(), "semoe::gate::with_prior: options.prior is empty: expected one value per expert");
    for (std::size_t e = 0; e < o.prior.size(); ++e)
      SEMOE_CHECK(std::isfinite(o.prior[e]) && o.prior[e] > 0, "semoe::gate::with_prior: options.prior[", e,
                  "] = ", o.prior[e], ": expected a finite value > 0");
  }
  explicit with_prior(const options& o) : g_(o.gate) {
    validate(o);
    log_prior_.reserve(o.prior.size());
    for (double p : o.prior) log_prior_.push_back(std::log(p));
  }

  index_t choices(index_t experts) const {
    SEMOE_CHECK(static_cast<std::size_t>(experts) == log_prior_.size(), "semoe::gate::with_prior: ",
                log_prior_.size(), " prior values for ", experts, " experts");
    return g_.choices(experts);
  }

  template <class T>
  void route(const route_context& ctx, matrix_view<const T> logits, routing_plan<T>& plan) {
    g_.route(ctx, shift(logits), plan);
  }
  template <class T>
  void backward(const route_context& ctx, matrix_view<const T> logits, const routing_plan<T>& plan,
                std::span<const T> dweight, matrix_view<T> dlogits) const {
    g_.backward(ctx, shifted<T>(logits.rows(), logits.cols()), plan, dweight, dlogits);
  }
  void end_step(const route_context& ctx)
    requires stepped_gate<G>
  {
    g_.end_step(ctx);
  }

  G& inner() { return g_; }
  const G& inner() const { return g_; }

 private:
  template <class T>
  matrix_view<const T> shift(matrix_view<const T> logits) {
    const index_t n = logits.rows(), E = logits.cols();
    auto& b = scratch<T>();
    b.resize_discard(n * E);
    for (index_t t = 0; t < n; ++t)
      for (index_t e = 0; e < E; ++e) b[t * E + e] = logits(t, e) + static_cast<T>(log_prior_[static_cast<std::size_t>(e)]);
    return shifted<T>(n, E);
  }
  template <class T>
  matrix_view<const T> shifted(index_t n, index_t E) const {
    return as_matrix<const T>(scratch<T>().data(), n, E);
  }
  template <class T>
  buffer<T>& scratch() {
    if constexpr (std::is_same_v<T, float>)
      return f_;
    else
      return d_;
  }
  template <class T>
  const buffer<T>& scratch() const {
    if constexpr (std::is_same_v<T, float>)
      return f_;
    else
      return d_;
  }

  G g_;
  std::vector<double> log_prior_;
  buffer<float> f_;  // the last routed batch's shifted logits, for backward
  buffer<double> d_;
};

}  // namespace semoe::gate
