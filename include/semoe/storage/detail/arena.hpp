// semoe/storage/detail/arena.hpp: a byte budget over aligned allocations. The
// device and host tiers are arenas: every allocation is real memory (host
// memory, or a memory space's: device memory on the cuda backend), and the
// budget is a hard limit that allocate() reports, not a hint.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <string_view>

#include "semoe/core/error.hpp"

namespace semoe::storage::detail {

class budget_arena {
 public:
  /// Where the bytes come from: aligned host memory unless told otherwise.
  using allocate_fn = void* (*)(std::size_t bytes, std::size_t alignment);
  using deallocate_fn = void (*)(void* p, std::size_t bytes);
  static void* host_allocate(std::size_t bytes, std::size_t alignment) { return std::aligned_alloc(alignment, bytes); }
  static void host_deallocate(void* p, std::size_t) { std::free(p); }

  /// budget 0: unbounded.
  budget_arena(std::string_view who, std::size_t budget, std::size_t alignment,
               allocate_fn allocate = &host_allocate, deallocate_fn deallocate = &host_deallocate)
      : who_(who), budget_(budget), alignment_(alignment), allocate_(allocate), deallocate_(deallocate) {
    SEMOE_CHECK(alignment >= alignof(std::max_align_t) && (alignment & (alignment - 1)) == 0, who,
                ": alignment ", alignment, " must be a power of two >= ", alignof(std::max_align_t));
  }
  budget_arena(const budget_arena&) = delete;
  budget_arena& operator=(const budget_arena&) = delete;

  /// `bytes` of memory, or nullptr when they would take the arena past its
  /// budget (the caller evicts and retries).
  std::byte* allocate(std::size_t bytes) {
    const std::size_t rounded = round_up(bytes);
    std::size_t used = used_.load(std::memory_order_relaxed);
    do {
      if (budget_ && used + rounded > budget_) return nullptr;
    } while (!used_.compare_exchange_weak(used, used + rounded, std::memory_order_relaxed));
    auto* p = static_cast<std::byte*>(allocate_(rounded, alignment_));
    if (!p) {
      used_.fetch_sub(rounded, std::memory_order_relaxed);
      throw std::bad_alloc();
    }
    std::size_t peak = peak_.load(std::memory_order_relaxed);
    while (used + rounded > peak && !peak_.compare_exchange_weak(peak, used + rounded, std::memory_order_relaxed)) {
    }
    return p;
  }
  void deallocate(std::byte* p, std::size_t bytes) noexcept {
    if (!p) return;
    deallocate_(p, round_up(bytes));
    used_.fetch_sub(round_up(bytes), std::memory_order_relaxed);
  }

  /// Whether `bytes` could ever fit (an empty arena).
  bool fits(std::size_t bytes) const { return !budget_ || round_up(bytes) <= budget_; }
  /// Whether `bytes` fit now, next to what is allocated.
  bool has_room(std::size_t bytes) const { return !budget_ || used() + round_up(bytes) <= budget_; }
  std::size_t budget() const { return budget_; }
  std::size_t used() const { return used_.load(std::memory_order_relaxed); }
  std::size_t peak() const { return peak_.load(std::memory_order_relaxed); }
  void reset_peak() { peak_.store(used(), std::memory_order_relaxed); }
  std::size_t alignment() const { return alignment_; }
  std::size_t round_up(std::size_t bytes) const { return (bytes + alignment_ - 1) / alignment_ * alignment_; }

 private:
  std::string_view who_;
  std::size_t budget_, alignment_;
  allocate_fn allocate_;
  deallocate_fn deallocate_;
  std::atomic<std::size_t> used_{0}, peak_{0};
};

}  // namespace semoe::storage::detail
