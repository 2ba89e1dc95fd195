// expect: an Expert must provide backward
// An expert without backward() put into a layer is rejected with one sentence. One sentence, and nothing before it.
#include "broken_policies.hpp"

int main() { return failtest::build_layer<semoe::gate::top_k<2>, failtest::expert<failtest::missing::backward>>(); }
