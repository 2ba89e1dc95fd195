// semoe/cuda/event.cuh: the cuda backend's event, a cudaEvent_t. record() on
// one stream and wait() on another order a copy against the compute that
// reads it without a device-wide synchronize.
#pragma once

#include <utility>

#include "semoe/cuda/error.cuh"

namespace semoe {

class cuda_event {
 public:
  cuda_event() { SEMOE_CUDA_TRY(cudaEventCreateWithFlags(&ev_, cudaEventDisableTiming)); }
  cuda_event(const cuda_event&) = delete;
  cuda_event& operator=(const cuda_event&) = delete;
  cuda_event(cuda_event&& o) noexcept : ev_(std::exchange(o.ev_, nullptr)) {}
  cuda_event& operator=(cuda_event&& o) noexcept {
    std::swap(ev_, o.ev_);
    return *this;
  }
  ~cuda_event() {
    if (ev_) detail::cuda_warn(cudaEventDestroy(ev_), "cudaEventDestroy");
  }

  /// Marks the point in `stream` that wait() and ready() refer to.
  void record(cudaStream_t stream) { SEMOE_CUDA_TRY(cudaEventRecord(ev_, stream)); }
  /// Work issued to `stream` from now on runs after the recorded point.
  void wait(cudaStream_t stream) const { SEMOE_CUDA_TRY(cudaStreamWaitEvent(stream, ev_, 0)); }
  /// The host waits for the recorded point.
  void synchronize() const { SEMOE_CUDA_TRY(cudaEventSynchronize(ev_)); }
  bool ready() const {
    const cudaError_t e = cudaEventQuery(ev_);
    if (e == cudaErrorNotReady) return false;
    SEMOE_CUDA_TRY(e);
    return true;
  }
  cudaEvent_t native() const { return ev_; }

 private:
  cudaEvent_t ev_ = nullptr;
};

}  // namespace semoe
