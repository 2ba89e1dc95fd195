// expect: this storage policy keeps blocks in host memory only
// A layer on a device backend over a storage policy that only makes stores
// in host memory (store<T>, no store<T, Space>) is rejected with one
// sentence, not a crash at the first block.
#include "../unit/core/emulated_device.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/storage/resident.hpp"

struct host_only_storage {
  using policy_kind = semoe::storage::storage_tag;
  template <class T>
  using store = semoe::storage::resident::store<T>;
};

using layer_t = semoe::moe_layer<semoe::test::emulated_device, semoe::gate::top_k<2>, semoe::expert::ffn<semoe::act::gelu>,
                                 semoe::comm::local, host_only_storage>;
layer_t::store_type* store = nullptr;
