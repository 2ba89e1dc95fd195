// expect: Placement must opt in with `using policy_kind = semoe::placement::placement_tag;`
// A type with the right members is still not a placement policy unless it
// opts in.
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"

struct untagged_placement {
  static constexpr semoe::index_t replica_slots = 0;
  struct options {};
  explicit untagged_placement(options = {}) {}
};

using layer_t = semoe::moe_layer<semoe::cpu, semoe::gate::top_k<2>, semoe::expert::ffn<semoe::act::gelu>,
                                 semoe::comm::local, semoe::storage::resident, semoe::prefetch::on_demand,
                                 untagged_placement>;
layer_t* p = nullptr;
int main() { return sizeof(*p) > 0 ? 0 : 1; }
