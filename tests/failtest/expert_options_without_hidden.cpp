// expect: options need a `hidden` field
// An expert whose options have no `hidden` field cannot learn the model width:
// rejected with one sentence, not silently left at 0.
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"

struct no_hidden {
  using policy_kind = semoe::expert::expert_tag;
  struct options {
    semoe::index_t width = 0, ffn = 0;
  };
  no_hidden() = default;
  explicit no_hidden(options) {}
  static semoe::index_t block_elems(const options&) { return 1; }
  semoe::index_t block_elems() const { return 1; }
  semoe::index_t saved_cols() const { return 0; }
  semoe::index_t work_cols() const { return 0; }
  template <class T>
  void init(std::span<T>, semoe::philox, semoe::index_t) const {}
  template <class T>
  void forward(semoe::cpu_executor&, const semoe::expert::expert_batch<T>&, semoe::matrix_view<T>) const {}
  template <class T>
  void backward(semoe::cpu_executor&, const semoe::expert::expert_batch<T>&, semoe::matrix_view<const T>,
                semoe::matrix_view<T>) const {}
};

int main() {
  semoe::cpu_executor ex({.threads = 1});
  auto comms = semoe::comm::local::make_world(1);
  semoe::moe_layer<semoe::cpu, semoe::gate::top_k<2>, no_hidden> layer(ex, comms[0],
                                                                         {.hidden = 8, .ffn = 16, .experts = 2});
  return 0;
}
