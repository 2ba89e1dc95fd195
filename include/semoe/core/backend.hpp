// semoe/core/backend.hpp: the Backend concept and the cpu backend: a memory
// space, an executor and an event type (DESIGN.md §4a).
#pragma once

#include <atomic>
#include <concepts>

#include "semoe/core/buffer.hpp"
#include "semoe/core/executor.hpp"

namespace semoe {

struct backend_tag {};

/// A completion flag: record() marks the work before it done, wait() blocks
/// until then. Loads, collectives and compute on different threads order
/// themselves through these, never through sleeps.
class cpu_event {
 public:
  void reset() { done_.store(false, std::memory_order_relaxed); }
  void record() {
    done_.store(true, std::memory_order_release);
    done_.notify_all();
  }
  void wait() const { done_.wait(false, std::memory_order_acquire); }
  bool ready() const { return done_.load(std::memory_order_acquire); }

 private:
  std::atomic<bool> done_{true};
};

/// The cpu backend: host memory, the thread-pool executor, cpu events.
struct cpu {
  using policy_kind = backend_tag;
  using memory_space = host_space;
  using executor = cpu_executor;
  using event = cpu_event;
  static constexpr const char* name = "cpu";
};

template <class B>
concept Backend = std::same_as<typename B::policy_kind, backend_tag> && requires {
  typename B::memory_space;
  typename B::executor;
  typename B::event;
};

}  // namespace semoe
