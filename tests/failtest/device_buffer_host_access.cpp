// expect: (constraints not satisfied|no match for)
// Host code cannot index a buffer in device memory: element access exists
// only where the memory space says the host can read it.
#include "../unit/core/emulated_device.hpp"

float first(semoe::buffer<float, semoe::test::emulated_device_space>& b) { return b[0]; }
