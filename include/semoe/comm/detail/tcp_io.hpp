// semoe/comm/detail/tcp_io.hpp: comm::tcp's io thread on the wire: writing
// the next frame of a link's send queue, and reading (a header checked
// before anything is allocated, the payload into the posted buffer, or
// staged under the per-peer budget until the receive is posted). Run on the
// io thread only. Part of comm/detail/tcp_world.hpp, which includes it last.
#pragma once

#include "semoe/comm/detail/tcp_world.hpp"

namespace semoe::comm::detail {

// --- writing -------------------------------------------------------------

inline void tcp_world::write_next(tcp_link& l) {
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

inline void tcp_world::read_header(tcp_link& l) {
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

inline void tcp_world::read_failed(tcp_link& l, const boost::system::error_code& ec, std::size_t n, bool in_payload) {
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
inline std::string tcp_world::mismatch(const tcp_op& op, const wire::header& h, const tcp_link& l) const {
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

inline std::string tcp_world::count_mismatch(const tcp_op& op, const recv_slot& s, std::uint64_t total) const {
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

inline void tcp_world::on_header(tcp_link& l) {
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

inline void tcp_world::read_into(tcp_link& l, msg_key k, recv_slot& s) {
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

inline void tcp_world::payload_done(tcp_link& l, msg_key k, std::size_t n) {
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

inline void tcp_world::stage(tcp_link& l) {
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
inline void tcp_world::claim(tcp_link& l, msg_key k) {
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

inline void tcp_world::resume_paused() {
  for (auto& l : links_)
    if (l && l->paused && !failed_) {
      l->paused = false;
      on_header(*l);
    }
}

}  // namespace semoe::comm::detail
