// A device backend emulated on the host, for CI without a GPU: its memory
// space says the host cannot read it (so every generic code path that would
// dereference device memory on the host fails to compile against it), and
// its executor says it runs on a device (so layers take their device paths:
// staging the gate through host memory, uploading the plan, initializing
// parameters on the host and copying them over). The arithmetic is the cpu
// executor's and CBLAS's, so results must equal the cpu backend bit for bit.
#pragma once

#include <atomic>

#include "semoe/core/algorithm.hpp"
#include "semoe/core/backend.hpp"
#include "semoe/core/blas.hpp"

namespace semoe::test {

/// The emulated device's pinned memory: host memory that counts its live
/// bytes, so tests see which host allocations were made as staging memory.
struct emulated_pinned_space {
  static constexpr const char* name = "emulated-pinned";
  static constexpr bool host_accessible = true;
  static constexpr bool device_accessible = true;
  static std::atomic<std::size_t>& live_bytes() {
    static std::atomic<std::size_t> n{0};
    return n;
  }
  static void* allocate(std::size_t bytes) {
    live_bytes() += bytes;
    return host_space::allocate(bytes);
  }
  static void deallocate(void* p, std::size_t bytes) {
    if (p) live_bytes() -= bytes;
    host_space::deallocate(p, bytes);
  }
  static void* allocate_aligned(std::size_t bytes, std::size_t alignment) {
    live_bytes() += bytes;
    return std::aligned_alloc(alignment, (bytes + alignment - 1) / alignment * alignment);
  }
  static void deallocate_aligned(void* p, std::size_t bytes) {
    if (p) live_bytes() -= bytes;
    std::free(p);
  }
  static void copy(void* dst, const void* src, std::size_t bytes) { host_space::copy(dst, src, bytes); }
  static void zero(void* p, std::size_t bytes) { host_space::zero(p, bytes); }
};

/// Host memory that claims not to be host-accessible. It has a per-thread
/// context, as CUDA's current device, and counts allocations and copies made
/// by a thread whose context differs from `expected_context` (when set).
struct emulated_device_space {
  static constexpr const char* name = "emulated-device";
  using host_staging_space = emulated_pinned_space;
  static constexpr bool host_accessible = false;
  static constexpr bool device_accessible = true;
  static int& context() {
    thread_local int c = 0;
    return c;
  }
  static std::atomic<int>& expected_context() {
    static std::atomic<int> e{-1};
    return e;
  }
  static std::atomic<int>& foreign_allocations() {
    static std::atomic<int> n{0};
    return n;
  }
  static int current_context() { return context(); }
  static void adopt_context(int c) { context() = c; }
  static void note_context() {
    const int e = expected_context().load();
    if (e >= 0 && context() != e) ++foreign_allocations();
  }
  static void* allocate(std::size_t bytes) {
    note_context();
    return host_space::allocate(bytes);
  }
  static void deallocate(void* p, std::size_t bytes) { host_space::deallocate(p, bytes); }
  static void copy(void* dst, const void* src, std::size_t bytes) {
    note_context();
    host_space::copy(dst, src, bytes);
  }
  static void zero(void* p, std::size_t bytes) { host_space::zero(p, bytes); }
};

class emulated_device_executor {
 public:
  using memory_space = emulated_device_space;
  using event = cpu_event;
  static constexpr bool on_device = true;
  struct options {
    int threads = 2;
  };
  emulated_device_executor() : emulated_device_executor(options{}) {}
  explicit emulated_device_executor(options o) : host_({.threads = o.threads}) {}

  template <class F>
  void parallel_for(index_t n, const F& body, index_t grain = 1024) {
    host_.parallel_for(n, body, grain);
  }
  /// One column per call, as the cuda executor's threads take them: row
  /// bodies must give the same bits split this way as over whole rows.
  template <class F>
  void parallel_rows(index_t rows, index_t cols, const F& body, index_t grain = 1) {
    host_.parallel_for(rows, [&](index_t r) {
      for (index_t j = 0; j < cols; ++j) body(r, j, j + 1);
    }, grain);
  }
  void synchronize() { ++synchronizations; }
  void record(cpu_event& ev) { ev.record(); }
  void wait(cpu_event& ev) { ev.wait(); }
  void copy(void* dst, const void* src, std::size_t bytes) { host_space::copy(dst, src, bytes); }
  int concurrency() const { return host_.concurrency(); }
  int synchronizations = 0;  ///< how often someone waited for the "device"

 private:
  cpu_executor host_;
};

struct emulated_device {
  using policy_kind = backend_tag;
  using memory_space = emulated_device_space;
  using host_memory_space = host_space;
  using executor = emulated_device_executor;
  using event = cpu_event;
  static constexpr const char* name = "emulated-device";
};

static_assert(Backend<emulated_device>);

}  // namespace semoe::test

/// Its BLAS: CBLAS on the (really host) memory, as the cpu engine does.
template <>
struct semoe::blas::engine<semoe::test::emulated_device_executor> {
  template <class T>
  static void gemm(semoe::test::emulated_device_executor&, op ta, op tb, index_t m, index_t n, index_t k, T alpha,
                   const T* a, index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    blas::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  template <class T>
  static void grouped_gemm(semoe::test::emulated_device_executor&, std::span<const gemm_problem<T>> problems) {
    sequential_executor seq;
    engine<sequential_executor>::grouped_gemm(seq, problems);
  }
};

/// Its routing primitives: the host engine's, on the (really host) memory.
template <>
struct semoe::algo::engine<semoe::test::emulated_device_executor> {
  static void histogram(semoe::test::emulated_device_executor&, const std::uint32_t* values, index_t n,
                        std::int32_t* counts, int bins) {
    sequential_executor seq;
    host_engine::histogram(seq, values, n, counts, bins);
  }
  template <class I>
  static void exclusive_sum(semoe::test::emulated_device_executor&, const I* in, I* out, index_t n) {
    sequential_executor seq;
    host_engine::exclusive_sum(seq, in, out, n);
  }
  static void sort_pairs(semoe::test::emulated_device_executor&, const std::uint32_t* keys_in,
                         std::uint32_t* keys_out, const std::int32_t* values_in, std::int32_t* values_out, index_t n,
                         int end_bit) {
    sequential_executor seq;
    host_engine::sort_pairs(seq, keys_in, keys_out, values_in, values_out, n, end_bit);
  }
};
