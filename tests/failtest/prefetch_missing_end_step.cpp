// expect: Prefetch must provide end_step\(store\)
// A prefetch policy without the end_step hook put into a layer is rejected
// with one sentence naming the hook.
#include <cstdint>
#include <span>

#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"

struct no_end_step {
  using policy_kind = semoe::prefetch::prefetch_tag;
  template <class Store>
  void before(Store&, semoe::index_t, semoe::prefetch::phase, std::span<const std::int32_t>) {}
  template <class Store>
  void after(Store&, semoe::index_t, semoe::prefetch::phase) {}
};

using layer_t = semoe::moe_layer<semoe::cpu, semoe::gate::top_k<2>, semoe::expert::ffn<semoe::act::gelu>,
                                 semoe::comm::local, semoe::storage::resident, no_end_step>;
layer_t* p = nullptr;
int main() { return sizeof(*p) > 0 ? 0 : 1; }
