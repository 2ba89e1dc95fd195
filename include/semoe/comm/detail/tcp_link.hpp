// semoe/comm/detail/tcp_link.hpp: the state comm::tcp's io thread keeps:
// one collective in flight (tcp_op) and its group (tcp_group), the receive
// slots callers posted and the early arrivals staged before them, and one
// connection to a peer with its send queue (tcp_link). Part of comm/tcp.hpp.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iterator>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#include <linux/sockios.h>  // SIOCOUTQ
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include "semoe/comm/rendezvous.hpp"
#include "semoe/comm/wire.hpp"
#include "semoe/core/error.hpp"

namespace semoe::comm::detail {

/// Element type tag carried in every frame: size | category << 8.
template <class T>
constexpr std::uint32_t dtype_of() {
  constexpr std::uint32_t cat = std::is_floating_point_v<T> ? 1 : std::is_signed_v<T> ? 2 : 3;
  return static_cast<std::uint32_t>(sizeof(T)) | cat << 8;
}
inline std::string dtype_name(std::uint32_t d) {
  if (d == 0) return "no elements";
  const char* cat = (d >> 8) == 1 ? "floating-point" : (d >> 8) == 2 ? "signed integer" : "unsigned integer";
  return semoe::detail::concat((d & 0xff), "-byte ", cat, " elements");
}

/// Completion condition for the io thread's reads and writes: each system
/// call may move the whole remaining frame. Asio's default (transfer_all)
/// caps a call at 64 KiB, so a 1 MiB frame took 16 sendmsg calls and 16
/// reactor round trips each way; at 16 MiB per destination that held a
/// P = 2 all-to-all to 0.56-0.59 of one socket pair (bench_all_to_all).
struct transfer_whole_frame {
  std::size_t operator()(const boost::system::error_code& ec, std::size_t) const {
    return ec ? 0 : std::numeric_limits<std::size_t>::max();
  }
};

struct tcp_group;

/// One collective on this rank: a list of phases run on the io thread; each
/// posts sends and receives, and the next runs once they have all completed.
struct tcp_op {
  wire::kind kind{};
  std::uint64_t seq = 0;
  std::uint32_t dtype = 0, arg = 0;
  std::size_t elem = 1;
  tcp_group* group = nullptr;
  std::vector<std::function<void(tcp_op&)>> phases;
  std::vector<std::byte> scratch;
  // io thread only
  std::size_t step = 0;
  int outstanding = 0;
  bool in_phase = false;
  std::chrono::steady_clock::time_point last_progress{};
  // under tcp_world::mutex_
  bool done = false;
  std::string error;

  std::string name() const;
};

/// A communicator: the world (id 0) or a split group, over the world's links.
struct tcp_group {
  std::uint64_t id = 0;
  std::vector<int> members;  ///< world rank of each group rank
  int rank = 0;
  int local_size = 1;
  // caller's thread
  std::uint64_t next_seq = 0;
  std::map<std::uint64_t, std::shared_ptr<tcp_op>> pending;
  // io thread
  std::uint64_t posted = 0;
  std::map<std::uint64_t, tcp_op*> active;
};

inline std::string tcp_op::name() const {
  std::string n = semoe::detail::concat(wire::kind_name(kind), " #", seq);
  if (group && group->id != 0) n += semoe::detail::concat(" of a split group of ", group->members.size(), " ranks");
  return n;
}

struct msg_key {
  std::uint64_t group = 0, seq = 0;
  std::uint8_t step = 0;
  auto operator<=>(const msg_key&) const = default;
};

/// A posted receive: bytes land directly in the caller's buffer.
struct recv_slot {
  tcp_op* op = nullptr;
  std::byte* dst = nullptr;
  std::uint64_t expect = 0, got = 0;
  int group_peer = 0;
};

/// A message that arrived before its receive was posted (the peer ran ahead).
/// Frames that arrived before their receive was posted. The bytes are not
/// zero-filled and grow by doubling up to the message's total, so staging a
/// large early message costs one extra copy, not a fill plus a copy per
/// reallocation; memory stays within twice what actually arrived.
struct staged_msg {
  wire::header first;
  std::unique_ptr<std::byte[]> bytes;
  std::size_t size = 0, capacity = 0;
  bool in_read = false;

  /// Room for n more bytes (never beyond `total`); returns where they go.
  std::byte* extend(std::size_t n, std::uint64_t total) {
    if (size + n > capacity) {
      const std::size_t want = std::max(size + n, std::min<std::size_t>(static_cast<std::size_t>(total), 2 * capacity));
      auto grown = std::unique_ptr<std::byte[]>(new std::byte[want]);
      if (size) std::memcpy(grown.get(), bytes.get(), size);
      bytes = std::move(grown);
      capacity = want;
    }
    std::byte* at = bytes.get() + size;
    size += n;
    return at;
  }
};

struct tcp_link {
  tcp_link(tcp_socket s, int p) : sock(std::move(s)), peer(p) {
    boost::system::error_code ec;
    const auto ep = sock.remote_endpoint(ec);
    if (!ec) host = ep.address().to_string();
  }
  tcp_socket sock;
  int peer;
  std::string host;  ///< the peer's address, for messages
  struct out_msg {
    tcp_op* op;  ///< null: a control frame (abort, clear-to-send)
    wire::header h;
    const std::byte* data;
    std::uint64_t bytes = 0;    ///< payload to send in all
    std::uint64_t allowed = 0;  ///< payload that may go now (the eager part until clear-to-send)
    std::uint64_t sent = 0;
    bool started = false;       ///< a first frame (it carries the header checks) is out
    bool ready() const { return !started || sent < allowed; }
  };
  /// Control frames at the front, then messages in issue order; a frame goes
  /// from the first message that may send (a message waiting for its
  /// clear-to-send never holds up the ones behind it).
  std::list<out_msg> outq;
  std::list<out_msg>::iterator inflight;  ///< the message of the frame being written
  bool writing = false;
  /// Clear-to-sends that came before this rank issued the message: the
  /// receiver posted first (the common case when this rank is behind).
  std::map<msg_key, std::uint64_t> early_cts;
  wire::header_bytes out_hdr{};
  wire::header_bytes in_hdr{};
  wire::header cur{};
  bool paused = false;  ///< a decoded header waits for a receive or for buffer space
  std::map<msg_key, recv_slot> posted;
  std::map<msg_key, staged_msg> staged;
  std::string abort_in;
  bool eof = false;   ///< the peer said goodbye between collectives
  bool down = false;  ///< no more traffic on this link
  bool abort_pending = false;  ///< send the abort frame once the frame in flight is out
};

inline std::uint64_t splitmix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace semoe::comm::detail
