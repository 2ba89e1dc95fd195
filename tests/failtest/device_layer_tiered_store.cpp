// expect: this storage policy keeps blocks in host memory only
// A layer on a device backend over a tiered store (whose tiers are host
// memory) is rejected with one sentence, not a crash at the first block.
#include "../unit/core/emulated_device.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/storage/tiered_store.hpp"

using layer_t = semoe::moe_layer<semoe::test::emulated_device, semoe::gate::top_k<2>, semoe::expert::ffn<semoe::act::gelu>,
                                 semoe::comm::local,
                                 semoe::storage::tiered<semoe::storage::device_tier, semoe::storage::host_tier>>;
layer_t::store_type* store = nullptr;
