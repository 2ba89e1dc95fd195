// expect: infer::ring_release goes with the storage policy semoe::infer::ring only
// ring_release with a store that is not a ring frees nothing: rejected, with
// the prefetch policies that do work named.
#include "semoe/gate/top_k.hpp"
#include "semoe/infer/ring_engine.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/storage/resident.hpp"

using layer_t = semoe::moe_layer<semoe::cpu, semoe::gate::top_k<2>, semoe::expert::ffn<semoe::act::gelu>,
                                 semoe::comm::local, semoe::storage::resident, semoe::infer::ring_release>;
layer_t::store_type* store = nullptr;
