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

namespace detail {

// One sub-concept per requirement of Communicator; communicator_contract below
// gives each its fix-it sentence.

template <class C>
concept comm_opted_in = requires { requires std::same_as<typename C::policy_kind, comm_tag>; };

template <class C>
concept comm_has_ranks = requires(const C& c) {
  { c.rank() } -> std::convertible_to<int>;
  { c.size() } -> std::convertible_to<int>;
  { c.local_rank() } -> std::convertible_to<int>;
  { c.local_size() } -> std::convertible_to<int>;
};

template <class C>
concept comm_has_all_to_all_v = requires(C& c, std::span<const float> in, std::span<float> out,
                                         std::span<const index_t> counts) {
  { c.all_to_all_v_async(in, counts, out, counts) } -> std::same_as<request>;
};

template <class C>
concept comm_has_all_reduce = requires(C& c, std::span<float> f, std::span<double> d) {
  { c.all_reduce_async(f, reduce_op::sum) } -> std::same_as<request>;
  { c.all_reduce_async(d, reduce_op::sum) } -> std::same_as<request>;
};

template <class C>
concept comm_has_all_gather = requires(C& c, std::span<const float> in, std::span<float> out) {
  { c.all_gather_async(in, out) } -> std::same_as<request>;
};

template <class C>
concept comm_has_reduce_scatter = requires(C& c, std::span<const float> in, std::span<float> out) {
  { c.reduce_scatter_async(in, out, reduce_op::sum) } -> std::same_as<request>;
};

template <class C>
concept comm_has_broadcast = requires(C& c, std::span<float> f) {
  { c.broadcast_async(f, 0) } -> std::same_as<request>;
};

template <class C>
concept comm_has_barrier = requires(C& c) { c.barrier(); };

template <class C>
concept comm_has_split = requires(C& c) {
  { c.split(0, 0) } -> std::same_as<C>;
};

/// The Communicator contract, one requirement per entry: its sub-concept and
/// its fix-it. Diagnose = false answers the concept; Diagnose = true stops
/// compilation with the sentence of every broken requirement.
template <class C, bool Diagnose>
constexpr bool communicator_contract() {
  bool ok = true;
  if constexpr (!comm_opted_in<C>) {
    static_assert(!Diagnose, "semoe::comm: a Communicator must opt in with `using policy_kind = "
                  "semoe::comm::comm_tag;`; see comm/concepts.hpp");
    ok = false;
  }
  if constexpr (!comm_has_ranks<C>) {
    static_assert(!Diagnose, "semoe::comm: a Communicator must provide rank(), size(), local_rank() and "
                  "local_size() const returning int; see comm/concepts.hpp");
    ok = false;
  }
  if constexpr (!comm_has_all_to_all_v<C>) {
    static_assert(!Diagnose, "semoe::comm: a Communicator must provide all_to_all_v_async(send, send_counts, "
                  "recv, recv_counts) returning comm::request; see comm/concepts.hpp");
    ok = false;
  }
  if constexpr (!comm_has_all_reduce<C>) {
    static_assert(!Diagnose, "semoe::comm: a Communicator must provide all_reduce_async(data, reduce_op) over "
                  "float and double returning comm::request; see comm/concepts.hpp");
    ok = false;
  }
  if constexpr (!comm_has_all_gather<C>) {
    static_assert(!Diagnose, "semoe::comm: a Communicator must provide all_gather_async(mine, all) returning "
                  "comm::request; see comm/concepts.hpp");
    ok = false;
  }
  if constexpr (!comm_has_reduce_scatter<C>) {
    static_assert(!Diagnose, "semoe::comm: a Communicator must provide reduce_scatter_async(in, out, reduce_op) "
                  "returning comm::request; see comm/concepts.hpp");
    ok = false;
  }
  if constexpr (!comm_has_broadcast<C>) {
    static_assert(!Diagnose, "semoe::comm: a Communicator must provide broadcast_async(data, root) returning "
                  "comm::request; see comm/concepts.hpp");
    ok = false;
  }
  if constexpr (!comm_has_barrier<C>) {
    static_assert(!Diagnose, "semoe::comm: a Communicator must provide barrier(); see comm/concepts.hpp");
    ok = false;
  }
  if constexpr (!comm_has_split<C>) {
    static_assert(!Diagnose, "semoe::comm: a Communicator must provide split(color, key) returning a "
                  "communicator of its own type; see comm/concepts.hpp");
    ok = false;
  }
  return ok || Diagnose;
}

}  // namespace detail

/// What every communication backend provides. Counts are in elements.
///   using policy_kind = comm_tag;
///   rank(), size(), local_rank(), local_size() const   (local: ranks on this host)
///   all_to_all_v_async, all_reduce_async, all_gather_async, reduce_scatter_async,
///   broadcast_async: each returns a request whose wait() completes it; the
///       buffers must live until then. The layer sends its scalar, index_t,
///       double and uint64_t; the contract probes float and double.
///   barrier(); split(color, key) -> C   a sub-communicator
/// `static_assert(check_communicator<C>())` names every requirement a type breaks.
template <class C>
concept Communicator = detail::communicator_contract<C, false>();

/// Fix-it diagnostics: one sentence per broken requirement of Communicator.
template <class C>
constexpr bool check_communicator() {
  return detail::communicator_contract<C, true>();
}

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
