// expect: an Expert must be constructible from its options
// An expert the layer cannot construct from its options. One sentence, and nothing before it.
#include "broken_policies.hpp"

int main() { return failtest::build_layer<semoe::gate::top_k<2>, failtest::expert<failtest::missing::options_constructor>>(); }
