// expect: an Expert must provide init\(std::span<T> block, philox rng, index_t expert\) const
// An expert without init() cannot fill its parameter blocks. One sentence, and nothing before it.
#include "broken_policies.hpp"

int main() { return failtest::build_layer<semoe::gate::top_k<2>, failtest::expert<failtest::missing::init>>(); }
