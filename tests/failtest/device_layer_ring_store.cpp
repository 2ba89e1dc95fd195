// expect: this storage policy keeps blocks in host memory only
// A layer on a device backend over the ring store (whose slots are host
// memory) is rejected with one sentence, not a crash at the first block.
#include "../unit/core/emulated_device.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/infer/ring_engine.hpp"
#include "semoe/layer/moe_layer.hpp"

using layer_t = semoe::moe_layer<semoe::test::emulated_device, semoe::gate::top_k<2>, semoe::expert::ffn<semoe::act::gelu>,
                                 semoe::comm::local, semoe::infer::ring, semoe::infer::ring_release>;
layer_t::store_type* store = nullptr;
