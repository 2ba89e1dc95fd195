// expect: Gate must declare `using policy_kind
// A type with the right members is still not a gate unless it opts in.
#include <span>

#include "semoe/gate/concepts.hpp"

struct untagged {
  struct options {};
  untagged() = default;
  explicit untagged(options) {}
  semoe::index_t choices(semoe::index_t) const { return 1; }
  template <class T>
  void route(const semoe::gate::route_context&, semoe::matrix_view<const T>, semoe::gate::routing_plan<T>&) {}
  template <class T>
  void backward(const semoe::gate::route_context&, semoe::matrix_view<const T>, const semoe::gate::routing_plan<T>&,
                std::span<const T>, semoe::matrix_view<T>) const {}
};

static_assert(semoe::gate::check_gate<untagged>());

int main() {}
