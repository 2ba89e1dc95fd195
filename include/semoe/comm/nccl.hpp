// semoe/comm/nccl.hpp: a Communicator over NCCL, for expert parallelism
// across GPUs. Collectives run on the communicator's own stream, after the
// work already queued on the calling thread's compute stream (the innermost
// cuda_executor's), and a request's wait() returns when they are done:
//  * all_to_all_v is one NCCL group of ncclSend/ncclRecv (the self part a
//    device copy), planned by the same code as comm::local and comm::tcp;
//  * all_reduce, all_gather, reduce_scatter and broadcast are NCCL's own;
//    split is ncclCommSplit;
//  * spans may point to device or host memory: host data is staged through
//    device memory (the count exchanges of a layer are small host vectors).
// Bootstrap: `nccl::over(side)` takes any host Communicator as its side
// channel (comm::tcp from semoe-run's variables, or comm::local for thread
// ranks): rank 0's NCCL id travels over it, each rank takes the GPU of its
// local rank. Failure: a collective that has not finished within the timeout,
// or that NCCL reports failed, aborts the communicator (ncclCommAbort); the
// ranks then compare over the side channel how many collectives each issued,
// and the semoe::error names the collective and the ranks that never issued
// it; a dead or silent rank is named by the side channel itself.
//
// This header is host code: it compiles with nvcc and with the host compiler
// (with CUDA's and NCCL's headers), so programs that use comm::tcp as the
// side channel, which nvcc cannot compile, build it in a .cpp file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/comm/detail/exchange_plan.hpp"
#include "semoe/comm/detail/side_channel.hpp"
#include "semoe/cuda/memory.cuh"

namespace semoe::comm {

struct nccl_options {
  /// A collective that has not finished by then aborts the communicator.
  std::chrono::milliseconds timeout{60'000};
  int device = -1;  ///< the GPU of this rank; -1: local rank modulo the GPUs this process sees
};

namespace detail {

template <class T>
constexpr ncclDataType_t nccl_type() {
  if constexpr (std::is_same_v<T, float>) return ncclFloat32;
  else if constexpr (std::is_same_v<T, double>) return ncclFloat64;
  else if constexpr (std::is_same_v<T, __half>) return ncclFloat16;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return ncclBfloat16;
  else if constexpr (std::is_same_v<T, std::int8_t>) return ncclInt8;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return ncclUint8;
  else if constexpr (std::is_same_v<T, std::int32_t>) return ncclInt32;
  else if constexpr (std::is_same_v<T, std::uint32_t>) return ncclUint32;
  else if constexpr (std::is_same_v<T, std::int64_t>) return ncclInt64;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return ncclUint64;
  else static_assert(sizeof(T) == 0, "semoe::comm::nccl: no NCCL data type for this element type");
}

inline ncclRedOp_t nccl_op(reduce_op op) {
  switch (op) {
    case reduce_op::sum: return ncclSum;
    case reduce_op::max: return ncclMax;
    case reduce_op::min: return ncclMin;
  }
  return ncclSum;
}

/// True when p is host memory (pageable or pinned): NCCL is given device
/// memory only, so such data is staged.
inline bool host_pointer(const void* p) {
  if (!p) return false;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;
  }
  return a.type == cudaMemoryTypeHost || a.type == cudaMemoryTypeUnregistered;
}

}  // namespace detail

class nccl {
 public:
  using policy_kind = comm_tag;
  using options = nccl_options;
  /// Moves device memory itself: device layers hand it their buffers directly.
  static constexpr bool device_memory = true;

  /// Joins the NCCL communicator of the ranks of `side` (collective over it).
  template <class Side>
  static nccl over(Side side, options o = {}) {
    return nccl(detail::make_side_channel(std::move(side)), o);
  }

  int rank() const { return st_->side.rank; }
  int size() const { return st_->side.size; }
  int local_rank() const { return st_->side.local_rank; }
  int local_size() const { return st_->side.local_size; }
  int device() const { return st_->device; }
  cudaStream_t stream() const { return st_->stream; }
  ncclComm_t native() const { return st_->comm; }

  template <class T>
  request all_to_all_v_async(std::span<const T> send, std::span<const index_t> send_counts, std::span<T> recv,
                             std::span<const index_t> recv_counts) {
    const int me = rank(), P = size();
    const auto plan = detail::plan_exchange("semoe::comm::nccl::all_to_all_v", me, P, send_counts, send.size(),
                                            recv_counts, recv.size());
    collective c(st_, "all_to_all_v");
    const T* s = c.input(send.data(), plan.send_offset.back());
    T* r = c.output(recv.data(), plan.recv_offset.back());
    if (const std::size_t n = plan.send_count(me))
      SEMOE_CUDA_TRY(cudaMemcpyAsync(r + plan.recv_offset[me], s + plan.send_offset[me], n * sizeof(T),
                                     cudaMemcpyDeviceToDevice, st_->stream));
    c.call("ncclGroupStart", ncclGroupStart());
    for (int p = 0; p < P; ++p) {
      if (p == me) continue;
      if (const std::size_t n = plan.send_count(p))
        c.call("ncclSend", ncclSend(s + plan.send_offset[p], n, detail::nccl_type<T>(), p, st_->comm, st_->stream));
      if (const std::size_t n = plan.recv_count(p))
        c.call("ncclRecv", ncclRecv(r + plan.recv_offset[p], n, detail::nccl_type<T>(), p, st_->comm, st_->stream));
    }
    c.call("ncclGroupEnd", ncclGroupEnd());
    return c.finish();
  }

  template <class T>
  request all_reduce_async(std::span<T> data, reduce_op op = reduce_op::sum) {
    collective c(st_, "all_reduce");
    T* d = c.inout(data.data(), data.size());
    c.call("ncclAllReduce", ncclAllReduce(d, d, data.size(), detail::nccl_type<T>(), detail::nccl_op(op),
                                          st_->comm, st_->stream));
    return c.finish();
  }

  template <class T>
  request all_gather_async(std::span<const T> mine, std::span<T> all) {
    SEMOE_CHECK(all.size() == mine.size() * static_cast<std::size_t>(size()), "semoe::comm::nccl::all_gather: ",
                all.size(), " elements to fill, expected ", size(), " x ", mine.size());
    collective c(st_, "all_gather");
    const T* in = c.input(mine.data(), mine.size());
    T* out = c.output(all.data(), all.size());
    c.call("ncclAllGather",
           ncclAllGather(in, out, mine.size(), detail::nccl_type<T>(), st_->comm, st_->stream));
    return c.finish();
  }

  template <class T>
  request reduce_scatter_async(std::span<const T> in, std::span<T> out, reduce_op op = reduce_op::sum) {
    SEMOE_CHECK(in.size() == out.size() * static_cast<std::size_t>(size()), "semoe::comm::nccl::reduce_scatter: ",
                in.size(), " elements in, expected ", size(), " x ", out.size());
    collective c(st_, "reduce_scatter");
    const T* i = c.input(in.data(), in.size());
    T* o = c.output(out.data(), out.size());
    c.call("ncclReduceScatter", ncclReduceScatter(i, o, out.size(), detail::nccl_type<T>(), detail::nccl_op(op),
                                                  st_->comm, st_->stream));
    return c.finish();
  }

  template <class T>
  request broadcast_async(std::span<T> data, int root) {
    SEMOE_CHECK(root >= 0 && root < size(), "semoe::comm::nccl::broadcast: root = ", root, " is not a rank of ",
                size());
    collective c(st_, "broadcast");
    T* d = c.inout(data.data(), data.size());
    c.call("ncclBroadcast",
           ncclBroadcast(d, d, data.size(), detail::nccl_type<T>(), root, st_->comm, st_->stream));
    return c.finish();
  }

  void barrier() {
    int one = 1;
    all_reduce_async(std::span<int>(&one, 1)).wait();
  }

  /// Ranks with the same color form a communicator, ordered by key; the side
  /// channel splits the same way.
  nccl split(int color, int key) {
    state& s = *st_;
    s.check_usable("split");
    auto side = s.side.split(color, key);
    SEMOE_CUDA_TRY(cudaSetDevice(s.device));
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclComm_t child = nullptr;
    s.call("ncclCommSplit", ncclCommSplit(s.comm, color, key, &child, &cfg));
    auto st = std::make_shared<state>(std::move(side), s.opt, s.device);
    st->comm = child;
    st->settle("ncclCommSplit", steady::now() + s.opt.timeout);
    return nccl(std::move(st));
  }

 private:
  using steady = std::chrono::steady_clock;

  /// One rank's communicator; copies of a nccl handle share it.
  struct state {
    detail::side_channel side;
    options opt;
    int device = 0;
    ncclComm_t comm = nullptr;
    cudaStream_t stream = nullptr;
    std::uint64_t issued = 0;  ///< collectives issued so far (their numbers are 1, 2, ...)
    std::string aborted;       ///< why the communicator was aborted, or empty

    state(detail::side_channel s, options o, int dev) : side(std::move(s)), opt(o), device(dev) {
      SEMOE_CUDA_TRY(cudaSetDevice(device));
      SEMOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    }
    state(const state&) = delete;
    state& operator=(const state&) = delete;
    ~state() {
      if (comm && aborted.empty()) {
        // Finish what is queued, then end the communicator; one that does
        // not finish within the timeout is aborted instead.
        cudaStreamSynchronize(stream);
        const ncclResult_t f = ncclCommFinalize(comm);
        const bool done = f == ncclSuccess || f == ncclInProgress;
        const auto deadline = steady::now() + opt.timeout;
        ncclResult_t r = ncclInProgress;
        while (done && r == ncclInProgress && steady::now() < deadline) {
          ncclCommGetAsyncError(comm, &r);
          if (r == ncclInProgress) std::this_thread::yield();
        }
        if (done && r == ncclSuccess)
          ncclCommDestroy(comm);
        else
          ncclCommAbort(comm);
      }
      if (stream) semoe::detail::cuda_warn(cudaStreamDestroy(stream), "cudaStreamDestroy");
    }

    void check_usable(const char* what) const {
      SEMOE_CHECK(aborted.empty(), "semoe::comm::nccl: rank ", side.rank, ": ", what,
                  " on a communicator that was aborted: ", aborted);
    }

    /// An NCCL call's result: in progress and success go on; anything else
    /// aborts the communicator and fails naming the call and NCCL's message.
    void call(const char* what, ncclResult_t r) {
      if (r == ncclSuccess || r == ncclInProgress) return;
      const std::string last = comm ? ncclGetLastError(comm) : "";
      abort(std::string(what) + " failed");
      semoe::detail::fail("semoe::comm::nccl: rank ", side.rank, ": ", what, ": ", ncclGetErrorString(r),
                          last.empty() ? "" : ": ", last);
    }

    /// Waits until NCCL has taken every call made so far (a non-blocking
    /// communicator returns before): the state leaves "in progress".
    void settle(const char* what, steady::time_point deadline) {
      for (;;) {
        ncclResult_t r = ncclSuccess;
        call("ncclCommGetAsyncError", ncclCommGetAsyncError(comm, &r));
        if (r == ncclSuccess) return;
        if (r != ncclInProgress) call(what, r);
        if (steady::now() >= deadline) {
          abort(std::string(what) + " timed out");
          semoe::detail::fail("semoe::comm::nccl: rank ", side.rank, ": ", what, " did not complete within ",
                              opt.timeout.count(), " ms (are all ", side.size, " ranks running?)");
        }
        std::this_thread::yield();
      }
    }

    void abort(std::string why) {
      if (!aborted.empty()) return;
      aborted = std::move(why);
      if (comm) ncclCommAbort(comm);
    }

    /// After collective #id failed: which ranks never issued it, asked over
    /// the side channel (which itself names a rank that died or went silent).
    std::string diagnose(std::uint64_t id) { return detail::who_never_issued(side, id, issued); }
  };

  /// Issuing one collective: its inputs staged to the device when on the
  /// host, its stream ordered after the caller's compute stream, its NCCL
  /// calls checked, and a request that waits for it under the timeout and
  /// copies host outputs back.
  class collective {
   public:
    collective(std::shared_ptr<state> sp, const char* name) : sp_(std::move(sp)), s_(*sp_), name_(name) {
      state& s = s_;
      s.check_usable(name);
      SEMOE_CUDA_TRY(cudaSetDevice(s.device));
      id_ = ++s.issued;
      cudaEvent_t ready = nullptr;
      SEMOE_CUDA_TRY(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
      SEMOE_CUDA_TRY(cudaEventRecord(ready, semoe::detail::allocation_stream()));
      SEMOE_CUDA_TRY(cudaStreamWaitEvent(s.stream, ready, 0));
      SEMOE_CUDA_TRY(cudaEventDestroy(ready));
    }

    template <class T>
    const T* input(const T* p, std::size_t n) {
      return detail::host_pointer(p) ? static_cast<const T*>(stage(const_cast<T*>(p), n * sizeof(T), true, false)) : p;
    }
    template <class T>
    T* output(T* p, std::size_t n) {
      return detail::host_pointer(p) ? static_cast<T*>(stage(p, n * sizeof(T), false, true)) : p;
    }
    template <class T>
    T* inout(T* p, std::size_t n) {
      return detail::host_pointer(p) ? static_cast<T*>(stage(p, n * sizeof(T), true, true)) : p;
    }

    void call(const char* what, ncclResult_t r) { s_.call(what, r); }

    request finish() {
      s_.settle(name_, steady::now() + s_.opt.timeout);
      cudaEvent_t done = nullptr;
      SEMOE_CUDA_TRY(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
      SEMOE_CUDA_TRY(cudaEventRecord(done, s_.stream));
      return request([sp = sp_, name = name_, id = id_, done, staged = std::move(staged_)] {
        complete(*sp, name, id, done, staged);
      });
    }

    collective(const collective&) = delete;
    collective& operator=(const collective&) = delete;
    ~collective() {  // issuing failed: give back what was staged
      for (const auto& st : staged_) semoe::detail::cuda_warn(cudaFreeAsync(st.dev, s_.stream), "cudaFreeAsync");
    }

   private:
    struct staged_span {
      void* host;
      void* dev;
      std::size_t bytes;
      bool copy_back;
    };

    void* stage(void* host, std::size_t bytes, bool copy_in, bool copy_back) {
      void* dev = nullptr;
      if (bytes == 0) return host;
      SEMOE_CUDA_TRY(cudaMallocAsync(&dev, bytes, s_.stream));
      staged_.push_back({host, dev, bytes, copy_back});
      if (copy_in) SEMOE_CUDA_TRY(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, s_.stream));
      return dev;
    }

    static void complete(state& s, const char* name, std::uint64_t id, cudaEvent_t done,
                         const std::vector<staged_span>& staged) {
      const auto deadline = steady::now() + s.opt.timeout;
      if (!s.aborted.empty()) {  // an earlier collective failed and aborted the communicator
        cudaEventDestroy(done);
        semoe::detail::fail("semoe::comm::nccl: rank ", s.side.rank, ": ", name, " #", id,
                            " cannot finish: the communicator was aborted after ", s.aborted);
      }
      for (;;) {
        const cudaError_t e = cudaEventQuery(done);
        if (e == cudaSuccess) break;
        if (e != cudaErrorNotReady) {
          cudaEventDestroy(done);
          SEMOE_CUDA_TRY(e);
        }
        ncclResult_t r = ncclSuccess;
        ncclCommGetAsyncError(s.comm, &r);
        const bool late = steady::now() >= deadline;
        if ((r != ncclSuccess && r != ncclInProgress) || late) {
          cudaEventDestroy(done);
          const std::string nccl_says = r != ncclSuccess && r != ncclInProgress ? ncclGetErrorString(r) : "";
          s.abort(semoe::detail::concat(name, " #", id, " failed"));
          const std::string why = s.diagnose(id);
          semoe::detail::fail("semoe::comm::nccl: rank ", s.side.rank, ": ", name, " #", id,
                              nccl_says.empty() ? semoe::detail::concat(" did not finish within ",
                                                                        s.opt.timeout.count(), " ms")
                                                : ": NCCL reports " + nccl_says,
                              "; the communicator is aborted: ", why);
        }
        std::this_thread::yield();
      }
      SEMOE_CUDA_TRY(cudaEventDestroy(done));
      for (const auto& st : staged) {
        if (st.copy_back) SEMOE_CUDA_TRY(cudaMemcpyAsync(st.host, st.dev, st.bytes, cudaMemcpyDeviceToHost, s.stream));
        SEMOE_CUDA_TRY(cudaFreeAsync(st.dev, s.stream));
      }
      if (!staged.empty()) SEMOE_CUDA_TRY(cudaStreamSynchronize(s.stream));
    }

    std::shared_ptr<state> sp_;
    state& s_;
    const char* name_;
    std::uint64_t id_ = 0;
    std::vector<staged_span> staged_;
  };

  nccl(detail::side_channel side, options o) {
    SEMOE_CHECK(o.timeout.count() > 0, "semoe::comm::nccl: options.timeout = ", o.timeout.count(),
                " ms: expected > 0");
    int devices = 0;
    SEMOE_CUDA_TRY(cudaGetDeviceCount(&devices));
    SEMOE_CHECK(devices > 0, "semoe::comm::nccl: rank ", side.rank, " sees no CUDA device");
    const int device = o.device >= 0 ? o.device : side.local_rank % devices;
    SEMOE_CHECK(device < devices, "semoe::comm::nccl: options.device = ", device, ": rank ", side.rank, " sees ",
                devices, " CUDA device(s)");
    st_ = std::make_shared<state>(std::move(side), o, device);
    state& s = *st_;
    ncclUniqueId id{};
    if (s.side.rank == 0) s.call("ncclGetUniqueId", ncclGetUniqueId(&id));
    s.side.broadcast_from_0(std::span<std::uint8_t>(reinterpret_cast<std::uint8_t*>(&id), sizeof id));
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;  // so that a rank that never joins is a timeout, not a hang
    s.call("ncclCommInitRankConfig", ncclCommInitRankConfig(&s.comm, s.side.size, id, s.side.rank, &cfg));
    s.settle("ncclCommInitRankConfig", steady::now() + o.timeout);
  }
  explicit nccl(std::shared_ptr<state> st) : st_(std::move(st)) {}

  std::shared_ptr<state> st_;
};

static_assert(Communicator<nccl>);

}  // namespace semoe::comm
