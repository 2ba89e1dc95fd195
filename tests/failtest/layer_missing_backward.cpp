// expect: every layer must provide backward
// A layer without backward(dy, dx) cannot go into a sequential: the fix-it
// sentence of layer/concepts.hpp names the missing member.
#include "semoe/layer/linear.hpp"
#include "semoe/layer/sequential.hpp"

struct forward_only {
  using policy_kind = semoe::layer::module_tag;
  using value_type = float;
  semoe::index_t output_cols(semoe::index_t c) const { return c; }
  void forward(semoe::matrix_view<const float>, semoe::matrix_view<float>) {}
  semoe::param_list<float> parameters() { return {}; }
  void zero_grad() {}
};

int main() {
  semoe::cpu_executor ex;
  semoe::layer::sequential<float, semoe::layer::linear<float>, forward_only> net(
      semoe::layer::linear<float>(ex, {.in = 2, .out = 2}, 1), forward_only{});
  (void)net;
}
