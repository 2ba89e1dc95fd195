// semoe/core/backend.hpp: the Backend concept and the cpu backend. A backend
// names its executor, the memory space its kernels use, the host memory it
// stages through (pinned on CUDA) and its event type; the cuda backend is in
// cuda/backend.cuh.
#pragma once

#include <concepts>

#include "semoe/core/buffer.hpp"
#include "semoe/core/executor.hpp"

namespace semoe {

struct backend_tag {};

/// The cpu backend: host memory, the thread-pool executor, cpu events.
struct cpu {
  using policy_kind = backend_tag;
  using memory_space = host_space;
  using host_memory_space = host_space;
  using executor = cpu_executor;
  using event = cpu_event;
  static constexpr const char* name = "cpu";
};

template <class B>
concept Backend = std::same_as<typename B::policy_kind, backend_tag> && Executor<typename B::executor> &&
                  MemorySpace<typename B::memory_space> && MemorySpace<typename B::host_memory_space> &&
                  std::same_as<typename B::memory_space, typename B::executor::memory_space> &&
                  std::same_as<typename B::event, typename B::executor::event> &&
                  requires(const typename B::event& ev) { ev.synchronize(); } &&  // the host waits for it
                  B::host_memory_space::host_accessible;

static_assert(Backend<cpu>);

}  // namespace semoe
