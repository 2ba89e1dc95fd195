// expect: Gate must provide backward
// A gate without backward() is rejected with one readable sentence.
#include <span>

#include "semoe/gate/concepts.hpp"

struct no_backward {
  using policy_kind = semoe::gate::gate_tag;
  struct options {};
  no_backward() = default;
  explicit no_backward(options) {}
  semoe::index_t choices(semoe::index_t) const { return 1; }
  template <class T>
  void route(const semoe::gate::route_context&, semoe::matrix_view<const T>, semoe::gate::routing_plan<T>&) {}
};

static_assert(semoe::gate::check_gate<no_backward>());

int main() {}
