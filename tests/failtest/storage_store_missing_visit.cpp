// expect: a store must provide visit\(layer, expert, f\) calling f\(block_ref<T>\)
// A storage policy whose store lacks visit() (the layer initializes blocks
// through it) is rejected with one sentence naming the member.
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"

struct no_visit_storage {
  using policy_kind = semoe::storage::storage_tag;
  template <class T>
  struct store {
    semoe::index_t add_layer(semoe::index_t experts, semoe::index_t block_elems);
    semoe::index_t layers() const;
    semoe::index_t experts(semoe::index_t layer) const;
    semoe::index_t block_elems(semoe::index_t layer) const;
    semoe::storage::block_ref<T> acquire(semoe::index_t layer, semoe::index_t expert);
    void release(semoe::index_t layer, semoe::index_t expert);
    void reserve_state(semoe::index_t slots);
    void zero_grads(semoe::index_t layer);
  };
};

using layer_t = semoe::moe_layer<semoe::cpu, semoe::gate::top_k<2>, semoe::expert::ffn<semoe::act::gelu>,
                                 semoe::comm::local, no_visit_storage>;
layer_t* p = nullptr;
int main() { return sizeof(*p) > 0 ? 0 : 1; }
