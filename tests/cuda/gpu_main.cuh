// The doctest runner of a GPU test program: exits 77 (ctest: skipped) when
// this process sees no CUDA device, so a machine without one reports the
// test skipped, never passed.
#pragma once

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "semoe/cuda/executor.cuh"

int main(int argc, char** argv) {
  if (!semoe::cuda_device_available()) {
    std::puts("no CUDA device: skipped");
    return 77;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
