// expect: an Expert must provide `static index_t block_elems\(const options&\)`
// An expert that cannot size its block from options alone. One sentence, and nothing before it.
#include "broken_policies.hpp"

int main() { return failtest::build_layer<semoe::gate::top_k<2>, failtest::expert<failtest::missing::static_block_elems>>(); }
