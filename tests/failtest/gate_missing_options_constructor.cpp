// expect: Gate must be constructible from its options
// A gate the layer cannot construct from its options. One sentence, and nothing before it.
#include "broken_policies.hpp"

int main() { return failtest::build_layer<failtest::gate<failtest::missing::options_constructor>, semoe::expert::ffn<semoe::act::gelu>>(); }
