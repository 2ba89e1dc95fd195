// semoe/core/executor.hpp: the cpu executor, a fork-join thread pool that runs
// SEMOE_HD kernel bodies over an index range (DESIGN.md §6).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"

namespace semoe {

/// A pool of `threads - 1` workers plus the calling thread. `parallel_for(n, f)`
/// calls f(i) for every i in [0, n), each exactly once, and returns when all
/// are done; f never learns which thread ran it, so the same body runs as a
/// CUDA kernel. Not re-entrant: one parallel_for at a time per executor.
class cpu_executor {
 public:
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

}  // namespace semoe
