// bench_moe_layer's cuda backend, compiled by nvcc into the same program when
// the build has CUDA (SEMOE_BENCH_WITH_CUDA). Returns the exit status.
#pragma once

int bench_moe_layer_cuda(int reps);
