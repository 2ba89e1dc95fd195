// semoe/comm/local.hpp: P ranks as threads of one process. Each collective
// is a rendezvous: every rank posts its buffers, each rank then reads its
// peers' buffers directly (one memcpy per peer, no staging), and a final
// barrier keeps senders' buffers alive until every reader is done.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <typeinfo>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/comm/detail/exchange_plan.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/trace.hpp"

namespace semoe::comm {

namespace detail {

class local_world;

enum class local_kind { all_to_all_v, all_reduce, all_gather, reduce_scatter, broadcast, barrier, split };

inline const char* kind_name(local_kind k) {
  switch (k) {
    case local_kind::all_to_all_v: return "all_to_all_v";
    case local_kind::all_reduce: return "all_reduce";
    case local_kind::all_gather: return "all_gather";
    case local_kind::reduce_scatter: return "reduce_scatter";
    case local_kind::broadcast: return "broadcast";
    case local_kind::barrier: return "barrier";
    case local_kind::split: return "split";
  }
  return "?";
}

inline const char* op_name(reduce_op op) {
  switch (op) {
    case reduce_op::sum: return "sum";
    case reduce_op::max: return "max";
    case reduce_op::min: return "min";
  }
  return "?";
}

/// One collective in flight: what each rank posted, and phase counters.
struct local_op {
  explicit local_op(int n)
      : send(n), recv(n), send_counts(n), recv_counts(n), elems(n), color(n), key(n), groups(n), group_rank(n) {}
  local_kind kind{};
  const std::type_info* type = nullptr;
  reduce_op op = reduce_op::sum;
  int root = 0;
  std::vector<const void*> send;
  std::vector<void*> recv;
  std::vector<const index_t*> send_counts, recv_counts;
  std::vector<std::size_t> elems;
  std::vector<int> color, key;
  std::vector<std::shared_ptr<local_world>> groups;
  std::vector<int> group_rank;
  std::vector<std::byte> scratch;
  int phase[4] = {0, 0, 0, 0};
  int left = 0;
  int reading = 0;  ///< ranks inside their work, reading peers' buffers
};

class local_world {
 public:
  local_world(int size, int local_size) : size_(size), local_size_(local_size) {}
  int size() const { return size_; }
  int local_size() const { return local_size_; }

  /// Post rank's part of collective `seq`; returns the op (stable in the map).
  template <class Fill>
  local_op& post(std::uint64_t seq, int rank, local_kind kind, const std::type_info* type, Fill fill) {
    std::lock_guard lock(mutex_);
    throw_if_aborted();
    auto it = ops_.try_emplace(seq, size_).first;
    local_op& op = it->second;
    if (op.phase[0] == 0) {
      op.kind = kind;
      op.type = type;
    } else {
      SEMOE_CHECK(op.kind == kind && op.type == type, "semoe::comm::local: collective #", seq, ": rank ", rank,
                  " called ", kind_name(kind), " while an earlier rank called ", kind_name(op.kind),
                  " (or with another element type); every rank must issue the same collectives in the same order");
    }
    fill(op);
    arrive(op, 0);
    return op;
  }

  /// Count this rank into `phase` of `op` and wait for all ranks.
  void sync(local_op& op, int phase) {
    std::unique_lock lock(mutex_);
    arrive(op, phase);
    cv_.wait(lock, [&] { return aborted_ || op.phase[phase] == size_; });
    throw_if_aborted();
  }
  /// Wait until every rank has posted (phase 0) without counting again; the
  /// caller then reads peers' buffers until done_reading().
  void wait_posted(local_op& op) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return aborted_ || op.phase[0] == size_; });
    if (aborted_) leave_aborted(lock, op);
    ++op.reading;
  }
  void done_reading(local_op& op) {
    std::lock_guard lock(mutex_);
    if (--op.reading == 0) cv_.notify_all();
  }
  /// This rank's work failed: abort the job, and throw only once no peer still
  /// reads this rank's buffers (the caller frees them when it unwinds).
  void fail_reading(local_op& op, const std::string& why) {
    abort(why);
    done_reading(op);
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return op.reading == 0; });
  }
  /// The last phase: the last rank out frees the op.
  void finish(std::uint64_t seq, local_op& op) {
    std::unique_lock lock(mutex_);
    arrive(op, 3);
    cv_.wait(lock, [&] { return aborted_ || op.phase[3] == size_; });
    if (op.phase[3] != size_) leave_aborted(lock, op);
    if (++op.left == size_) ops_.erase(seq);
  }

  /// Run f under the world lock (split builds its groups there).
  template <class F>
  void locked(F f) {
    std::lock_guard lock(mutex_);
    f();
  }

  /// Abort every collective of this world and of every group split from it,
  /// so a rank blocked in a subgroup is released when the job fails.
  void abort(const std::string& why) {
    std::vector<std::shared_ptr<local_world>> children;
    {
      std::lock_guard lock(mutex_);
      if (aborted_) return;
      aborted_ = true;
      reason_ = why;
      for (auto& w : children_)
        if (auto c = w.lock()) children.push_back(std::move(c));
    }
    cv_.notify_all();
    for (auto& c : children) c->abort(why);
  }

  /// Record a group split from this world; the caller holds the lock (locked()).
  void adopt_locked(const std::shared_ptr<local_world>& child) { children_.push_back(child); }

 private:
  void arrive(local_op& op, int phase) {
    if (++op.phase[phase] == size_) cv_.notify_all();
  }
  /// An aborted collective: wait until no rank reads from `op`'s buffers, then throw.
  [[noreturn]] void leave_aborted(std::unique_lock<std::mutex>& lock, local_op& op) {
    cv_.wait(lock, [&] { return op.reading == 0; });
    semoe::detail::fail("semoe::comm::local: the job was aborted: ", reason_);
  }
  void throw_if_aborted() const {
    if (aborted_) semoe::detail::fail("semoe::comm::local: the job was aborted: ", reason_);
  }

  int size_, local_size_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::uint64_t, local_op> ops_;
  bool aborted_ = false;
  std::string reason_;
  std::vector<std::weak_ptr<local_world>> children_;
};

template <class T>
void reduce_into(T* acc, const T* x, std::size_t n, reduce_op op) {
  switch (op) {
    case reduce_op::sum: for (std::size_t i = 0; i < n; ++i) acc[i] += x[i]; break;
    case reduce_op::max: for (std::size_t i = 0; i < n; ++i) acc[i] = std::max(acc[i], x[i]); break;
    case reduce_op::min: for (std::size_t i = 0; i < n; ++i) acc[i] = std::min(acc[i], x[i]); break;
  }
}

}  // namespace detail

/// A rank's handle on a world of P thread-ranks. Collectives post at once and
/// complete in issue order on the rank's progress thread, whether or not
/// anyone waits on their requests.
class local {
 public:
  /// The trace lane (tid) of each rank's progress thread: one event per
  /// collective, named "<collective> #<issue number>", pid the rank.
  static constexpr int progress_lane = 1003;

  using policy_kind = comm_tag;

  struct options {
    int local_size = 0;  ///< ranks per simulated node; 0: all ranks on one node
  };

  /// Make the handles of a P-rank world (hand handle r to thread r).
  static std::vector<local> make_world(int ranks) { return make_world(ranks, options{}); }
  static std::vector<local> make_world(int ranks, options opt) {
    SEMOE_CHECK(ranks >= 1, "semoe::comm::local: ranks = ", ranks, ": expected >= 1");
    const int ls = opt.local_size > 0 ? opt.local_size : ranks;
    SEMOE_CHECK(ranks % ls == 0, "semoe::comm::local: local_size = ", ls, " does not divide ranks = ", ranks);
    auto world = std::make_shared<detail::local_world>(ranks, ls);
    std::vector<local> handles;
    for (int r = 0; r < ranks; ++r) handles.emplace_back(world, r);
    return handles;
  }

  /// Run f(comm) on `ranks` threads. The first exception aborts the world, so
  /// ranks blocked in a collective fail too instead of hanging; it is rethrown.
  template <class F>
  static void run(int ranks, F&& f) {
    run(ranks, std::forward<F>(f), options{});
  }
  template <class F>
  static void run(int ranks, F&& f, options opt) {
    auto handles = make_world(ranks, opt);
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(ranks));
    std::vector<std::thread> threads;
    for (int r = 0; r < ranks; ++r)
      threads.emplace_back([&, r] {
        try {
          f(handles[r]);
          handles[r].drain();
        } catch (const std::exception& e) {
          errors[r] = std::current_exception();
          handles[r].world_->abort(semoe::detail::concat("rank ", r, " failed: ", e.what()));
        } catch (...) {  // not a std::exception: still abort, never std::terminate
          errors[r] = std::current_exception();
          handles[r].world_->abort(semoe::detail::concat("rank ", r, " failed: a non-standard exception"));
        }
      });
    for (auto& t : threads) t.join();
    // Prefer the root cause over the "aborted" errors it triggered on peers.
    for (auto& e : errors) {
      if (!e) continue;
      try {
        std::rethrow_exception(e);
      } catch (const error& err) {
        if (std::string(err.what()).find("was aborted") == std::string::npos) throw;
      }
    }
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
  }

  local(std::shared_ptr<detail::local_world> world, int rank)
      : world_(std::move(world)), state_(std::make_shared<rank_state>()), rank_(rank) {}

  int rank() const { return rank_; }
  int size() const { return world_->size(); }
  int local_rank() const { return rank_ % world_->local_size(); }
  int local_size() const { return world_->local_size(); }
  int node() const { return rank_ / world_->local_size(); }

  template <class T>
  request all_to_all_v_async(std::span<const T> send, std::span<const index_t> send_counts, std::span<T> recv,
                             std::span<const index_t> recv_counts) {
    const int P = size();
    detail::plan_exchange("semoe::comm::local::all_to_all_v", rank_, P, send_counts, send.size(), recv_counts,
                          recv.size());
    return start(detail::local_kind::all_to_all_v, &typeid(T),
                 [&](detail::local_op& op) {
                   op.send[rank_] = send.data();
                   op.recv[rank_] = recv.data();
                   op.send_counts[rank_] = send_counts.data();
                   op.recv_counts[rank_] = recv_counts.data();
                 },
                 [me = rank_, P](detail::local_op& op) {
                   T* out = static_cast<T*>(op.recv[me]);
                   for (int p = 0; p < P; ++p) {
                     const index_t* sc = op.send_counts[p];
                     index_t src_off = 0;
                     for (int q = 0; q < me; ++q) src_off += sc[q];
                     const index_t n = sc[me];
                     SEMOE_CHECK(n == op.recv_counts[me][p], "semoe::comm::local::all_to_all_v: rank ", p,
                                 " sends ", n, " elements to rank ", me, ", which expects ",
                                 op.recv_counts[me][p]);
                     if (n) std::memcpy(out, static_cast<const T*>(op.send[p]) + src_off, sizeof(T) * n);
                     out += n;
                   }
                 });
  }

  template <class T>
  request all_reduce_async(std::span<T> data, reduce_op rop = reduce_op::sum) {
    const int P = size();
    return start(detail::local_kind::all_reduce, &typeid(T),
                 [&](detail::local_op& op) {
                   check_same_op(op, rop, "all_reduce");
                   op.send[rank_] = data.data();
                   op.recv[rank_] = data.data();
                   op.elems[rank_] = data.size();
                   op.op = rop;
                 },
                 [me = rank_, world = world_.get(), P](detail::local_op& op) {
                   const std::size_t n = op.elems[me];
                   for (int p = 0; p < P; ++p)
                     SEMOE_CHECK(op.elems[p] == n, "semoe::comm::local::all_reduce: rank ", p, " reduces ",
                                 op.elems[p], " elements, rank ", me, " ", n);
                   // Rank r reduces chunk r of everyone's data in rank order (the
                   // same sum on every rank), then everyone copies all chunks back.
                   world->locked([&] {
                     if (op.scratch.size() != n * sizeof(T)) op.scratch.resize(n * sizeof(T));
                   });
                   const std::size_t chunk = (n + P - 1) / P, b = std::min(n, chunk * me),
                                     e = std::min(n, b + chunk);
                   T* acc = reinterpret_cast<T*>(op.scratch.data());
                   if (e > b) {
                     std::memcpy(acc + b, static_cast<const T*>(op.send[0]) + b, sizeof(T) * (e - b));
                     for (int p = 1; p < P; ++p)
                       detail::reduce_into(acc + b, static_cast<const T*>(op.send[p]) + b, e - b, op.op);
                   }
                   world->sync(op, 1);
                   if (n) std::memcpy(op.recv[me], acc, sizeof(T) * n);
                 });
  }

  template <class T>
  request all_gather_async(std::span<const T> mine, std::span<T> all) {
    const int P = size();
    SEMOE_CHECK(all.size() == mine.size() * static_cast<std::size_t>(P), "semoe::comm::local::all_gather: output holds ",
                all.size(), " elements, expected ", P, " x ", mine.size());
    return start(detail::local_kind::all_gather, &typeid(T),
                 [&](detail::local_op& op) {
                   op.send[rank_] = mine.data();
                   op.recv[rank_] = all.data();
                   op.elems[rank_] = mine.size();
                 },
                 [me = rank_, P](detail::local_op& op) {
                   const std::size_t n = op.elems[me];
                   for (int p = 0; p < P; ++p) {
                     SEMOE_CHECK(op.elems[p] == n, "semoe::comm::local::all_gather: rank ", p, " sends ", op.elems[p],
                                 " elements, rank ", me, " ", n);
                     if (n) std::memcpy(static_cast<T*>(op.recv[me]) + p * n, op.send[p], sizeof(T) * n);
                   }
                 });
  }

  template <class T>
  request reduce_scatter_async(std::span<const T> in, std::span<T> out, reduce_op rop = reduce_op::sum) {
    const int P = size();
    SEMOE_CHECK(in.size() == out.size() * static_cast<std::size_t>(P), "semoe::comm::local::reduce_scatter: input holds ",
                in.size(), " elements, expected ", P, " x ", out.size());
    return start(detail::local_kind::reduce_scatter, &typeid(T),
                 [&](detail::local_op& op) {
                   check_same_op(op, rop, "reduce_scatter");
                   op.send[rank_] = in.data();
                   op.recv[rank_] = out.data();
                   op.elems[rank_] = out.size();
                   op.op = rop;
                 },
                 [me = rank_, P](detail::local_op& op) {
                   const std::size_t n = op.elems[me];
                   T* acc = static_cast<T*>(op.recv[me]);
                   for (int p = 0; p < P; ++p)
                     SEMOE_CHECK(op.elems[p] == n, "semoe::comm::local::reduce_scatter: rank ", p, " receives ",
                                 op.elems[p], " elements, rank ", me, " ", n);
                   if (!n) return;
                   std::memcpy(acc, static_cast<const T*>(op.send[0]) + me * n, sizeof(T) * n);
                   for (int p = 1; p < P; ++p)
                     detail::reduce_into(acc, static_cast<const T*>(op.send[p]) + me * n, n, op.op);
                 });
  }

  template <class T>
  request broadcast_async(std::span<T> data, int root) {
    SEMOE_CHECK(root >= 0 && root < size(), "semoe::comm::local::broadcast: root = ", root, " is not a rank of ",
                size());
    return start(detail::local_kind::broadcast, &typeid(T),
                 [&](detail::local_op& op) {
                   // Fill runs under the world lock; phase[0] counts the ranks posted before.
                   SEMOE_CHECK(op.phase[0] == 0 || op.root == root, "semoe::comm::local::broadcast: rank ", rank_,
                               " broadcasts from root ", root, " while an earlier rank used root ", op.root);
                   op.send[rank_] = data.data();
                   op.recv[rank_] = data.data();
                   op.elems[rank_] = data.size();
                   op.root = root;
                 },
                 [me = rank_](detail::local_op& op) {
                   const std::size_t n = op.elems[me];
                   SEMOE_CHECK(op.elems[op.root] == n, "semoe::comm::local::broadcast: root sends ", op.elems[op.root],
                               " elements, rank ", me, " expects ", n);
                   if (me != op.root && n)
                     std::memcpy(op.recv[me], op.send[op.root], sizeof(T) * n);
                 });
  }

  void barrier() {
    start(detail::local_kind::barrier, &typeid(void), [](detail::local_op&) {}, [](detail::local_op&) {}).wait();
  }

  /// Ranks with the same color form a group, ordered by (key, rank).
  local split(int color, int key) {
    std::shared_ptr<detail::local_world> group;
    int group_rank = 0;
    start(detail::local_kind::split, &typeid(void),
          [&](detail::local_op& op) {
            op.color[rank_] = color;
            op.key[rank_] = key;
          },
          [&, this](detail::local_op& op) {
            world_->locked([&] {
              if (!op.groups[rank_]) build_groups(op);
              group = op.groups[rank_];
              group_rank = op.group_rank[rank_];
            });
          })
        .wait();
    return local(group, group_rank);
  }

  /// Complete every collective this rank has issued.
  void drain() {
    if (state_->next_seq > 0) wait_for(*state_, state_->next_seq - 1);
  }

 private:
  /// One rank's issued collectives and the thread that runs them: started
  /// with the first collective, it waits for the peers to post and does this
  /// rank's copies in issue order, so an async collective completes while
  /// the caller computes (on processes, comm::tcp's io thread does the same).
  struct rank_state {
    std::uint64_t next_seq = 0;  // caller's thread only
    std::mutex m;
    std::condition_variable cv;
    std::map<std::uint64_t, std::function<void()>> pending;  // under m
    std::map<std::uint64_t, std::exception_ptr> failed;      // under m
    std::uint64_t done = 0;                                  // [0, done) have run; under m
    bool stop = false;
    std::thread worker;

    rank_state() = default;
    rank_state(const rank_state&) = delete;
    rank_state& operator=(const rank_state&) = delete;
    ~rank_state() {
      {
        std::lock_guard lk(m);
        stop = true;
      }
      cv.notify_all();
      if (worker.joinable()) worker.join();
    }

    void run() {
      std::unique_lock lk(m);
      for (;;) {
        cv.wait(lk, [&] { return stop || (!pending.empty() && pending.begin()->first == done); });
        if (pending.empty() || pending.begin()->first != done) return;  // stopping, nothing left to run
        auto f = std::move(pending.begin()->second);
        pending.erase(pending.begin());
        lk.unlock();
        std::exception_ptr e;
        try {
          f();
        } catch (...) {
          e = std::current_exception();
        }
        lk.lock();
        if (e) failed.emplace(done, e);
        ++done;
        cv.notify_all();
      }
    }
  };

  void check_same_op(const detail::local_op& op, reduce_op rop, const char* what) const {
    SEMOE_CHECK(op.phase[0] == 0 || op.op == rop, "semoe::comm::local::", what, ": rank ", rank_, " reduces with ",
                detail::op_name(rop), " while an earlier rank used ", detail::op_name(op.op));
  }

  template <class Fill, class Work>
  request start(detail::local_kind kind, const std::type_info* type, Fill fill, Work work) {
    const std::uint64_t seq = state_->next_seq++;
    detail::local_op* op = &world_->post(seq, rank_, kind, type, fill);
    rank_state& st = *state_;
    std::lock_guard lk(st.m);
    if (!st.worker.joinable()) {
      trace::recorder::instance().name_lane(rank_, progress_lane, "collectives (comm::local)");
      st.worker = std::thread([&st] { st.run(); });
    }
    // Copies, not `this`: a handle may be moved while its requests are pending.
    st.pending.emplace(seq, [world = world_, me = rank_, seq, op, kind, work]() mutable {
      world->wait_posted(*op);
      auto& rec = trace::recorder::instance();
      const double t0 = rec.now_us();
      try {
        work(*op);
      } catch (const std::exception& e) {
        world->fail_reading(*op, semoe::detail::concat("rank ", me, ": ", e.what()));
        throw;
      }
      world->done_reading(*op);
      world->finish(seq, *op);
      if (rec.enabled())  // from every rank's posting to this rank's copies done
        rec.add({std::string(detail::kind_name(kind)) + " #" + std::to_string(seq), "comm", t0, rec.now_us() - t0, me,
                 progress_lane});
    });
    st.cv.notify_all();
    return request([st = state_, seq] { wait_for(*st, seq); }, [st = state_, seq] {
      std::lock_guard lk(st->m);
      return st->done > seq;
    });
  }

  /// Collectives complete in issue order; waiting for one rethrows its error.
  static void wait_for(rank_state& st, std::uint64_t seq) {
    std::unique_lock lk(st.m);
    st.cv.wait(lk, [&] { return st.done > seq; });
    if (auto it = st.failed.find(seq); it != st.failed.end()) {
      auto e = it->second;
      st.failed.erase(it);
      std::rethrow_exception(e);
    }
  }

  void build_groups(detail::local_op& op) {
    const int P = size();
    std::map<int, std::vector<int>> members;
    for (int r = 0; r < P; ++r) members[op.color[r]].push_back(r);
    for (auto& [c, ranks] : members) {
      std::stable_sort(ranks.begin(), ranks.end(), [&](int a, int b) { return op.key[a] < op.key[b]; });
      // A group keeps the node structure only where it spans whole nodes evenly.
      int on_my_node = 0;
      for (int r : ranks) on_my_node += (r / local_size()) == (ranks[0] / local_size());
      const int n = static_cast<int>(ranks.size());
      const int ls = (on_my_node > 0 && n % on_my_node == 0) ? on_my_node : n;
      auto w = std::make_shared<detail::local_world>(n, ls);
      world_->adopt_locked(w);
      for (int i = 0; i < n; ++i) {
        op.groups[ranks[i]] = w;
        op.group_rank[ranks[i]] = i;
      }
    }
  }

  std::shared_ptr<detail::local_world> world_;
  std::shared_ptr<rank_state> state_;
  int rank_;
};

static_assert(Communicator<local>);

}  // namespace semoe::comm
