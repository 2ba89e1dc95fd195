// semoe/comm/detail/tcp_world.hpp: the transport of comm::tcp, one per
// process: the mesh of connections, the io thread that drives every send and
// receive, collectives' progress and completion, clear-to-send, the watchdog
// that names a silent peer, and failure (an abort reason delivered to every
// peer). Its writing and reading paths are in tcp_io.hpp. Part of
// comm/tcp.hpp.
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
#include "semoe/comm/detail/tcp_link.hpp"
#include "semoe/comm/local.hpp"  // detail::reduce_into: the very fold comm::local uses
#include "semoe/comm/rendezvous.hpp"
#include "semoe/comm/wire.hpp"
#include "semoe/core/error.hpp"

namespace semoe::comm::detail {

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

  // --- writing and reading (tcp_io.hpp) -------------------------------------

  void write_next(tcp_link& l);
  void read_header(tcp_link& l);
  void read_failed(tcp_link& l, const boost::system::error_code& ec, std::size_t n, bool in_payload);
  /// The ways a matching frame can still disagree with this rank's op.
  std::string mismatch(const tcp_op& op, const wire::header& h, const tcp_link& l) const;
  std::string count_mismatch(const tcp_op& op, const recv_slot& s, std::uint64_t total) const;
  void on_header(tcp_link& l);
  void read_into(tcp_link& l, msg_key k, recv_slot& s);
  void payload_done(tcp_link& l, msg_key k, std::size_t n);
  void stage(tcp_link& l);
  /// Move a staged message into its now-posted receive.
  void claim(tcp_link& l, msg_key k);
  void resume_paused();

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

}  // namespace semoe::comm::detail

#include "semoe/comm/detail/tcp_io.hpp"
