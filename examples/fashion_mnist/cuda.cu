// fashion_mnist --backend cuda: the same model and training loop on the GPU,
// one rank, experts resident in device memory.
#include "semoe/cuda/backend.cuh"
#include "train.hpp"

namespace fashion_mnist {

outcome train_and_test_cuda(const config& cfg, const io::mnist_split& train, const io::mnist_split& test) {
  SEMOE_CHECK(cuda_device_available(), "--backend cuda: this process sees no CUDA device");
  auto world = comm::local::make_world(1);
  return train_and_test<semoe::cuda, comm::local, resident_experts>(world[0], cfg, train, test);
}

}  // namespace fashion_mnist
