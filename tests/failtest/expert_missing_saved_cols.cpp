// expect: an Expert must provide `index_t saved_cols\(\) const`
// An expert that does not say what forward keeps for backward. One sentence, and nothing before it.
#include "broken_policies.hpp"

int main() { return failtest::build_layer<semoe::gate::top_k<2>, failtest::expert<failtest::missing::saved_cols>>(); }
