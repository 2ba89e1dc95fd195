#include "semoe/layer/sequential.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "semoe/layer/activation.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/norm.hpp"

using semoe::index_t;
using semoe::matrix;
using semoe::matrix_view;
using namespace semoe::layer;
namespace act = semoe::act;

namespace {

/// A parameter-free identity with the optional members, to see that the
/// containers forward them.
struct probe {
  using policy_kind = module_tag;
  using value_type = double;
  double aux = 0;
  bool training = true;
  int steps = 0;
  index_t output_cols(index_t c) const { return c; }
  void forward(matrix_view<const double> x, matrix_view<double> y) {
    for (index_t i = 0; i < x.rows(); ++i)
      for (index_t j = 0; j < x.cols(); ++j) y(i, j) = x(i, j);
  }
  void backward(matrix_view<const double> dy, matrix_view<double> dx) {
    for (index_t i = 0; i < dx.rows(); ++i)
      for (index_t j = 0; j < dx.cols(); ++j) dx(i, j) = dy(i, j);
  }
  semoe::param_list<double> parameters() { return {}; }
  void zero_grad() {}
  double aux_loss() const { return aux; }
  void train(bool on) { training = on; }
  void end_step() { ++steps; }
};

struct no_backward {
  using policy_kind = module_tag;
  using value_type = double;
  index_t output_cols(index_t c) const { return c; }
  void forward(matrix_view<const double>, matrix_view<double>) {}
  semoe::param_list<double> parameters() { return {}; }
  void zero_grad() {}
};

struct untagged : probe {
  using policy_kind = int;
};

std::vector<std::string> names(const semoe::param_list<double>& ps) {
  std::vector<std::string> v;
  for (const auto& p : ps) v.push_back(p.name);
  return v;
}

}  // namespace

// The concept both ways: conforming types pass, broken ones are rejected.
static_assert(Module<probe>);
static_assert(!Module<no_backward>);
static_assert(!Module<untagged>);
static_assert(Module<sequential<float, linear<float>, activation<float, act::gelu>>>);
static_assert(Module<residual<double, layer_norm<double>, linear<double>>>);

TEST_CASE("sequential: a 3-layer stack has the right names and gradients (double)") {
  semoe::cpu_executor ex({.threads = 2});
  linear<double> l1(ex, {.in = 4, .out = 6}, 1);
  activation<double, act::gelu> a1(ex);
  linear<double> l2(ex, {.in = 6, .out = 3}, 2);
  sequential<double, linear<double>, activation<double, act::gelu>, linear<double>> net(std::move(l1), std::move(a1),
                                                                                       std::move(l2));
  CHECK(net.output_cols(4) == 3);
  const auto ps = net.parameters();
  CHECK(names(ps) == std::vector<std::string>{"0.weight", "0.bias", "2.weight", "2.bias"});
  std::size_t count = 0;
  for (const auto& p : ps) count += p.value.size();
  CHECK(count == 4 * 6 + 6 + 6 * 3 + 3);
  CHECK(net.get<2>().opts().out == 3);
  int layers = 0;
  net.for_each_layer([&](auto&) { ++layers; });
  CHECK(layers == 3);
  semoe::test::check_gradients(net, 5, 4, 51);
}

TEST_CASE("sequential: forward(x) keeps its buffers and matches forward(x, y)") {
  semoe::cpu_executor ex({.threads = 1});
  sequential net(linear<double>(ex, {.in = 3, .out = 5}, 1), activation<double, act::relu>(ex),
                 linear<double>(ex, {.in = 5, .out = 2}, 2));  // deduced: sequential<double, ...>
  static_assert(std::is_same_v<decltype(net)::value_type, double>);
  matrix<double> x(4, 3), y(4, 2);
  semoe::test::fill_uniform(x.span(), 3);
  const auto out1 = net.forward(x.view());
  const auto out2 = net.forward(x.view());
  CHECK(out1.data() == out2.data());  // same shape: no reallocation
  net.forward(x.view(), y.view());
  for (index_t i = 0; i < 4; ++i)
    for (index_t j = 0; j < 2; ++j) CHECK(y(i, j) == out2(i, j));
  // The default dx: parameter gradients only.
  matrix<double> dy(4, 2);
  dy.fill(1);
  net.zero_grad();
  net.backward(dy.view());
  CHECK(net.get<2>().bias_grad()[0] == doctest::Approx(4.0));
}

TEST_CASE("residual and nesting: gradients, names and optional members") {
  semoe::cpu_executor ex({.threads = 2});
  using block_t = residual<double, layer_norm<double>, linear<double>, activation<double, act::silu>>;
  block_t block(ex, layer_norm<double>(ex, {.dim = 4}), linear<double>(ex, {.in = 4, .out = 4}, 3),
                activation<double, act::silu>(ex));
  CHECK_THROWS_WITH_AS(block.output_cols(5), doctest::Contains("expected options.dim = 4"), semoe::error);

  SUBCASE("a residual block alone") { semoe::test::check_gradients(block, 3, 4, 61); }

  SUBCASE("linear -> residual block -> probe -> layer_norm") {
    probe pr;
    pr.aux = 0.25;
    sequential<double, linear<double>, block_t, probe, layer_norm<double>> net(
        linear<double>(ex, {.in = 3, .out = 4}, 4), std::move(block), pr, layer_norm<double>(ex, {.dim = 4}));
    CHECK(names(net.parameters()) == std::vector<std::string>{"0.weight", "0.bias", "1.0.weight", "1.0.bias",
                                                              "1.1.weight", "1.1.bias", "3.weight", "3.bias"});
    semoe::test::check_gradients(net, 4, 3, 62);

    CHECK(net.aux_loss() == 0.25);
    CHECK(aux_loss_of(net) == 0.25);
    net.train(false);
    CHECK_FALSE(net.get<2>().training);
    end_step_of(net);
    end_step_of(net);
    CHECK(net.get<2>().steps == 2);
  }
}

TEST_CASE("residual: the body must keep the width") {
  semoe::cpu_executor ex({.threads = 1});
  residual<double, linear<double>> r(ex, linear<double>(ex, {.in = 4, .out = 3}, 1));
  CHECK_THROWS_WITH_AS(r.output_cols(4), doctest::Contains("maps 4 columns to 3"), semoe::error);
}

TEST_CASE("sequential: bad shapes are errors before any layer runs") {
  semoe::cpu_executor ex({.threads = 1});
  sequential net(linear<float>(ex, {.in = 3, .out = 5}, 1), linear<float>(ex, {.in = 4, .out = 2}, 2));
  matrix<float> x(2, 3), y(2, 2), dy(2, 3), dx(2, 4);
  CHECK_THROWS_WITH_AS(net.forward(x.view()), doctest::Contains("layer 1: semoe::layer::linear: input has 5 columns; expected options.in = 4"),
                       semoe::error);
  sequential ok(linear<float>(ex, {.in = 3, .out = 2}, 1));
  CHECK_THROWS_WITH_AS(ok.backward(y.view()), doctest::Contains("called before forward"), semoe::error);
  ok.forward(x.view(), y.view());
  CHECK_THROWS_WITH_AS(ok.backward(dy.view()), doctest::Contains("sequential::backward: dy"), semoe::error);
  CHECK_THROWS_WITH_AS(ok.backward(y.view(), dx.view()), doctest::Contains("sequential::backward: dx"),
                       semoe::error);
  matrix<float> y3(2, 3);
  CHECK_THROWS_WITH_AS(ok.forward(x.view(), y3.view()), doctest::Contains("sequential::forward: y"), semoe::error);
}
