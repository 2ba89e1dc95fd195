// semoe/core/executor.hpp: the Executor concept and the cpu executor, a
// fork-join thread pool that runs SEMOE_HD kernel bodies over an index range.
// Generic code takes any Executor (Kokkos' execution spaces, CUB's dispatch):
// it hands the executor a body, one functor for every backend, and the
// executor decides how the indices are run: a loop over threads here, a
// kernel launch on a stream in cuda/executor.cuh.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/memory_space.hpp"

namespace semoe {

/// A completion flag: record() marks the work before it done, wait() blocks
/// until then. Loads, collectives and compute on different threads order
/// themselves through these, never through sleeps.
class cpu_event {
 public:
  void reset() { done_.store(false, std::memory_order_relaxed); }
  void record() {
    done_.store(true, std::memory_order_release);
    done_.notify_all();
  }
  void wait() const { done_.wait(false, std::memory_order_acquire); }
  /// The host waits for the recorded point (the same as wait() here).
  void synchronize() const { wait(); }
  bool ready() const { return done_.load(std::memory_order_acquire); }

 private:
  std::atomic<bool> done_{true};
};

namespace detail {
/// The body the Executor concept probes parallel_for with (a named functor:
/// nvcc rejects lambdas inside requires-expressions).
struct probe_body {
  SEMOE_HD void operator()(index_t) const {}
};
struct probe_row_body {
  SEMOE_HD void operator()(index_t, index_t, index_t) const {}
};
struct probe_chunk_body {
  void operator()(index_t, index_t) const {}
};
}  // namespace detail

/// Host executors may also run f(begin, end) over chunks of a range, for
/// bodies that keep per-chunk state (a running sum, a scratch row).
template <class E>
concept ChunkedExecutor = requires(E& ex, index_t n) { ex.parallel_chunks(n, n, detail::probe_chunk_body{}); };

/// What every backend's executor provides:
///  * parallel_for(n, body[, grain]): body(i) for i in [0, n), each once; on
///    the host it returns when done, on a device it is ordered on the
///    executor's compute stream;
///  * parallel_rows(rows, cols, body[, grain]): body(r, j0, j1) covering
///    every column j of every row r exactly once. The host passes whole rows
///    (j0 = 0, j1 = cols: a loop the compiler vectorizes); a device passes one
///    column per thread, so neighbouring threads touch neighbouring memory.
///    For row-wise bodies whose columns are independent;
///  * synchronize(): the host waits for everything issued so far;
///  * record(event) / wait(event): order work across queues (copy stream,
///    communication thread) without a device-wide synchronize;
///  * copy(dst, src, bytes): bytes between its memory and the host's (either
///    way), after the work issued so far; returns when they have landed;
///  * memory_space: where its kernels read and write; on_device: whether
///    they run on a device (so host memory is not theirs to touch);
///  * concurrency(): how many indices may run at once (threads, or SMs).
template <class E>
concept Executor = requires(E& ex, const E& cex, index_t n, typename E::event& ev, void* p, const void* q) {
  requires MemorySpace<typename E::memory_space>;
  { E::on_device } -> std::convertible_to<bool>;
  ex.parallel_for(n, detail::probe_body{});
  ex.parallel_rows(n, n, detail::probe_row_body{});
  ex.synchronize();
  ex.record(ev);
  ex.wait(ev);
  ex.copy(p, q, std::size_t{});
  { cex.concurrency() } -> std::convertible_to<int>;
};

/// A pool of `threads - 1` workers plus the calling thread. `parallel_for(n, f)`
/// calls f(i) for every i in [0, n), each exactly once, and returns when all
/// are done; f never learns which thread ran it, so the same body runs as a
/// CUDA kernel. Not re-entrant: one parallel_for at a time per executor.
class cpu_executor {
 public:
  using memory_space = host_space;
  using event = cpu_event;
  static constexpr bool on_device = false;

  struct options {
    int threads = 0;  ///< 0: SEMOE_NUM_THREADS, else the hardware concurrency
  };

  cpu_executor() : cpu_executor(options{}) {}
  explicit cpu_executor(options opt) {
    int n = opt.threads;
    if (n <= 0) {
      if (const char* env = std::getenv("SEMOE_NUM_THREADS")) n = std::atoi(env);
    }
    if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    SEMOE_CHECK(n <= 1024, "semoe::cpu_executor: threads = ", n, " is not a sane thread count");
    threads_ = n;
    workers_.reserve(n - 1);
    for (int w = 1; w < n; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  }
  cpu_executor(const cpu_executor&) = delete;
  cpu_executor& operator=(const cpu_executor&) = delete;
  ~cpu_executor() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int concurrency() const { return threads_; }

  /// parallel_for returns when its work is done: nothing is left to wait for.
  void synchronize() {}
  void record(cpu_event& ev) { ev.record(); }
  void wait(cpu_event& ev) { ev.wait(); }
  void copy(void* dst, const void* src, std::size_t bytes) { host_space::copy(dst, src, bytes); }

  /// f(i) for i in [0, n). Work is handed out in chunks of at least `grain`
  /// indices so that cheap bodies are not dominated by scheduling.
  template <class F>
  void parallel_for(index_t n, const F& f, index_t grain = 1024) {
    if (n <= 0) return;
    grain = std::max<index_t>(grain, 1);
    if (threads_ == 1 || n <= grain) {
      for (index_t i = 0; i < n; ++i) f(i);
      return;
    }
    const index_t chunks_wanted = static_cast<index_t>(threads_) * 4;
    const index_t chunk = std::max(grain, (n + chunks_wanted - 1) / chunks_wanted);
    parallel_chunks(n, chunk, [&f](index_t b, index_t e) {
      for (index_t i = b; i < e; ++i) f(i);
    });
  }

  /// body(r, 0, cols) for every row r: whole rows, `grain` rows at least per task.
  template <class F>
  void parallel_rows(index_t rows, index_t cols, const F& body, index_t grain = 1) {
    parallel_for(rows, [&body, cols](index_t r) { body(r, index_t{0}, cols); }, grain);
  }

  /// f(begin, end) over a partition of [0, n) into chunks of `chunk` indices:
  /// for bodies that keep per-chunk state (a running sum, a scratch row).
  template <class F>
  void parallel_chunks(index_t n, index_t chunk, const F& f) {
    if (n <= 0) return;
    chunk = std::max<index_t>(chunk, 1);
    const index_t count = (n + chunk - 1) / chunk;
    if (threads_ == 1 || count == 1) {
      for (index_t c = 0; c < count; ++c) f(c * chunk, std::min(n, (c + 1) * chunk));
      return;
    }
    struct job_impl final : job {
      const F* f;
      index_t n, chunk, count;
      std::atomic<index_t> next{0};
      void run() override {
        for (index_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < count;)
          (*f)(c * chunk, std::min(n, (c + 1) * chunk));
      }
    } j;
    j.f = &f;
    j.n = n;
    j.chunk = chunk;
    j.count = count;
    run_job(j);
  }

 private:
  struct job {
    virtual void run() = 0;
    std::exception_ptr failure;
    std::mutex failure_mutex;
    void run_guarded() {
      try {
        run();
      } catch (...) {
        std::lock_guard lock(failure_mutex);
        if (!failure) failure = std::current_exception();
      }
    }
  };

  void run_job(job& j) {
    {
      std::lock_guard lock(mutex_);
      job_ = &j;
      pending_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    j.run_guarded();
    {
      std::unique_lock lock(mutex_);
      done_.wait(lock, [this] { return pending_ == 0; });
      job_ = nullptr;
    }
    if (j.failure) std::rethrow_exception(j.failure);
  }

  void worker_loop(int) {
    std::uint64_t seen = 0;
    for (;;) {
      job* j;
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        j = job_;
      }
      j->run_guarded();
      {
        std::lock_guard lock(mutex_);
        if (--pending_ == 0) done_.notify_one();
      }
    }
  }

  int threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  job* job_ = nullptr;
  int pending_ = 0;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
};

static_assert(Executor<cpu_executor>);

/// The calling thread only: parallel_for is a plain loop. For host code that
/// runs an executor-generic algorithm without a pool at hand (a gate's
/// host route()), with the same bodies and in index order.
class sequential_executor {
 public:
  using memory_space = host_space;
  using event = cpu_event;
  static constexpr bool on_device = false;

  int concurrency() const { return 1; }
  void synchronize() {}
  void record(cpu_event& ev) { ev.record(); }
  void wait(cpu_event& ev) { ev.wait(); }
  void copy(void* dst, const void* src, std::size_t bytes) { host_space::copy(dst, src, bytes); }
  template <class F>
  void parallel_for(index_t n, const F& f, index_t = 0) {
    for (index_t i = 0; i < n; ++i) f(i);
  }
  template <class F>
  void parallel_rows(index_t rows, index_t cols, const F& body, index_t = 0) {
    for (index_t r = 0; r < rows; ++r) body(r, index_t{0}, cols);
  }
  template <class F>
  void parallel_chunks(index_t n, index_t chunk, const F& f) {
    chunk = std::max<index_t>(chunk, 1);
    for (index_t b = 0; b < n; b += chunk) f(b, std::min(n, b + chunk));
  }
};

static_assert(Executor<sequential_executor>);

/// *p += v, atomically on every backend: a device atomic in a kernel, an
/// atomic_ref on the host (pool threads may run the same body at once).
/// Integer sums only, so the result never depends on the order.
SEMOE_HD inline void atomic_add(std::uint64_t* p, std::uint64_t v) {
#if SEMOE_DEVICE_PASS
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
  std::atomic_ref<std::uint64_t>(*p).fetch_add(v, std::memory_order_relaxed);
#endif
}
SEMOE_HD inline void atomic_max(std::uint32_t* p, std::uint32_t v) {
#if SEMOE_DEVICE_PASS
  atomicMax(reinterpret_cast<unsigned int*>(p), static_cast<unsigned int>(v));
#else
  std::atomic_ref<std::uint32_t> r(*p);
  for (std::uint32_t cur = r.load(std::memory_order_relaxed);
       cur < v && !r.compare_exchange_weak(cur, v, std::memory_order_relaxed);) {
  }
#endif
}

}  // namespace semoe
