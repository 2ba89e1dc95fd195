// expect: infer::ring needs the prefetch policy semoe::infer::ring_release
// Ring memory with a prefetch policy that never frees a layer's slot would
// compile and then wait forever at layer K; it is rejected with one sentence
// naming the fix.
#include "semoe/gate/top_k.hpp"
#include "semoe/infer/ring_engine.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/prefetch/on_demand.hpp"

using layer_t = semoe::moe_layer<semoe::cpu, semoe::gate::top_k<2>, semoe::expert::ffn<semoe::act::gelu>,
                                 semoe::comm::local, semoe::infer::ring, semoe::prefetch::on_demand>;
layer_t::store_type* store = nullptr;
