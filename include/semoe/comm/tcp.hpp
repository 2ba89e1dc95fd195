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
#include "semoe/comm/detail/tcp_world.hpp"
#include "semoe/comm/local.hpp"  // detail::reduce_into: the very fold comm::local uses
#include "semoe/comm/rendezvous.hpp"
#include "semoe/comm/wire.hpp"
#include "semoe/core/error.hpp"

namespace semoe::comm {

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
