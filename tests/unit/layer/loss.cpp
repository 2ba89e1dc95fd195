#include "semoe/layer/loss.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "gradcheck.hpp"

using semoe::index_t;
using semoe::matrix;
using semoe::layer::softmax_cross_entropy;

namespace {
/// The textbook loss: the sum over rows of -sum_j q_j log softmax_j, divided by batch.
double reference_loss(const matrix<double>& z, const std::vector<std::int32_t>& y, double s, double batch) {
  double total = 0;
  const index_t c = z.cols();
  for (index_t i = 0; i < z.rows(); ++i) {
    double m = -1e300, sum = 0;
    for (index_t j = 0; j < c; ++j) m = std::max(m, z(i, j));
    for (index_t j = 0; j < c; ++j) sum += std::exp(z(i, j) - m);
    for (index_t j = 0; j < c; ++j) {
      const double q = (j == y[i] ? 1 - s : 0) + s / double(c);
      total -= q * (z(i, j) - m - std::log(sum));
    }
  }
  return total / batch;
}
}  // namespace

TEST_CASE("softmax_cross_entropy: value and gradient match a reference and finite differences") {
  semoe::cpu_executor ex({.threads = 2});
  const index_t n = 7, c = 5;
  matrix<double> z(n, c), dz(n, c);
  semoe::test::fill_uniform(z.span(), 1, -3, 3);
  const std::vector<std::int32_t> y{0, 4, 2, 2, 1, 3, 4};
  for (double s : {0.0, 0.1}) {
    CAPTURE(s);
    softmax_cross_entropy<double> ce(ex, {.label_smoothing = s});
    const double batch = 10;  // larger than the local rows, as on one of several ranks
    const double loss = ce.forward(z.view(), y, 10);
    CHECK(loss == doctest::Approx(reference_loss(z, y, s, batch)).epsilon(1e-12));
    ce.backward(dz.view());
    std::vector<double> fd(static_cast<std::size_t>(n * c));
    for (index_t k = 0; k < n * c; ++k)
      fd[k] = semoe::test::central_difference(z.span()[k], [&] { return ce.forward(z.view(), y, 10); });
    CHECK(semoe::test::max_rel_err(dz.span(), std::span<double>(fd)) < 1e-6);
  }
}

TEST_CASE("softmax_cross_entropy: label smoothing changes the target as specified") {
  semoe::cpu_executor ex({.threads = 1});
  // Equal logits: softmax is uniform, so the smoothed loss is log C either way
  // and the gradient is (1/C - q) / batch.
  matrix<double> z(1, 4), dz(1, 4);
  z.fill(0.5);
  const std::vector<std::int32_t> y{2};
  softmax_cross_entropy<double> ce(ex, {.label_smoothing = 0.2});
  CHECK(ce.forward(z.view(), y, 1) == doctest::Approx(std::log(4.0)));
  ce.backward(dz.view());
  CHECK(dz(0, 2) == doctest::Approx(0.25 - (0.8 + 0.05)));
  CHECK(dz(0, 0) == doctest::Approx(0.25 - 0.05));
  // Peaked logits on the label: smoothing makes the loss larger than without.
  z(0, 2) = 10;
  softmax_cross_entropy<double> plain(ex);
  CHECK(ce.forward(z.view(), y, 1) > plain.forward(z.view(), y, 1) + 0.1);
}

TEST_CASE_TEMPLATE("softmax_cross_entropy: shards with the global batch add up to the whole", T, float, double) {
  semoe::cpu_executor ex({.threads = 2});
  const index_t n = 64, c = 10;
  matrix<T> z(n, c), dz(n, c), dz_a(n / 2, c), dz_b(n / 2, c);
  semoe::test::fill_uniform(z.span(), 5, -4, 4);
  std::vector<std::int32_t> y(n);
  for (index_t i = 0; i < n; ++i) y[i] = static_cast<std::int32_t>((i * 3) % c);
  softmax_cross_entropy<T> whole(ex), a(ex), b(ex);
  const T l = whole.forward(z.view(), y, n);
  whole.backward(dz.view());
  const std::span<const std::int32_t> ys(y);
  const T la = a.forward(z.view().row_slice(0, n / 2), ys.subspan(0, n / 2), n);
  const T lb = b.forward(z.view().row_slice(n / 2, n), ys.subspan(n / 2), n);
  a.backward(dz_a.view());
  b.backward(dz_b.view());
  CHECK(la + lb == doctest::Approx(l).epsilon(1e-5));
  for (index_t j = 0; j < c; ++j) {
    CHECK(dz_a(3, j) == doctest::Approx(dz(3, j)));
    CHECK(dz_b(5, j) == doctest::Approx(dz(n / 2 + 5, j)));
  }
  // Twice the global batch: half the loss and half the gradient.
  CHECK(whole.forward(z.view(), y, 2 * n) == doctest::Approx(l / 2).epsilon(1e-5));
  matrix<T> dz2(n, c);
  whole.backward(dz2.view());
  CHECK(dz2(7, 3) == doctest::Approx(dz(7, 3) / 2));
}

TEST_CASE("softmax_cross_entropy: bad labels and shapes are errors") {
  semoe::cpu_executor ex({.threads = 1});
  softmax_cross_entropy<float> ce(ex);
  matrix<float> z(3, 4), dz(3, 5);
  z.fill(0);
  const std::vector<std::int32_t> bad{0, 4, 1}, neg{0, 1, -2}, ok{0, 1, 2}, short_labels{0, 1};
  CHECK_THROWS_WITH_AS(ce.forward(z.view(), bad, 3), doctest::Contains("labels[1] = 4 is out of range"), semoe::error);
  CHECK_THROWS_WITH_AS(ce.forward(z.view(), neg, 3), doctest::Contains("labels[2] = -2 is out of range"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(ce.forward(z.view(), short_labels, 3), doctest::Contains("labels has 2 entries"),
                       semoe::error);
  CHECK_THROWS_WITH_AS(ce.forward(z.view(), ok, 2), doctest::Contains("global_batch = 2"), semoe::error);
  CHECK_THROWS_WITH_AS(ce.backward(dz.view()), doctest::Contains("called before forward"), semoe::error);
  ce.forward(z.view(), ok, 3);
  CHECK_THROWS_WITH_AS(ce.backward(dz.view()), doctest::Contains("backward: dlogits"), semoe::error);
  CHECK_THROWS_WITH_AS(softmax_cross_entropy<float>(ex, {.label_smoothing = 1.5}),
                       doctest::Contains("label_smoothing = 1.5"), semoe::error);
  // An empty batch is a zero loss, not a division by zero.
  matrix<float> z0(0, 4);
  CHECK(ce.forward(z0.view(), std::span<const std::int32_t>{}, 1) == 0);
}

TEST_CASE("argmax_rows and accuracy") {
  matrix<float> z(3, 3);
  z.fill(0);
  z(0, 2) = 1;
  z(1, 0) = 2;
  z(2, 1) = std::numeric_limits<float>::quiet_NaN();  // NaN never wins
  z(2, 2) = 0.5;
  std::vector<std::int32_t> am(3);
  semoe::layer::argmax_rows(z.view(), std::span<std::int32_t>(am));
  CHECK(am == std::vector<std::int32_t>{2, 0, 2});
  const std::vector<std::int32_t> labels{2, 1, 2};
  CHECK(semoe::layer::count_correct(z.view(), labels) == 2);
  CHECK(semoe::layer::accuracy(z.view(), labels) == doctest::Approx(2.0 / 3));
}
