// expect: Gate must provide choices\(experts\) const returning index_t
// A gate that does not say how many experts each token picks. One sentence, and nothing before it.
#include "broken_policies.hpp"

int main() { return failtest::build_layer<failtest::gate<failtest::missing::choices>, semoe::expert::ffn<semoe::act::gelu>>(); }
