// semoe/comm/concepts.hpp: the Communicator concept. Every
// collective has an async form that returns a request; the blocking form is
// the async one followed by wait(). Groups are sub-communicators from split().
#pragma once

#include <concepts>
#include <functional>
#include <span>
#include <utility>

#include "semoe/core/config.hpp"

namespace semoe::comm {

struct comm_tag {};

enum class reduce_op { sum, max, min };

/// Completion handle of an async collective. wait() is idempotent; a request
/// that goes out of scope waits, so buffers are never read after they die.
class request {
 public:
  request() = default;
  /// `complete` waits for the collective; `ready`, where the communicator
  /// can tell, says without waiting whether it has finished.
  explicit request(std::function<void()> complete, std::function<bool()> ready = nullptr)
      : complete_(std::move(complete)), ready_(std::move(ready)) {}
  request(request&& o) noexcept
      : complete_(std::exchange(o.complete_, nullptr)), ready_(std::exchange(o.ready_, nullptr)) {}
  request& operator=(request&& o) noexcept {
    if (this != &o) {
      finish_noexcept();
      complete_ = std::exchange(o.complete_, nullptr);
      ready_ = std::exchange(o.ready_, nullptr);
    }
    return *this;
  }
  request(const request&) = delete;
  request& operator=(const request&) = delete;
  ~request() { finish_noexcept(); }

  void wait() {
    if (auto f = std::exchange(complete_, nullptr)) f();
  }
  bool pending() const { return static_cast<bool>(complete_); }
  /// True once the collective has finished (wait() then returns at once);
  /// false while it runs, and for communicators that cannot tell.
  bool ready() const { return !complete_ || (ready_ && ready_()); }

 private:
  void finish_noexcept() noexcept {
    try {
      wait();
    } catch (...) {
      // A destructor must not throw; whoever cared called wait() and saw it.
    }
  }
  std::function<void()> complete_;
  std::function<bool()> ready_;
};

/// What every communication backend provides. Counts are in elements.
template <class C>
concept Communicator = std::same_as<typename C::policy_kind, comm_tag> &&
    requires(C& c, const C& cc, std::span<float> f, std::span<const float> cf,
             std::span<const index_t> counts, std::span<double> d, std::span<const double> cd) {
      { cc.rank() } -> std::convertible_to<int>;
      { cc.size() } -> std::convertible_to<int>;
      { cc.local_rank() } -> std::convertible_to<int>;
      { cc.local_size() } -> std::convertible_to<int>;
      { c.all_to_all_v_async(cf, counts, f, counts) } -> std::same_as<request>;
      { c.all_reduce_async(f, reduce_op::sum) } -> std::same_as<request>;
      { c.all_reduce_async(d, reduce_op::sum) } -> std::same_as<request>;
      { c.all_gather_async(cf, f) } -> std::same_as<request>;
      { c.reduce_scatter_async(cf, f, reduce_op::sum) } -> std::same_as<request>;
      { c.broadcast_async(f, 0) } -> std::same_as<request>;
      { c.barrier() };
      { c.split(0, 0) } -> std::same_as<C>;
    };

/// True for a communicator that moves device memory itself (comm::nccl):
/// device layers hand it their buffers. The host communicators (comm::local,
/// comm::tcp) are given device data through host staging buffers.
template <class C>
inline constexpr bool moves_device_memory_v = requires { requires C::device_memory; };

// Blocking forms, for any communicator.
template <class C, class T>
void all_to_all_v(C& c, std::span<const T> send, std::span<const index_t> send_counts, std::span<T> recv,
                  std::span<const index_t> recv_counts) {
  c.all_to_all_v_async(send, send_counts, recv, recv_counts).wait();
}
template <class C, class T>
void all_reduce(C& c, std::span<T> data, reduce_op op = reduce_op::sum) {
  c.all_reduce_async(data, op).wait();
}
template <class C, class T>
void all_gather(C& c, std::span<const T> mine, std::span<T> all) {
  c.all_gather_async(mine, all).wait();
}
template <class C, class T>
void reduce_scatter(C& c, std::span<const T> in, std::span<T> out, reduce_op op = reduce_op::sum) {
  c.reduce_scatter_async(in, out, op).wait();
}
template <class C, class T>
void broadcast(C& c, std::span<T> data, int root) {
  c.broadcast_async(data, root).wait();
}

}  // namespace semoe::comm
