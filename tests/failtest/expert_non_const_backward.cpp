// expect: an Expert.s backward\(\.\.\.\) must be const: make backward const
// An expert whose backward is not const: the fix-it says to make it const. One sentence, and nothing before it.
#include "broken_policies.hpp"

int main() { return failtest::build_layer<semoe::gate::top_k<2>, failtest::expert<failtest::missing::const_backward>>(); }
