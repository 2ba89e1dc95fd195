// expect: Gate.s backward\(\.\.\.\) must be const and return void: make it `void backward\(\.\.\.\) const`
// A gate whose backward is not const: the fix-it says how to declare it. One sentence, and nothing before it.
#include "broken_policies.hpp"

int main() { return failtest::build_layer<failtest::gate<failtest::missing::const_backward>, semoe::expert::ffn<semoe::act::gelu>>(); }
