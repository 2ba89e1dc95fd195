// semoe/comm/tcp.hpp: one process per rank over TCP. A full
// mesh of authenticated connections (rendezvous.hpp) carries framed messages
// (wire.hpp). A background io thread per process drives every send and
// receive, so async collectives overlap the caller's compute; results are
// bit for bit those of comm::local, because every reduction folds in rank
// order 0..P-1 at one owner per chunk. A dead, silent or hostile peer becomes
// a semoe::error naming the rank and the collective on every surviving rank.
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

#include "semoe/comm/concepts.hpp"
#include "semoe/comm/detail/exchange_plan.hpp"
#include "semoe/comm/local.hpp"  // detail::reduce_into: the very fold comm::local uses
#include "semoe/comm/rendezvous.hpp"
#include "semoe/comm/wire.hpp"
#include "semoe/core/error.hpp"

namespace semoe::comm {

namespace detail {

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

/// The transport of one process: links to every peer, and the io thread.
class tcp_world {
 public:
  using steady = std::chrono::steady_clock;
  static constexpr std::uint64_t max_seq_ahead = std::uint64_t{1} << 20;
  static constexpr std::size_t max_early_cts = std::size_t{1} << 16;
  /// Messages a peer may have staged here before any receive asks for them
  /// (a peer running ahead has a few; zero-length frames for unknown groups
  /// or far-ahead collectives would otherwise grow the map without bound).
  static constexpr std::size_t max_staged_messages = std::size_t{1} << 16;
  /// How long a failed rank's communicator waits, when it closes, for peers
  /// to acknowledge what it wrote (the abort frame above all).
  static constexpr std::chrono::milliseconds abort_linger{1000};

  explicit tcp_world(tcp_options o) : opt_(std::move(o)), me_(opt_.rank), io_(1), watchdog_(io_), abort_timer_(io_), grace_timer_(io_) {
    mesh socks = rendezvous(io_, opt_);
    links_.resize(opt_.size);
    for (int r = 0; r < opt_.size; ++r)
      if (socks[r]) links_[r] = std::make_unique<tcp_link>(std::move(*socks[r]), r);
    world_ = std::make_shared<tcp_group>();
    for (int r = 0; r < opt_.size; ++r) world_->members.push_back(r);
    world_->rank = me_;
    world_->local_size = opt_.local_size == 0 ? opt_.size : opt_.local_size;
    groups_[0] = world_;
    tick_ = std::clamp<steady::duration>(opt_.timeout / 8, std::chrono::milliseconds(5), std::chrono::milliseconds(500));
    io_.restart();
    for (auto& l : links_)
      if (l) read_header(*l);
    arm_watchdog();
    thread_ = std::thread([this] { run(); });
  }
  tcp_world(const tcp_world&) = delete;
  tcp_world& operator=(const tcp_world&) = delete;

  ~tcp_world() {
    boost::asio::post(io_, [this] {
      closing_ = true;
      watchdog_.cancel();
      abort_timer_.cancel();
      grace_timer_.cancel();
      if (failed_)
        close_when_delivered(steady::now() + abort_linger);
      else
        close_all();
    });
    work_.reset();
    thread_.join();
  }

  const tcp_options& options() const { return opt_; }
  int rank() const { return me_; }
  std::uint64_t early_bytes() const { return early_bytes_.load(std::memory_order_relaxed); }
  std::shared_ptr<tcp_group> world_group() const { return world_; }

  /// Caller's thread: fail fast once the job is known to be broken.
  void check_alive(wire::kind k) {
    if (!failed_flag_.load()) return;
    std::lock_guard lock(mutex_);
    semoe::detail::fail("semoe::comm::tcp: rank ", me_, ": cannot start ", wire::kind_name(k),
                        ": the job was aborted: ", reason_);
  }

  /// Caller's thread: hand an op to the io thread (issue order is kept).
  void launch(tcp_group* g, tcp_op* op) {
    boost::asio::post(io_, [this, g, op] {
      if (failed_) {
        finish(*op, reason_copy());
        return;
      }
      g->posted = op->seq + 1;
      g->active.emplace(op->seq, op);
      op->last_progress = steady::now();
      advance(*op);
    });
  }

  /// Caller's thread: block until `op` has completed or failed.
  void wait(tcp_op& op) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return op.done; });
  }

  // --- used by the phases of collectives (io thread) ---------------------

  void send(tcp_op& op, int group_peer, const void* data, std::size_t bytes) {
    tcp_link& l = link_of(op, group_peer);
    if (l.down || l.eof) {
      ++op.outstanding;  // never completes: the op fails with the job
      fail_soon(left_message(l, op));
      return;
    }
    wire::header h;
    h.type = op.kind;
    h.step = static_cast<std::uint8_t>(op.step);
    h.dtype = op.dtype;
    h.arg = op.arg;
    h.group = op.group->id;
    h.seq = op.seq;
    h.total = bytes;
    std::uint64_t allowed = bytes;
    if (bytes > opt_.eager_bytes) {
      allowed = opt_.eager_bytes;
      const msg_key k{h.group, h.seq, h.step};
      if (auto c = l.early_cts.find(k); c != l.early_cts.end()) {
        if (c->second == bytes) allowed = bytes;  // else: the receiver names the size mismatch
        l.early_cts.erase(c);
      }
    }
    l.outq.push_back({&op, h, static_cast<const std::byte*>(data), bytes, allowed});
    ++op.outstanding;
    if (!l.writing) write_next(l);
  }

  void recv(tcp_op& op, int group_peer, void* dst, std::size_t bytes) {
    tcp_link& l = link_of(op, group_peer);
    if (l.down || l.eof) {
      ++op.outstanding;  // never completes: the op fails with the job
      fail_soon(left_message(l, op));
      return;
    }
    const msg_key k{op.group->id, op.seq, static_cast<std::uint8_t>(op.step)};
    l.posted.emplace(k, recv_slot{&op, static_cast<std::byte*>(dst), bytes, 0, group_peer});
    ++op.outstanding;
    if (bytes > opt_.eager_bytes) clear_to_send(l, k, bytes);
    claim(l, k);
    if (l.paused && !failed_) {  // the frame it waits on may be this one
      l.paused = false;
      on_header(l);
    }
  }

  /// Register a split group (io thread) so its early frames are recognized.
  void add_group(const std::shared_ptr<tcp_group>& g) { groups_.emplace(g->id, g); }
  bool has_group(std::uint64_t id) const { return groups_.count(id) != 0; }

  [[noreturn]] void raise(const tcp_op& op) const {
    semoe::detail::fail("semoe::comm::tcp: rank ", me_, ": ", op.name(), " failed: ", op.error);
  }

 private:
  void run() {
    for (;;) {
      try {
        io_.run();
        return;
      } catch (const std::exception& e) {  // e.g. bad_alloc in a handler: fail the job, keep the thread
        fail(semoe::detail::concat("rank ", me_, ": internal error on the io thread: ", e.what()));
      }
    }
  }

  std::string reason_copy() {
    std::lock_guard lock(mutex_);
    return reason_;
  }

  tcp_link& link_of(const tcp_op& op, int group_peer) { return *links_[op.group->members[group_peer]]; }

  std::string left_message(const tcp_link& l, const tcp_op& op) const {
    return semoe::detail::concat("rank ", l.peer, " has closed its connection (it died or left the job), so ",
                                 op.name(), " cannot complete");
  }

  /// What this link was doing, for error messages: the collective at stake.
  std::string context(const tcp_link& l) const {
    if (!l.posted.empty()) return l.posted.begin()->second.op->name();
    for (const auto& m : l.outq)
      if (m.op) return m.op->name();
    for (const auto& [id, g] : groups_)
      if (!g->active.empty()) return g->active.begin()->second->name();
    return "no collective (between collectives)";
  }
  std::string peer_problem(const tcp_link& l, const std::string& what) const {
    return semoe::detail::concat("rank ", l.peer, " ", what, " during ", context(l));
  }

  // --- ops -----------------------------------------------------------------

  void advance(tcp_op& op) {
    while (!failed_) {
      if (op.step == op.phases.size()) {
        complete(op);
        return;
      }
      op.in_phase = true;
      try {
        op.phases[op.step](op);
      } catch (const std::exception& e) {
        op.in_phase = false;
        fail(semoe::detail::concat("rank ", me_, " failed in ", op.name(), ": ", e.what()));
        return;
      }
      op.in_phase = false;
      if (failed_ || op.outstanding > 0) return;
      ++op.step;
    }
  }

  void io_done(tcp_op& op) {
    if (failed_) return;
    op.last_progress = steady::now();
    if (--op.outstanding == 0 && !op.in_phase) {
      ++op.step;
      advance(op);
    }
  }

  void complete(tcp_op& op) {
    // A frame buffered for this op that no receive claimed: the peer sent
    // something this rank did not expect (e.g. it broadcast from another root).
    for (auto& l : links_) {
      if (!l) continue;
      auto it = l->staged.lower_bound(msg_key{op.group->id, op.seq, 0});
      if (it != l->staged.end() && it->first.group == op.group->id && it->first.seq == op.seq) {
        std::string why = mismatch(op, it->second.first, *l);
        fail(why.empty() ? peer_problem(*l, semoe::detail::concat("sent a message for ", op.name(), " that rank ", me_,
                                                                  " does not expect"))
                         : why);
        return;
      }
    }
    op.group->active.erase(op.seq);
    finish(op, {});
  }
  void finish(tcp_op& op, std::string error) {
    {
      std::lock_guard lock(mutex_);
      op.error = std::move(error);
      op.done = true;
    }
    cv_.notify_all();
  }

  // --- failure ---------------------------------------------------------------

  /// The job is broken: tell every peer why (best effort), stop all traffic,
  /// and fail every pending op once no transfer still touches its buffers.
  void fail(std::string reason) {
    if (failed_ || closing_) return;
    failed_ = true;
    {
      std::lock_guard lock(mutex_);
      reason_ = reason;
    }
    failed_flag_ = true;
    abort_out_ = reason.substr(0, wire::max_control_bytes);
    for (auto& lp : links_) {
      if (!lp) continue;
      tcp_link& l = *lp;
      if (l.down || l.eof) {
        shut(l);
      } else if (l.writing) {  // a frame is half out: finish it, then say why we stop
        for (auto it = l.outq.begin(); it != l.outq.end();) it = it == l.inflight ? std::next(it) : l.outq.erase(it);
        l.abort_pending = true;
      } else {
        l.outq.clear();
        queue_abort(l);
      }
    }
    abort_timer_.expires_after(std::chrono::milliseconds(500));
    abort_timer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec || closing_) return;
      for (auto& l : links_)
        if (l) close_quietly(l->sock);  // an abort frame that could not go out in time
    });
    // Not inline: fail() may run inside a phase of an op that a released
    // caller would free; the posted release runs after this handler.
    boost::asio::post(io_, [this] { maybe_release(); });
  }

  /// A lost connection is often the echo of a failure elsewhere (a peer that
  /// gave up and exited): wait briefly for an abort frame naming the root
  /// cause before failing with this reason.
  void fail_soon(std::string reason) {
    if (failed_ || closing_ || !soon_reason_.empty()) return;
    soon_reason_ = std::move(reason);
    grace_timer_.expires_after(std::chrono::milliseconds(200));
    grace_timer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec || closing_) return;
      fail(soon_reason_);
    });
  }

  void close_all() {
    for (auto& l : links_)
      if (l) close_quietly(l->sock);
  }

  /// After a failure, peers may have frames on the way that this rank will
  /// never read, and closing a socket with unread bytes resets the
  /// connection: the reset drops whatever this rank wrote that the peer has
  /// not yet acknowledged, the abort frame naming the cause among it. So wait
  /// until every live link has written and been acknowledged all it queued
  /// (or until `deadline`: a peer that stopped reading), then close.
  void close_when_delivered(steady::time_point deadline) {
    const auto delivered = [](tcp_link& l) {
      if (!l.sock.is_open()) return true;
      if (l.writing) return false;
      const int fd = l.sock.native_handle();
      tcp_info info{};
      socklen_t len = sizeof info;
      int unacked = 0;
      // A reset link (TCP_CLOSE) has dropped its unacknowledged bytes for
      // good; after shut() the state is FIN_WAIT1 and the FIN counts as one.
      return ::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0 || info.tcpi_state == TCP_CLOSE ||
             ::ioctl(fd, SIOCOUTQ, &unacked) != 0 || unacked == 0;
    };
    if (std::all_of(links_.begin(), links_.end(), [&](auto& l) { return !l || delivered(*l); }) ||
        steady::now() >= deadline) {
      close_all();
      return;
    }
    abort_timer_.expires_after(std::chrono::milliseconds(1));
    abort_timer_.async_wait([this, deadline](const boost::system::error_code&) { close_when_delivered(deadline); });
  }

  void shut(tcp_link& l) {
    boost::system::error_code ec;
    l.sock.shutdown(boost::asio::socket_base::shutdown_send, ec);
    l.sock.cancel(ec);
    l.down = true;
  }

  void queue_abort(tcp_link& l) {
    wire::header h;
    h.type = wire::kind::abort;
    h.total = abort_out_.size();
    l.outq.push_back({nullptr, h, reinterpret_cast<const std::byte*>(abort_out_.data()), h.total, h.total});
    write_next(l);
  }

  /// Tell the peer its message `k` of `bytes` may come: the buffer is posted.
  void clear_to_send(tcp_link& l, msg_key k, std::uint64_t bytes) {
    wire::header h;
    h.type = wire::kind::clear_to_send;
    h.group = k.group;
    h.seq = k.seq;
    h.step = k.step;
    h.total = bytes;
    l.outq.push_front({nullptr, h, nullptr, 0, 0});
    if (!l.writing) write_next(l);
  }

  /// The peer posted its receive for one of this rank's messages.
  void on_clear_to_send(tcp_link& l) {
    const wire::header& h = l.cur;
    if (h.length != 0) {
      l.down = true;
      fail(peer_problem(l, "sent a clear-to-send frame with a payload"));
      return;
    }
    const msg_key k{h.group, h.seq, h.step};
    auto it = std::find_if(l.outq.begin(), l.outq.end(), [&](const tcp_link::out_msg& m) {
      return m.op && msg_key{m.h.group, m.h.seq, m.h.step} == k;
    });
    if (it != l.outq.end()) {
      if (h.total == it->bytes) it->allowed = it->bytes;  // else: the receiver names the size mismatch
    } else if (l.early_cts.size() >= max_early_cts) {
      l.down = true;
      fail(peer_problem(l, semoe::detail::concat("sent more than ", max_early_cts,
                                                 " clear-to-send frames for messages this rank has not issued")));
      return;
    } else {
      l.early_cts[k] = h.total;
    }
    read_header(l);
    if (!l.writing) write_next(l);
  }

  void maybe_release() {
    if (!failed_ || released_ || user_io_ > 0) return;
    released_ = true;
    std::vector<tcp_op*> ops;
    for (auto& [id, g] : groups_) {
      for (auto& [seq, op] : g->active) ops.push_back(op);
      g->active.clear();
    }
    {
      std::lock_guard lock(mutex_);
      for (tcp_op* op : ops) {
        op->error = reason_;
        op->done = true;
      }
    }
    cv_.notify_all();
  }

  void arm_watchdog() {
    watchdog_.expires_after(tick_);
    watchdog_.async_wait([this](const boost::system::error_code& ec) {
      if (ec || closing_) return;
      check_progress();
      arm_watchdog();
    });
  }

  /// A collective that has seen no traffic for `timeout` names who it waits on.
  void check_progress() {
    if (failed_ || !soon_reason_.empty()) return;
    const auto now = steady::now();
    for (auto& [id, g] : groups_)
      for (auto& [seq, op] : g->active) {
        if (now - op->last_progress <= opt_.timeout) continue;
        std::vector<int> waits;
        for (auto& l : links_) {
          if (!l) continue;
          bool w = false;
          for (auto& [k, s] : l->posted) w = w || s.op == op;
          for (auto& m : l->outq) w = w || m.op == op;
          if (w) waits.push_back(l->peer);
        }
        std::string who = waits.size() == 1 ? "rank " : "ranks ";
        for (std::size_t i = 0; i < waits.size(); ++i) {
          const std::string& host = links_[static_cast<std::size_t>(waits[i])]->host;
          who += (i ? ", " : "") + std::to_string(waits[i]) + (host.empty() ? "" : " (" + host + ")");
        }
        if (waits.empty()) who = "its peers";
        fail(semoe::detail::concat(op->name(), " made no progress for ", opt_.timeout.count(), " ms waiting on ", who,
                                   ": ", waits.size() == 1 ? "it" : "they",
                                   " died, hung, became unreachable, or never issued this collective"));
        return;
      }
  }

  // --- writing -------------------------------------------------------------

  void write_next(tcp_link& l) {
    const auto it = std::find_if(l.outq.begin(), l.outq.end(), [](const tcp_link::out_msg& m) { return m.ready(); });
    if (it == l.outq.end()) {
      l.writing = false;
      return;
    }
    auto& m = *it;
    const std::uint64_t left = m.allowed - m.sent;
    const std::size_t len = m.op ? static_cast<std::size_t>(std::min<std::uint64_t>(opt_.chunk_bytes, left))
                                 : static_cast<std::size_t>(left);
    m.h.length = static_cast<std::uint32_t>(len);
    m.started = true;
    l.out_hdr = wire::encode(m.h);
    l.writing = true;
    l.inflight = it;
    const bool user = m.op != nullptr && len > 0;
    if (user) ++user_io_;
    const std::array<boost::asio::const_buffer, 2> bufs{boost::asio::buffer(l.out_hdr),
                                                        boost::asio::buffer(m.data + m.sent, len)};
    auto done = [this, &l, it, user, len](const boost::system::error_code& ec, std::size_t) {
      if (user) --user_io_;
      l.writing = false;
      if (closing_) return;
      if (failed_) {
        if (l.abort_pending && !ec) {
          l.abort_pending = false;
          l.outq.clear();
          queue_abort(l);
        } else {
          shut(l);
        }
        maybe_release();
        return;
      }
      if (ec) {
        l.down = true;
        fail_soon(semoe::detail::concat("sending to rank ", l.peer, " failed during ", context(l), ": ", ec.message(),
                                   " (it died or left the job)"));
        return;
      }
      auto& m = *it;
      m.sent += len;
      if (m.op) m.op->last_progress = steady::now();
      if (m.sent == m.bytes) {
        tcp_op* op = m.op;
        l.outq.erase(it);
        write_next(l);
        if (op) io_done(*op);
      } else {
        write_next(l);
      }
    };
    boost::asio::async_write(l.sock, bufs, detail::transfer_whole_frame{}, std::move(done));
  }

  // --- reading -------------------------------------------------------------

  void read_header(tcp_link& l) {
    boost::asio::async_read(l.sock, boost::asio::buffer(l.in_hdr),
                            [this, &l](const boost::system::error_code& ec, std::size_t n) {
                              if (closing_ || failed_) return;
                              if (ec) {
                                read_failed(l, ec, n, false);
                                return;
                              }
                              if (std::string why = wire::decode(l.in_hdr, l.cur, opt_.max_frame_bytes); !why.empty()) {
                                l.down = true;
                                fail(peer_problem(l, "sent a bad frame (" + why + ")"));
                                return;
                              }
                              on_header(l);
                            });
  }

  void read_failed(tcp_link& l, const boost::system::error_code& ec, std::size_t n, bool in_payload) {
    const bool closed = ec == boost::asio::error::eof || ec == boost::asio::error::connection_reset;
    const std::string how = closed ? "its connection closed" : "the connection failed (" + ec.message() + ")";
    l.down = true;
    bool involved = !l.posted.empty();
    for (const auto& m : l.outq) involved = involved || m.op != nullptr;
    if (in_payload) {
      fail_soon(peer_problem(l, semoe::detail::concat("sent a truncated frame: ", how, " after ", n, " of ",
                                                      l.cur.length, " payload bytes")));
    } else if (n > 0) {
      fail_soon(peer_problem(l, semoe::detail::concat("sent a truncated frame header: ", how, " after ", n, " of ",
                                                      wire::header_size, " bytes")));
    } else if (closed && !involved) {
      // A goodbye between collectives (the peer finished, or died idle): a
      // later collective that needs this rank fails at once.
      l.eof = true;
    } else if (closed) {
      fail_soon(semoe::detail::concat("rank ", l.peer, " closed its connection during ", context(l),
                                      ": it died or left the job"));
    } else {
      fail_soon(semoe::detail::concat("the connection to rank ", l.peer, " failed during ", context(l), ": ",
                                      ec.message()));
    }
  }

  /// The ways a matching frame can still disagree with this rank's op.
  std::string mismatch(const tcp_op& op, const wire::header& h, const tcp_link& l) const {
    const auto& m = op.group->members;
    const auto at = std::find(m.begin(), m.end(), l.peer);
    const int them = at == m.end() ? l.peer : static_cast<int>(at - m.begin());
    const int me = op.group->rank;
    if (h.type != op.kind)
      return semoe::detail::concat("rank ", them, " issued ", wire::kind_name(h.type), " as collective #", op.seq,
                                   " while rank ", me, " issued ", wire::kind_name(op.kind),
                                   "; every rank must issue the same collectives in the same order");
    if (h.dtype != op.dtype)
      return semoe::detail::concat(op.name(), ": rank ", them, " sends ", dtype_name(h.dtype), ", rank ", me,
                                   " expects ", dtype_name(op.dtype));
    if (h.arg != op.arg) {
      if (op.kind == wire::kind::broadcast)
        return semoe::detail::concat(op.name(), ": rank ", them, " broadcasts from root ", h.arg, " while rank ", me,
                                     " uses root ", op.arg);
      auto opn = [](std::uint32_t a) { return a < 3 ? comm::detail::op_name(static_cast<reduce_op>(a)) : "?"; };
      return semoe::detail::concat(op.name(), ": rank ", them, " reduces with ", opn(h.arg), " while rank ", me,
                                   " reduces with ", opn(op.arg));
    }
    return {};
  }

  std::string count_mismatch(const tcp_op& op, const recv_slot& s, std::uint64_t total) const {
    const int me = op.group->rank, them = s.group_peer;
    const std::uint64_t n = total / op.elem, want = s.expect / op.elem;
    switch (op.kind) {
      case wire::kind::all_to_all_v:
        return semoe::detail::concat(op.name(), ": rank ", them, " sends ", n, " elements to rank ", me,
                                     ", which expects ", want);
      case wire::kind::all_gather:
        return semoe::detail::concat(op.name(), ": rank ", them, " sends ", n, " elements, rank ", me, " expects ",
                                     want);
      case wire::kind::broadcast:
        return semoe::detail::concat(op.name(), ": root ", them, " sends ", n, " elements, rank ", me, " expects ",
                                     want);
      default:
        return semoe::detail::concat(op.name(), ": rank ", them, " sends a block of ", n, " elements, rank ", me,
                                     " expects ", want, "; every rank must pass the same number of elements");
    }
  }

  void on_header(tcp_link& l) {
    const wire::header& h = l.cur;
    if (h.type == wire::kind::abort) {
      l.abort_in.assign(h.length, '\0');
      boost::asio::async_read(l.sock, boost::asio::buffer(l.abort_in),
                              [this, &l](const boost::system::error_code& ec, std::size_t) {
                                if (closing_ || failed_) return;
                                l.down = true;
                                fail(semoe::detail::concat("rank ", l.peer, " aborted the job: ",
                                                           ec ? std::string("(its reason was lost)")
                                                              : wire::printable(l.abort_in)));
                              });
      return;
    }
    if (h.type == wire::kind::clear_to_send) {
      on_clear_to_send(l);
      return;
    }
    if (!wire::is_collective(h.type)) {
      l.down = true;
      fail(peer_problem(l, semoe::detail::concat("sent a ", wire::kind_name(h.type),
                                                 " frame after the connection was set up")));
      return;
    }
    const msg_key k{h.group, h.seq, h.step};
    if (auto it = l.posted.find(k); it != l.posted.end()) {
      read_into(l, k, it->second);
      return;
    }
    if (auto g = groups_.find(h.group); g != groups_.end()) {
      const tcp_group& gr = *g->second;
      if (h.seq < gr.posted) {
        auto a = gr.active.find(h.seq);
        if (a == gr.active.end()) {
          fail(peer_problem(l, semoe::detail::concat("sent a frame with an unexpected sequence number: ",
                                                     wire::kind_name(h.type), " #", h.seq,
                                                     " has already completed on rank ", me_)));
          return;
        }
        const tcp_op& op = *a->second;
        if (std::string why = mismatch(op, h, l); !why.empty()) {
          fail(why);
          return;
        }
        if (h.step <= op.step) {
          fail(peer_problem(l, semoe::detail::concat("sent an unexpected frame (step ", int(h.step), ") for ",
                                                     op.name(), ": rank ", me_,
                                                     " expects no (more) data from it in this step")));
          return;
        }
      } else if (h.seq - gr.posted >= max_seq_ahead) {
        fail(peer_problem(l, semoe::detail::concat("sent a frame with an unexpected sequence number ", h.seq,
                                                   " (this group has issued ", gr.posted, " collectives)")));
        return;
      }
    }
    stage(l);
  }

  void read_into(tcp_link& l, msg_key k, recv_slot& s) {
    const wire::header& h = l.cur;
    tcp_op& op = *s.op;
    if (std::string why = mismatch(op, h, l); !why.empty()) {
      fail(why);
      return;
    }
    if (h.total != s.expect) {
      fail(count_mismatch(op, s, h.total));
      return;
    }
    if (s.got + h.length > s.expect) {
      fail(peer_problem(l, "sent more data than its message holds"));
      return;
    }
    if (h.length == 0) {
      payload_done(l, k, 0);
      return;
    }
    ++user_io_;
    boost::asio::async_read(l.sock, boost::asio::buffer(s.dst + s.got, h.length), detail::transfer_whole_frame{},
                            [this, &l, k](const boost::system::error_code& ec, std::size_t n) {
                              --user_io_;
                              if (closing_) return;
                              if (failed_) {
                                maybe_release();
                                return;
                              }
                              if (ec) {
                                read_failed(l, ec, n, true);
                                return;
                              }
                              payload_done(l, k, n);
                            });
  }

  void payload_done(tcp_link& l, msg_key k, std::size_t n) {
    auto it = l.posted.find(k);
    recv_slot& s = it->second;
    s.got += n;
    tcp_op* op = s.op;
    const bool complete = s.got == s.expect;
    if (complete) l.posted.erase(it);
    read_header(l);
    if (complete) {
      io_done(*op);
    } else {
      op->last_progress = steady::now();
    }
  }

  void stage(tcp_link& l) {
    const wire::header& h = l.cur;
    if (unexpected_bytes_ + h.length > opt_.max_unexpected_bytes) {
      l.paused = true;  // backpressure: resumes when a receive consumes staged data
      return;
    }
    const msg_key k{h.group, h.seq, h.step};
    if (l.staged.size() >= max_staged_messages && !l.staged.contains(k)) {
      l.down = true;
      fail(peer_problem(l, semoe::detail::concat("sent more than ", max_staged_messages,
                                                 " messages that no receive on this rank has asked for")));
      return;
    }
    auto [it, fresh] = l.staged.try_emplace(k);
    staged_msg& st = it->second;
    if (fresh) {
      st.first = h;
    } else if (st.first.type != h.type || st.first.dtype != h.dtype || st.first.arg != h.arg ||
               st.first.total != h.total) {
      fail(peer_problem(l, "changed a message's header between its frames"));
      return;
    }
    if (st.size + h.length > h.total) {
      fail(peer_problem(l, "sent more data than its message holds"));
      return;
    }
    // Bounded: length <= max_frame_bytes, staged bytes <= max_unexpected_bytes.
    std::byte* into = st.extend(h.length, h.total);
    unexpected_bytes_ += h.length;
    early_bytes_.fetch_add(h.length, std::memory_order_relaxed);
    if (h.length == 0) {
      read_header(l);
      claim(l, k);
      return;
    }
    st.in_read = true;
    boost::asio::async_read(l.sock, boost::asio::buffer(into, h.length), detail::transfer_whole_frame{},
                            [this, &l, k](const boost::system::error_code& ec, std::size_t n) {
                              if (closing_ || failed_) return;
                              if (ec) {
                                read_failed(l, ec, n, true);
                                return;
                              }
                              l.staged[k].in_read = false;
                              read_header(l);
                              claim(l, k);
                            });
  }

  /// Move a staged message into its now-posted receive.
  void claim(tcp_link& l, msg_key k) {
    auto st = l.staged.find(k);
    auto it = l.posted.find(k);
    if (st == l.staged.end() || it == l.posted.end() || st->second.in_read) return;
    recv_slot& s = it->second;
    tcp_op& op = *s.op;
    if (std::string why = mismatch(op, st->second.first, l); !why.empty()) {
      fail(why);
      return;
    }
    if (st->second.first.total != s.expect) {
      fail(count_mismatch(op, s, st->second.first.total));
      return;
    }
    const std::size_t n = st->second.size;
    if (n) std::memcpy(s.dst + s.got, st->second.bytes.get(), n);
    s.got += n;
    unexpected_bytes_ -= n;
    l.staged.erase(st);
    if (s.got == s.expect) {
      l.posted.erase(it);
      io_done(op);
    }
    if (n) resume_paused();
  }

  void resume_paused() {
    for (auto& l : links_)
      if (l && l->paused && !failed_) {
        l->paused = false;
        on_header(*l);
      }
  }

  tcp_options opt_;
  int me_;
  boost::asio::io_context io_;
  boost::asio::steady_timer watchdog_, abort_timer_, grace_timer_;
  std::vector<std::unique_ptr<tcp_link>> links_;
  std::map<std::uint64_t, std::shared_ptr<tcp_group>> groups_;  // io thread
  std::shared_ptr<tcp_group> world_;
  steady::duration tick_{};
  // io thread state
  bool failed_ = false, released_ = false, closing_ = false;
  std::size_t user_io_ = 0;  ///< transfers in flight that touch callers' buffers
  std::size_t unexpected_bytes_ = 0;
  std::string abort_out_;
  std::string soon_reason_;  ///< a lost connection, reported after a short grace
  // shared with callers
  std::atomic<bool> failed_flag_{false};
  std::atomic<std::uint64_t> early_bytes_{0};
  std::mutex mutex_;
  std::condition_variable cv_;
  std::string reason_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_{io_.get_executor()};
  std::thread thread_;
};

}  // namespace detail

/// A rank of a multi-process job over TCP. Collectives start at once on the
/// io thread and complete, in issue order, when their request is waited on.
class tcp {
 public:
  using policy_kind = comm_tag;
  using options = tcp_options;

  /// Join the job described by `o` (blocks until the whole mesh is up).
  explicit tcp(const options& o)
      : world_(std::make_shared<detail::tcp_world>((validate(o), o))), group_(world_->world_group()) {}

  /// Join the job described by SEMOE_* (or Open MPI / Slurm) variables;
  /// `base` supplies the rest (timeout, chunk size, ...).
  static tcp from_env(options base = {}) { return tcp(tcp_options_from_env(std::move(base))); }

  int rank() const { return group_->rank; }
  int size() const { return static_cast<int>(group_->members.size()); }
  int local_rank() const { return rank() % local_size(); }
  int local_size() const { return group_->local_size; }
  int node() const { return rank() / local_size(); }
  /// This process's rank in the whole job (rank() is within the group).
  int world_rank() const { return world_->rank(); }
  /// Payload bytes this process received before their receive was posted
  /// and so buffered and copied once more (all groups; since it joined).
  /// With clear-to-send that is at most eager_bytes a message.
  std::uint64_t early_bytes() const { return world_->early_bytes(); }

  template <class T>
  request all_to_all_v_async(std::span<const T> send, std::span<const index_t> send_counts, std::span<T> recv,
                             std::span<const index_t> recv_counts) {
    const int P = size(), me = rank();
    const auto plan = detail::plan_exchange("semoe::comm::tcp::all_to_all_v", me, P, send_counts, send.size(),
                                            recv_counts, recv.size());
    const std::size_t self_send = plan.send_offset[me], self_recv = plan.recv_offset[me];
    // Copies: the counts may die before the io thread reads them.
    std::vector<index_t> sc(send_counts.begin(), send_counts.end()), rc(recv_counts.begin(), recv_counts.end());
    request req = start<T>(wire::kind::all_to_all_v, 0,
                    {[w = world_.get(), sc = std::move(sc), rc = std::move(rc), s = send.data(),
                      r = recv.data()](detail::tcp_op& op) {
                      const int P = static_cast<int>(sc.size()), me = op.group->rank;
                      std::vector<std::size_t> soff(P + 1, 0), roff(P + 1, 0);
                      for (int q = 0; q < P; ++q) {
                        soff[q + 1] = soff[q] + static_cast<std::size_t>(sc[q]);
                        roff[q + 1] = roff[q] + static_cast<std::size_t>(rc[q]);
                      }
                      // Receives first, so data lands straight in place; each rank
                      // starts with a different peer to spread the load.
                      for (int i = 1; i < P; ++i) {
                        const int q = (me + P - i) % P;
                        w->recv(op, q, r + roff[q], sizeof(T) * rc[q]);
                      }
                      for (int i = 1; i < P; ++i) {
                        const int q = (me + i) % P;
                        w->send(op, q, s + soff[q], sizeof(T) * sc[q]);
                      }
                    }});
    // This rank's own part is copied here, by the caller, while the io thread
    // moves the peers' parts: on the io thread it would delay every send.
    if (send_counts[me])
      std::memcpy(recv.data() + self_recv, send.data() + self_send, sizeof(T) * static_cast<std::size_t>(send_counts[me]));
    return req;
  }

  template <class T>
  request all_reduce_async(std::span<T> data, reduce_op rop = reduce_op::sum) {
    // Rank r owns chunk r: it receives everyone's chunk r, folds them in rank
    // order exactly as comm::local does, and sends the result to everyone.
    const std::size_t n = data.size();
    const int P = size();
    const std::size_t chunk = (n + P - 1) / P;
    auto range = [n, chunk](int r) {
      const std::size_t b = std::min(n, chunk * r);
      return std::pair{b, std::min(n, b + chunk)};
    };
    T* d = data.data();
    auto w = world_.get();
    return start<T>(
        wire::kind::all_reduce, static_cast<std::uint32_t>(rop),
        {[w, d, range](detail::tcp_op& op) {
           const int P = static_cast<int>(op.group->members.size()), me = op.group->rank;
           const auto [b, e] = range(me);
           const std::size_t len = e - b;
           op.scratch.resize(sizeof(T) * len * P);
           T* slots = reinterpret_cast<T*>(op.scratch.data());
           if (len) std::memcpy(slots + me * len, d + b, sizeof(T) * len);
           for (int q = 0; q < P; ++q)
             if (q != me) w->recv(op, q, slots + q * len, sizeof(T) * len);
           for (int i = 1; i < P; ++i) {
             const int q = (me + i) % P;
             const auto [qb, qe] = range(q);
             w->send(op, q, d + qb, sizeof(T) * (qe - qb));
           }
         },
         [w, d, range, rop](detail::tcp_op& op) {
           const int P = static_cast<int>(op.group->members.size()), me = op.group->rank;
           const auto [b, e] = range(me);
           const std::size_t len = e - b;
           T* slots = reinterpret_cast<T*>(op.scratch.data());
           for (int p = 1; p < P; ++p) comm::detail::reduce_into(slots, slots + p * len, len, rop);
           if (len) std::memcpy(d + b, slots, sizeof(T) * len);
           for (int q = 0; q < P; ++q)
             if (q != me) {
               const auto [qb, qe] = range(q);
               w->recv(op, q, d + qb, sizeof(T) * (qe - qb));
             }
           for (int i = 1; i < P; ++i) w->send(op, (me + i) % P, d + b, sizeof(T) * len);
         },
         [](detail::tcp_op& op) { std::vector<std::byte>().swap(op.scratch); }});
  }

  template <class T>
  request all_gather_async(std::span<const T> mine, std::span<T> all) {
    const int P = size();
    SEMOE_CHECK(all.size() == mine.size() * static_cast<std::size_t>(P),
                "semoe::comm::tcp::all_gather: output holds ", all.size(), " elements, expected ", P, " x ",
                mine.size());
    const std::size_t n = mine.size();
    return start<T>(wire::kind::all_gather, 0,
                    {[w = world_.get(), n, m = mine.data(), a = all.data()](detail::tcp_op& op) {
                      const int P = static_cast<int>(op.group->members.size()), me = op.group->rank;
                      if (n) std::memcpy(a + me * n, m, sizeof(T) * n);
                      for (int q = 0; q < P; ++q)
                        if (q != me) w->recv(op, q, a + q * n, sizeof(T) * n);
                      for (int i = 1; i < P; ++i) w->send(op, (me + i) % P, m, sizeof(T) * n);
                    }});
  }

  template <class T>
  request reduce_scatter_async(std::span<const T> in, std::span<T> out, reduce_op rop = reduce_op::sum) {
    const int P = size();
    SEMOE_CHECK(in.size() == out.size() * static_cast<std::size_t>(P),
                "semoe::comm::tcp::reduce_scatter: input holds ", in.size(), " elements, expected ", P, " x ",
                out.size());
    const std::size_t n = out.size();
    const T* i = in.data();
    T* o = out.data();
    auto w = world_.get();
    return start<T>(wire::kind::reduce_scatter, static_cast<std::uint32_t>(rop),
                    {[w, n, i](detail::tcp_op& op) {
                       const int P = static_cast<int>(op.group->members.size()), me = op.group->rank;
                       op.scratch.resize(sizeof(T) * n * P);
                       T* slots = reinterpret_cast<T*>(op.scratch.data());
                       for (int q = 0; q < P; ++q)
                         if (q != me) w->recv(op, q, slots + q * n, sizeof(T) * n);
                       for (int k = 1; k < P; ++k) {
                         const int q = (me + k) % P;
                         w->send(op, q, i + q * n, sizeof(T) * n);
                       }
                     },
                     [n, i, o, rop](detail::tcp_op& op) {
                       const int P = static_cast<int>(op.group->members.size()), me = op.group->rank;
                       const T* slots = reinterpret_cast<const T*>(op.scratch.data());
                       auto block = [&](int p) { return p == me ? i + me * n : slots + p * n; };
                       if (n) std::memcpy(o, block(0), sizeof(T) * n);
                       for (int p = 1; p < P; ++p) comm::detail::reduce_into(o, block(p), n, rop);
                       std::vector<std::byte>().swap(op.scratch);
                     }});
  }

  template <class T>
  request broadcast_async(std::span<T> data, int root) {
    SEMOE_CHECK(root >= 0 && root < size(), "semoe::comm::tcp::broadcast: root = ", root, " is not a rank of ",
                size());
    const std::size_t n = data.size();
    // Each non-root answers with an empty frame carrying its root, so ranks
    // that disagree on the root always meet a frame that says so.
    return start<T>(wire::kind::broadcast, static_cast<std::uint32_t>(root),
                    {[w = world_.get(), n, d = data.data(), root](detail::tcp_op& op) {
                      const int P = static_cast<int>(op.group->members.size()), me = op.group->rank;
                      if (me != root) {
                        w->recv(op, root, d, sizeof(T) * n);
                        w->send(op, root, nullptr, 0);
                        return;
                      }
                      for (int q = 0; q < P; ++q)
                        if (q != me) w->recv(op, q, nullptr, 0);
                      for (int i = 1; i < P; ++i) w->send(op, (me + i) % P, d, sizeof(T) * n);
                    }});
  }

  void barrier() {
    start<std::byte>(wire::kind::barrier, 0,
                     {[w = world_.get()](detail::tcp_op& op) {
                       const int P = static_cast<int>(op.group->members.size()), me = op.group->rank;
                       for (int q = 0; q < P; ++q)
                         if (q != me) w->recv(op, q, nullptr, 0);
                       for (int i = 1; i < P; ++i) w->send(op, (me + i) % P, nullptr, 0);
                     }},
                     /*typed=*/false)
        .wait();
  }

  /// Ranks with the same color form a group, ordered by (key, rank), over the
  /// existing connections; frames carry the group's id (same on every member).
  tcp split(int color, int key) {
    std::shared_ptr<detail::tcp_group> made;
    const std::int64_t mine[2] = {color, key};
    start<std::int64_t>(
        wire::kind::split, 0,
        {[w = world_.get(), mine](detail::tcp_op& op) {
           const int P = static_cast<int>(op.group->members.size()), me = op.group->rank;
           op.scratch.resize(sizeof(std::int64_t) * 2 * P);
           auto* all = reinterpret_cast<std::int64_t*>(op.scratch.data());
           all[2 * me] = mine[0];
           all[2 * me + 1] = mine[1];
           for (int q = 0; q < P; ++q)
             if (q != me) w->recv(op, q, all + 2 * q, sizeof(std::int64_t) * 2);
           for (int i = 1; i < P; ++i) w->send(op, (me + i) % P, &op.scratch[sizeof(std::int64_t) * 2 * me],
                                               sizeof(std::int64_t) * 2);
         },
         [w = world_.get(), &made](detail::tcp_op& op) {
           const auto* all = reinterpret_cast<const std::int64_t*>(op.scratch.data());
           made = build_group(w, op, all);
         }})
        .wait();
    return tcp(world_, made);
  }

  /// Complete every collective this handle has issued.
  void drain() {
    if (!group_->pending.empty()) complete_through(*world_, *group_, group_->pending.rbegin()->first);
  }

 private:
  tcp(std::shared_ptr<detail::tcp_world> w, std::shared_ptr<detail::tcp_group> g)
      : world_(std::move(w)), group_(std::move(g)) {}

  /// The groups of a split, computed identically on every member (io thread).
  static std::shared_ptr<detail::tcp_group> build_group(detail::tcp_world* w, const detail::tcp_op& op,
                                                        const std::int64_t* all) {
    const detail::tcp_group& parent = *op.group;
    const int P = static_cast<int>(parent.members.size()), me = parent.rank;
    std::vector<int> ranks;
    for (int r = 0; r < P; ++r)
      if (all[2 * r] == all[2 * me]) ranks.push_back(r);
    std::stable_sort(ranks.begin(), ranks.end(), [&](int a, int b) { return all[2 * a + 1] < all[2 * b + 1]; });
    // As comm::local: a group keeps the node structure only where it spans whole nodes evenly.
    int on_first_node = 0;
    for (int r : ranks) on_first_node += (r / parent.local_size) == (ranks[0] / parent.local_size);
    const int n = static_cast<int>(ranks.size());
    auto g = std::make_shared<detail::tcp_group>();
    g->local_size = (on_first_node > 0 && n % on_first_node == 0) ? on_first_node : n;
    for (int i = 0; i < n; ++i) {
      g->members.push_back(parent.members[ranks[i]]);
      if (ranks[i] == me) g->rank = i;
    }
    std::uint64_t id = detail::splitmix(detail::splitmix(parent.id ^ detail::splitmix(op.seq)) ^
                                        static_cast<std::uint64_t>(all[2 * me]));
    while (id == 0 || w->has_group(id)) id = detail::splitmix(id);  // never collides with a live group
    g->id = id;
    w->add_group(g);
    return g;
  }

  template <class T>
  request start(wire::kind k, std::uint32_t arg, std::vector<std::function<void(detail::tcp_op&)>> phases,
                bool typed = true) {
    world_->check_alive(k);
    auto op = std::make_shared<detail::tcp_op>();
    op->kind = k;
    op->seq = group_->next_seq++;
    op->dtype = typed ? detail::dtype_of<T>() : 0;
    op->elem = sizeof(T);
    op->arg = arg;
    op->group = group_.get();
    op->phases = std::move(phases);
    group_->pending.emplace(op->seq, op);
    world_->launch(group_.get(), op.get());
    // Copies, not `this`: a handle may be moved while its requests are pending.
    return request([w = world_, g = group_, seq = op->seq] { complete_through(*w, *g, seq); });
  }

  /// Collectives complete in issue order, whichever request is waited first.
  static void complete_through(detail::tcp_world& w, detail::tcp_group& g, std::uint64_t seq) {
    while (!g.pending.empty() && g.pending.begin()->first <= seq) {
      auto op = std::move(g.pending.begin()->second);
      g.pending.erase(g.pending.begin());
      w.wait(*op);
      if (!op->error.empty()) w.raise(*op);
    }
  }

  std::shared_ptr<detail::tcp_world> world_;
  std::shared_ptr<detail::tcp_group> group_;
};

static_assert(Communicator<tcp>);

}  // namespace semoe::comm
