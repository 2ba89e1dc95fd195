// semoe/comm/mpi.hpp: one process per rank over MPI, the engine CPU clusters
// already run (mpirun, srun; shared memory inside a node, the fabric's
// transport between nodes). Every collective is a non-blocking MPI
// collective behind a comm::request: waiting on the request waits on it, and
// ready() tests it (MPI makes progress then).
//
// Reductions fold in rank order by default (options.deterministic): each
// rank owns a chunk, receives every rank's piece of it by MPI_Ialltoallv,
// adds them up 0..P-1 and the chunks are all-gathered back; the bytes moved
// are those of a ring all-reduce, and the results are bit for bit those of
// comm::local and comm::tcp, whatever the rank count or the MPI library's
// algorithm choice. deterministic = false uses MPI_Iallreduce and
// MPI_Ireduce_scatter_block, the library's tuned algorithms, whose sums may
// round differently from one rank count to another.
//
// Errors: semoe's communicators return MPI errors instead of aborting
// (MPI_ERRORS_RETURN), and each becomes a semoe::error naming the call and
// MPI's error string. A rank that dies is the launcher's to handle: mpirun
// and srun end the job and name the process; MPI does not promise that the
// survivors' calls return, so there is no per-collective timeout here (see
// comm::tcp for a communicator that names a dead or silent peer itself).
#pragma once

// The MPI C API only: keep Open MPI's and MPICH's deprecated C++ bindings out.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/comm/local.hpp"  // detail::reduce_into: the very fold comm::local uses
#include "semoe/core/error.hpp"

namespace semoe::comm {

namespace detail {

/// An MPI return code other than MPI_SUCCESS as a semoe::error naming the call.
inline void mpi_check(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  ::semoe::detail::fail("semoe::comm::mpi: ", call, " failed: ",
                        len ? std::string(text, static_cast<std::size_t>(len)) : "error code " + std::to_string(rc));
}

/// The MPI datatype of T: the matching builtin for arithmetic types, else
/// sizeof(T) contiguous bytes (committed once; moves only, never reduces).
template <class T>
MPI_Datatype mpi_type() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<U, double>) return MPI_DOUBLE;
  else if constexpr (std::is_integral_v<U> && std::is_signed_v<U> && sizeof(U) == 1) return MPI_INT8_T;
  else if constexpr (std::is_integral_v<U> && std::is_signed_v<U> && sizeof(U) == 2) return MPI_INT16_T;
  else if constexpr (std::is_integral_v<U> && std::is_signed_v<U> && sizeof(U) == 4) return MPI_INT32_T;
  else if constexpr (std::is_integral_v<U> && std::is_signed_v<U> && sizeof(U) == 8) return MPI_INT64_T;
  else if constexpr (std::is_integral_v<U> && sizeof(U) == 1) return MPI_UINT8_T;
  else if constexpr (std::is_integral_v<U> && sizeof(U) == 2) return MPI_UINT16_T;
  else if constexpr (std::is_integral_v<U> && sizeof(U) == 4) return MPI_UINT32_T;
  else if constexpr (std::is_integral_v<U> && sizeof(U) == 8) return MPI_UINT64_T;
  else {
    static_assert(std::is_trivially_copyable_v<U>, "semoe::comm::mpi: elements must be trivially copyable");
    static const MPI_Datatype bytes = [] {
      MPI_Datatype t;
      mpi_check(MPI_Type_contiguous(static_cast<int>(sizeof(U)), MPI_BYTE, &t), "MPI_Type_contiguous");
      mpi_check(MPI_Type_commit(&t), "MPI_Type_commit");
      return t;
    }();
    return bytes;
  }
}

inline MPI_Op mpi_op(reduce_op op) {
  switch (op) {
    case reduce_op::max: return MPI_MAX;
    case reduce_op::min: return MPI_MIN;
    case reduce_op::sum: break;
  }
  return MPI_SUM;
}

/// An element count or displacement as MPI's int, or an error naming it.
inline int mpi_count(std::uint64_t n, const char* what) {
  SEMOE_CHECK(n <= static_cast<std::uint64_t>(INT_MAX), "semoe::comm::mpi: ", what, " = ", n,
              " elements exceeds MPI's int counts (2^31 - 1); split the message");
  return static_cast<int>(n);
}

/// One collective in flight: its MPI request, what it must keep alive, and
/// an optional second phase started when the first completes (the fold and
/// all-gather of a rank-ordered reduction).
struct mpi_op_state {
  MPI_Request req = MPI_REQUEST_NULL;
  const char* call = "";
  std::vector<int> counts[4];  // send/recv counts and displacements
  std::vector<std::byte> scratch, chunk;
  std::function<void(mpi_op_state&)> then;  // after req completes; may start a new req
  bool done = false;

  void wait() {
    while (!done) {
      MPI_Status st;
      mpi_check(MPI_Wait(&req, &st), call);
      advance();
    }
  }
  bool test() {
    while (!done) {
      int flag = 0;
      MPI_Status st;
      mpi_check(MPI_Test(&req, &flag, &st), call);
      if (!flag) return false;
      advance();
    }
    return true;
  }

 private:
  void advance() {
    if (auto f = std::exchange(then, nullptr)) {
      f(*this);  // may set req and a next phase
      done = req == MPI_REQUEST_NULL && !then;
    } else {
      done = true;
    }
  }
};

inline request mpi_request(std::shared_ptr<mpi_op_state> op) {
  return request([op] { op->wait(); }, [op] { return op->test(); });
}

/// MPI_Init_thread with the level semoe needs, once per process, and
/// MPI_Finalize at exit when semoe initialized MPI (not when the program did).
inline void ensure_mpi_initialized() {
  int initialized = 0;
  mpi_check(MPI_Initialized(&initialized), "MPI_Initialized");
  if (initialized) {
    int provided = 0;
    mpi_check(MPI_Query_thread(&provided), "MPI_Query_thread");
    SEMOE_CHECK(provided >= MPI_THREAD_SERIALIZED, "semoe::comm::mpi: MPI was initialized with thread level ", provided,
                "; semoe needs MPI_THREAD_SERIALIZED (MPI_Init_thread with MPI_THREAD_SERIALIZED or higher)");
    return;
  }
  // semoe calls MPI from one thread at a time: the thread that issues a
  // collective and the one that waits on it may differ, never at once.
  int provided = 0;
  mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
  SEMOE_CHECK(provided >= MPI_THREAD_SERIALIZED, "semoe::comm::mpi: the MPI library provides thread level ", provided,
              "; semoe needs MPI_THREAD_SERIALIZED");
  std::atexit([] {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  });
}

inline bool mpi_finalized() {
  int f = 0;
  MPI_Finalized(&f);
  return f != 0;
}

}  // namespace detail

struct mpi_options {
  /// Reductions fold in rank order: comm::local's and comm::tcp's bits.
  /// false: MPI_Iallreduce / MPI_Ireduce_scatter_block.
  bool deterministic = true;
  /// Ranks per node; 0: the ranks that share memory with this one
  /// (MPI_Comm_split_type), when the job places them node by node.
  int local_size = 0;
};

/// A rank of an MPI job. Handles copy cheaply and share one communicator.
class mpi {
 public:
  using policy_kind = comm_tag;
  using options = mpi_options;

  /// Initializes MPI where the program has not (MPI_THREAD_SERIALIZED) and
  /// joins MPI_COMM_WORLD. Works under mpirun, mpiexec and srun.
  static mpi from_env(options o = {}) {
    detail::ensure_mpi_initialized();
    return mpi(MPI_COMM_WORLD, o);
  }

  /// A handle on a duplicate of `comm` (semoe's traffic never matches the
  /// caller's own messages), with errors returned rather than fatal.
  explicit mpi(MPI_Comm comm, options o = {}) {
    adopt(comm, o);
    topology();
  }

  int rank() const { return s_->rank; }
  int size() const { return s_->size; }
  int local_rank() const { return s_->rank % s_->local_size; }
  int local_size() const { return s_->local_size; }
  int node() const { return s_->rank / s_->local_size; }
  const options& opts() const { return s_->opt; }
  /// The MPI communicator (a duplicate owned by this handle and its copies).
  MPI_Comm native() const { return s_->comm; }

  /// Exchange: send_counts[q] elements to rank q (in rank order in send),
  /// recv_counts[p] elements from rank p.
  template <class T>
  request all_to_all_v_async(std::span<const T> send, std::span<const index_t> send_counts, std::span<T> recv,
                             std::span<const index_t> recv_counts) {
    const int P = size();
    SEMOE_CHECK(static_cast<int>(send_counts.size()) == P && static_cast<int>(recv_counts.size()) == P,
                "semoe::comm::mpi::all_to_all_v: counts have ", send_counts.size(), " and ", recv_counts.size(),
                " entries; expected one per rank (", P, ")");
    auto op = std::make_shared<detail::mpi_op_state>();
    op->call = "MPI_Ialltoallv";
    fill_counts(op->counts[0], op->counts[1], send_counts, send.size(), "all_to_all_v send");
    fill_counts(op->counts[2], op->counts[3], recv_counts, recv.size(), "all_to_all_v receive");
    const MPI_Datatype t = detail::mpi_type<T>();
    detail::mpi_check(MPI_Ialltoallv(send.data(), op->counts[0].data(), op->counts[1].data(), t, recv.data(),
                                     op->counts[2].data(), op->counts[3].data(), t, s_->comm, &op->req),
                      op->call);
    return detail::mpi_request(std::move(op));
  }

  template <class T>
  request all_reduce_async(std::span<T> data, reduce_op rop = reduce_op::sum) {
    auto op = std::make_shared<detail::mpi_op_state>();
    const MPI_Datatype t = detail::mpi_type<T>();
    const int n = detail::mpi_count(data.size(), "all_reduce size");
    if (!s_->opt.deterministic || size() == 1) {
      op->call = "MPI_Iallreduce";
      detail::mpi_check(MPI_Iallreduce(MPI_IN_PLACE, data.data(), n, t, detail::mpi_op(rop), s_->comm, &op->req),
                        op->call);
      return detail::mpi_request(std::move(op));
    }
    // Chunk q of data is owned by rank q: everyone's pieces of it arrive by
    // one all-to-all, are folded in rank order, and go back by an all-gather.
    const int P = size(), me = rank();
    auto& sc = op->counts[0];
    auto& sd = op->counts[1];
    sc.resize(static_cast<std::size_t>(P));
    sd.resize(static_cast<std::size_t>(P));
    for (int q = 0; q < P; ++q) {
      const auto [b, e] = chunk(n, q);
      sc[q] = e - b;
      sd[q] = b;
    }
    const int mine = sc[me];
    op->counts[2].assign(static_cast<std::size_t>(P), mine);  // from every rank, my chunk's length
    op->counts[3].resize(static_cast<std::size_t>(P));
    for (int p = 0; p < P; ++p) op->counts[3][p] = p * mine;
    op->scratch.resize(sizeof(T) * static_cast<std::size_t>(P) * static_cast<std::size_t>(mine));
    op->chunk.resize(sizeof(T) * static_cast<std::size_t>(mine));
    op->call = "MPI_Ialltoallv (all_reduce)";
    T* base = data.data();
    detail::mpi_check(MPI_Ialltoallv(base, sc.data(), sd.data(), t, op->scratch.data(), op->counts[2].data(),
                                     op->counts[3].data(), t, s_->comm, &op->req),
                      op->call);
    op->then = [base, t, P, mine, rop, comm = s_->comm](detail::mpi_op_state& o) {
      auto* parts = reinterpret_cast<const T*>(o.scratch.data());
      auto* acc = reinterpret_cast<T*>(o.chunk.data());
      if (mine) {
        std::memcpy(acc, parts, sizeof(T) * static_cast<std::size_t>(mine));
        for (int p = 1; p < P; ++p) detail::reduce_into(acc, parts + static_cast<std::size_t>(p) * mine, mine, rop);
      }
      o.call = "MPI_Iallgatherv (all_reduce)";
      detail::mpi_check(MPI_Iallgatherv(acc, mine, t, base, o.counts[0].data(), o.counts[1].data(), t, comm, &o.req),
                        o.call);
    };
    return detail::mpi_request(std::move(op));
  }

  template <class T>
  request all_gather_async(std::span<const T> mine, std::span<T> all) {
    SEMOE_CHECK(all.size() == mine.size() * static_cast<std::size_t>(size()),
                "semoe::comm::mpi::all_gather: output "
                "holds ",
                all.size(), " elements, expected ", size(), " x ", mine.size());
    auto op = std::make_shared<detail::mpi_op_state>();
    op->call = "MPI_Iallgather";
    const MPI_Datatype t = detail::mpi_type<T>();
    const int n = detail::mpi_count(mine.size(), "all_gather size");
    detail::mpi_count(all.size(), "all_gather output size");
    detail::mpi_check(MPI_Iallgather(mine.data(), n, t, all.data(), n, t, s_->comm, &op->req), op->call);
    return detail::mpi_request(std::move(op));
  }

  /// out = this rank's block of the reduction of in ([size() x out.size()]).
  template <class T>
  request reduce_scatter_async(std::span<const T> in, std::span<T> out, reduce_op rop = reduce_op::sum) {
    const int P = size();
    SEMOE_CHECK(in.size() == out.size() * static_cast<std::size_t>(P), "semoe::comm::mpi::reduce_scatter: input holds ",
                in.size(), " elements, expected ", P, " x ", out.size());
    auto op = std::make_shared<detail::mpi_op_state>();
    const MPI_Datatype t = detail::mpi_type<T>();
    const int n = detail::mpi_count(out.size(), "reduce_scatter block");
    detail::mpi_count(in.size(), "reduce_scatter input size");
    if (!s_->opt.deterministic) {
      op->call = "MPI_Ireduce_scatter_block";
      detail::mpi_check(MPI_Ireduce_scatter_block(in.data(), out.data(), n, t, detail::mpi_op(rop), s_->comm, &op->req),
                        op->call);
      return detail::mpi_request(std::move(op));
    }
    op->call = "MPI_Ialltoall (reduce_scatter)";
    op->scratch.resize(in.size_bytes());
    detail::mpi_check(MPI_Ialltoall(in.data(), n, t, op->scratch.data(), n, t, s_->comm, &op->req), op->call);
    op->then = [dst = out.data(), n, P, rop](detail::mpi_op_state& o) {
      auto* parts = reinterpret_cast<const T*>(o.scratch.data());
      if (n) {
        std::memcpy(dst, parts, sizeof(T) * static_cast<std::size_t>(n));
        for (int p = 1; p < P; ++p) detail::reduce_into(dst, parts + static_cast<std::size_t>(p) * n, n, rop);
      }
    };
    return detail::mpi_request(std::move(op));
  }

  template <class T>
  request broadcast_async(std::span<T> data, int root) {
    SEMOE_CHECK(root >= 0 && root < size(), "semoe::comm::mpi::broadcast: root = ", root, " of ", size(), " ranks");
    auto op = std::make_shared<detail::mpi_op_state>();
    op->call = "MPI_Ibcast";
    const int n = detail::mpi_count(data.size(), "broadcast size");
    detail::mpi_check(MPI_Ibcast(data.data(), n, detail::mpi_type<T>(), root, s_->comm, &op->req), op->call);
    return detail::mpi_request(std::move(op));
  }

  void barrier() { detail::mpi_check(MPI_Barrier(s_->comm), "MPI_Barrier"); }

  /// Ranks with the same color form a group, ordered by (key, rank): MPI_Comm_split.
  mpi split(int color, int key) {
    SEMOE_CHECK(color >= 0, "semoe::comm::mpi::split: color = ", color, ": expected >= 0");
    MPI_Comm sub = MPI_COMM_NULL;
    detail::mpi_check(MPI_Comm_split(s_->comm, color, key, &sub), "MPI_Comm_split");
    mpi out(sub, s_->opt, s_->local_size, s_->rank);
    detail::mpi_check(MPI_Comm_free(&sub), "MPI_Comm_free");
    return out;
  }

 private:
  struct state {
    MPI_Comm comm = MPI_COMM_NULL;
    int rank = 0, size = 1, local_size = 1;
    options opt;
    state() = default;
    state(const state&) = delete;
    state& operator=(const state&) = delete;
    ~state() {
      if (comm != MPI_COMM_NULL && !detail::mpi_finalized()) MPI_Comm_free(&comm);
    }
  };

  /// A group of a split: the node structure is kept where the group spans
  /// whole nodes evenly, as comm::local and comm::tcp keep it.
  mpi(MPI_Comm comm, options o, int parent_local_size, int parent_rank) {
    adopt(comm, o);
    std::vector<int> parent(static_cast<std::size_t>(size()));
    detail::mpi_check(MPI_Allgather(&parent_rank, 1, MPI_INT, parent.data(), 1, MPI_INT, s_->comm), "MPI_Allgather");
    int on_first_node = 0;
    for (int r : parent) on_first_node += r / parent_local_size == parent[0] / parent_local_size;
    s_->local_size = on_first_node > 0 && size() % on_first_node == 0 ? on_first_node : size();
  }

  void adopt(MPI_Comm comm, const options& o) {
    detail::ensure_mpi_initialized();
    s_ = std::make_shared<state>();
    s_->opt = o;
    detail::mpi_check(MPI_Comm_dup(comm, &s_->comm), "MPI_Comm_dup");
    detail::mpi_check(MPI_Comm_set_errhandler(s_->comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    detail::mpi_check(MPI_Comm_rank(s_->comm, &s_->rank), "MPI_Comm_rank");
    detail::mpi_check(MPI_Comm_size(s_->comm, &s_->size), "MPI_Comm_size");
  }

  /// local_size: options.local_size, else the ranks sharing memory with this
  /// one when every node holds the same number, numbered node by node; else
  /// 1 (no node structure: hierarchical exchanges degrade to flat ones).
  void topology() {
    const int P = s_->size;
    if (s_->opt.local_size > 0) {
      SEMOE_CHECK(P % s_->opt.local_size == 0, "semoe::comm::mpi: options.local_size = ", s_->opt.local_size,
                  " does not divide the ", P, " ranks");
      s_->local_size = s_->opt.local_size;
      return;
    }
    MPI_Comm shm = MPI_COMM_NULL;
    detail::mpi_check(MPI_Comm_split_type(s_->comm, MPI_COMM_TYPE_SHARED, s_->rank, MPI_INFO_NULL, &shm),
                      "MPI_Comm_split_type");
    int L = 1, lr = 0;
    detail::mpi_check(MPI_Comm_size(shm, &L), "MPI_Comm_size");
    detail::mpi_check(MPI_Comm_rank(shm, &lr), "MPI_Comm_rank");
    detail::mpi_check(MPI_Comm_free(&shm), "MPI_Comm_free");
    const int mine[2] = {L, s_->rank % L == lr && (s_->rank - lr) % L == 0 ? 1 : 0};
    int all[2];
    detail::mpi_check(MPI_Allreduce(mine, all, 2, MPI_INT, MPI_MIN, s_->comm), "MPI_Allreduce");
    int max_l = 0;
    detail::mpi_check(MPI_Allreduce(&L, &max_l, 1, MPI_INT, MPI_MAX, s_->comm), "MPI_Allreduce");
    s_->local_size = all[1] == 1 && all[0] == max_l && P % L == 0 ? L : 1;
  }

  /// [begin, end) of chunk q of n elements over size() ranks.
  std::pair<int, int> chunk(int n, int q) const {
    const long long P = size();
    return {static_cast<int>(n * static_cast<long long>(q) / P),
            static_cast<int>(n * static_cast<long long>(q + 1) / P)};
  }

  void fill_counts(std::vector<int>& counts, std::vector<int>& displs, std::span<const index_t> c, std::size_t have,
                   const char* what) const {
    counts.resize(c.size());
    displs.resize(c.size());
    std::uint64_t off = 0;
    for (std::size_t q = 0; q < c.size(); ++q) {
      SEMOE_CHECK(c[q] >= 0, "semoe::comm::mpi: ", what, " count for rank ", q, " = ", c[q], ": expected >= 0");
      counts[q] = detail::mpi_count(static_cast<std::uint64_t>(c[q]), what);
      displs[q] = detail::mpi_count(off, what);
      off += static_cast<std::uint64_t>(c[q]);
    }
    SEMOE_CHECK(off <= have, "semoe::comm::mpi: ", what, " counts add up to ", off, " elements; the buffer holds ",
                have);
  }

  std::shared_ptr<state> s_;
};

static_assert(Communicator<mpi>);

}  // namespace semoe::comm
