// semoe/core/buffer.hpp: owning, 64-byte aligned buffers and the allocation ledger.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <span>
#include <utility>

#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/memory_space.hpp"
#include "semoe/core/tensor.hpp"

namespace semoe {

/// Bytes held by semoe buffers in this process: the live total and its high
/// water mark. Benchmarks read `peak()` to compare against analytic minima.
class memory_ledger {
 public:
  static memory_ledger& instance() {
    static memory_ledger ledger;
    return ledger;
  }
  void on_alloc(std::size_t bytes) {
    const std::size_t now = current_.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    std::size_t peak = peak_.load(std::memory_order_relaxed);
    while (now > peak && !peak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
  }
  void on_free(std::size_t bytes) { current_.fetch_sub(bytes, std::memory_order_relaxed); }
  std::size_t current() const { return current_.load(std::memory_order_relaxed); }
  std::size_t peak() const { return peak_.load(std::memory_order_relaxed); }
  /// Restart the high water mark from the live total.
  void reset_peak() { peak_.store(current(), std::memory_order_relaxed); }

 private:
  std::atomic<std::size_t> current_{0};
  std::atomic<std::size_t> peak_{0};
};

/// An owning array of T in memory space Space, aligned to 64 bytes, counted in
/// the memory ledger. Trivially copyable element types only: kernels treat
/// buffers as raw memory that may live on a device. Element access, fill and
/// iteration exist only where the host can read the space; copies and zero()
/// go through the space.
template <class T, MemorySpace Space = host_space>
class buffer {
  static_assert(std::is_trivially_copyable_v<T>, "semoe::buffer: T must be trivially copyable");
  static constexpr bool on_host = Space::host_accessible;

 public:
  using value_type = T;
  using memory_space = Space;

  buffer() = default;
  explicit buffer(index_t n) { resize_discard(n); }
  buffer(index_t n, T value) requires on_host {
    resize_discard(n);
    std::fill_n(data_, n, value);
  }
  buffer(const buffer& other) : buffer(other.size_) {
    Space::copy(data_, other.data_, bytes());
  }
  buffer(buffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  buffer& operator=(buffer other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    return *this;
  }
  ~buffer() { release(); }

  /// Make room for n elements; old contents are not kept. A buffer only
  /// reallocates when its size changes, so steady-state steps allocate nothing.
  void resize_discard(index_t n) {
    SEMOE_CHECK(n >= 0, "semoe::buffer: negative size ", n);
    if (n == size_) return;
    release();
    if (n == 0) return;
    data_ = static_cast<T*>(Space::allocate(static_cast<std::size_t>(n) * sizeof(T)));
    size_ = n;
    memory_ledger::instance().on_alloc(bytes());
  }
  void assign(index_t n, T value) requires on_host {
    resize_discard(n);
    std::fill_n(data_, n, value);
  }
  void fill(T value) requires on_host { std::fill_n(data_, size_, value); }
  void zero() { Space::zero(data_, bytes()); }
  void release() {
    if (data_) {
      memory_ledger::instance().on_free(bytes());
      Space::deallocate(data_, bytes());
    }
    data_ = nullptr;
    size_ = 0;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  index_t size() const { return size_; }
  std::size_t bytes() const { return static_cast<std::size_t>(size_) * sizeof(T); }
  bool empty() const { return size_ == 0; }
  T& operator[](index_t i) requires on_host { return data_[i]; }
  const T& operator[](index_t i) const requires on_host { return data_[i]; }
  T* begin() requires on_host { return data_; }
  T* end() requires on_host { return data_ + size_; }
  const T* begin() const requires on_host { return data_; }
  const T* end() const requires on_host { return data_ + size_; }

  std::span<T> span() { return {data_, static_cast<std::size_t>(size_)}; }
  std::span<const T> span() const { return {data_, static_cast<std::size_t>(size_)}; }
  matrix_view<T> matrix(index_t rows, index_t cols) {
    SEMOE_EXPECTS(rows * cols <= size_);
    return as_matrix(data_, rows, cols);
  }
  matrix_view<const T> matrix(index_t rows, index_t cols) const {
    SEMOE_EXPECTS(rows * cols <= size_);
    return as_matrix(data_, rows, cols);
  }

 private:
  T* data_ = nullptr;
  index_t size_ = 0;
};

/// A [rows, cols] matrix that owns its storage.
template <class T, MemorySpace Space = host_space>
class matrix {
 public:
  matrix() = default;
  matrix(index_t rows, index_t cols) { resize(rows, cols); }
  void resize(index_t rows, index_t cols) {
    SEMOE_CHECK(rows >= 0 && cols >= 0, "semoe::matrix: negative shape [", rows, ", ", cols, "]");
    buf_.resize_discard(rows * cols);
    rows_ = rows;
    cols_ = cols;
  }
  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  T* data() { return buf_.data(); }
  const T* data() const { return buf_.data(); }
  T& operator()(index_t i, index_t j) requires Space::host_accessible { return buf_[i * cols_ + j]; }
  const T& operator()(index_t i, index_t j) const requires Space::host_accessible { return buf_[i * cols_ + j]; }
  matrix_view<T> view() { return as_matrix(buf_.data(), rows_, cols_); }
  matrix_view<const T> view() const { return as_matrix(buf_.data(), rows_, cols_); }
  operator matrix_view<T>() { return view(); }
  operator matrix_view<const T>() const { return view(); }
  void zero() { buf_.zero(); }
  void fill(T v) requires Space::host_accessible { buf_.fill(v); }
  std::span<T> span() { return buf_.span(); }
  std::span<const T> span() const { return buf_.span(); }
  std::size_t bytes() const { return buf_.bytes(); }

 private:
  buffer<T, Space> buf_;
  index_t rows_ = 0, cols_ = 0;
};

}  // namespace semoe
