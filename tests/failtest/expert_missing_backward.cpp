// expect: an Expert must provide backward
// An expert without backward() put into a layer is rejected with one sentence.
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"

struct no_backward {
  using policy_kind = semoe::expert::expert_tag;
  struct options {
    semoe::index_t hidden = 0, ffn = 0;
  };
  no_backward() = default;
  explicit no_backward(options) {}
  static semoe::index_t block_elems(const options&) { return 1; }
  semoe::index_t block_elems() const { return 1; }
  semoe::index_t saved_cols() const { return 0; }
  semoe::index_t work_cols() const { return 0; }
  template <class T>
  void init(std::span<T>, semoe::philox, semoe::index_t) const {}
  template <class T>
  void forward(semoe::cpu_executor&, const semoe::expert::expert_batch<T>&, semoe::matrix_view<T>) const {}
};

semoe::moe_layer<semoe::cpu, semoe::gate::top_k<2>, no_backward>* p = nullptr;
int main() { return sizeof(*p) > 0 ? 0 : 1; }
