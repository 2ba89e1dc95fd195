// semoe/storage/detail/tiered_moves.hpp: how a tiered store moves blocks:
// making a block resident in host DRAM or device memory, choosing victims
// under each tier's byte budget, evicting (gradients home first, compute
// awaited), writing back to SSD, and the mover threads that serve
// prefetches. Called with the store's lock held; they unlock around copies
// and I/O. Part of storage/tiered_store.hpp, which includes it last.
#pragma once

#include "semoe/storage/tiered_store.hpp"

namespace semoe::storage::detail {

template <bool HasSsd>
template <class T, MemorySpace Space>
bool tiered_policy<HasSsd>::store<T, Space>::ensure_host(std::unique_lock<std::mutex>& lk, block& b, bool prefetch) {
  for (;;) {
    if (prefetch && b.busy) return false;  // a mover never waits: its waiter may be the one moving b
    cv_.wait(lk, [&] { return !b.busy; });
    if (b.host) return true;
    if (prefetch && refused_by_host(b)) return false;  // a prefetch never displaces for a block below theta
    b.busy = true;  // reserve b while making room
    std::byte* slot = alloc_for(lk, b, host_, host_bytes(b), prefetch,
                                [&](block& v) { return host_victim_ok(v, b, prefetch); },
                                [&](std::unique_lock<std::mutex>& l, block& v) { evict_host(l, v); });
    if (!slot) {
      b.busy = false;
      cv_.notify_all();
      return false;
    }
    b.host = slot;
    if (b.on_ssd) {
      if constexpr (HasSsd) {
        lk.unlock();
        const double t0 = trace::recorder::instance().now_us();
        std::optional<std::string> failure;
        try {
          ssd_->read(b.id, slot).wait();
        } catch (const std::exception& e) {
          failure = e.what();
        }
        record("ssd read ", b, "load", t0, ssd_lane);
        lk.lock();
        if (failure) {
          host_.deallocate(slot, host_bytes(b));
          b.host = nullptr;
          b.busy = false;
          cv_.notify_all();
          throw error(*failure);
        }
      }
    } else {
      std::memset(slot, 0, host_bytes(b));  // a new block: the layer initializes its weights
    }
    b.fresh = prefetch;  // other prefetches leave it alone until it is used
    b.busy = false;
    cv_.notify_all();
    return true;
  }
}

template <bool HasSsd>
template <class T, MemorySpace Space>
bool tiered_policy<HasSsd>::store<T, Space>::ensure_device(std::unique_lock<std::mutex>& lk, block& b, bool prefetch,
                                                           bool weights_only) {
  bool no_staging = false;  // the buffer could not be made: load through DRAM
  for (;;) {
    if (prefetch && b.busy) return false;
    cv_.wait(lk, [&] { return !b.busy; });
    if (b.dev) return true;
    // Below theta with DRAM full: SSD -> staging buffer -> device, DRAM untouched.
    const bool through = weights_only && !no_staging && refused_by_host(b);
    if (through && !staging_buf_) {
      no_staging = !make_staging(lk, b);
      continue;  // evicting for it let go of the lock
    }
    if (!through) {
      if (!ensure_host(lk, b, prefetch)) return false;
      if (b.busy || b.dev) continue;  // someone moved it while we waited
    } else if (prefetch && staging_busy_) {
      return false;
    }
    b.busy = true;
    std::byte* slot = alloc_for(lk, b, device_, dev_bytes(b), prefetch,
                                [&](block& v) { return dev_victim_ok(v, prefetch); },
                                [&](std::unique_lock<std::mutex>& l, block& v) { evict_device(l, v); });
    if (!slot) {
      b.busy = false;
      cv_.notify_all();
      return false;
    }
    std::byte* src = b.host;
    if (through) {  // whoever holds the buffer only reads and copies: a short wait, even for a mover
      cv_.wait(lk, [&] { return !staging_busy_; });
      staging_busy_ = true;
      src = staging_buf_;
    }
    lk.unlock();
    const auto n = static_cast<std::size_t>(b.elems);
    std::optional<std::string> failure;
    if (through) {
      if constexpr (HasSsd) {
        const double t0 = trace::recorder::instance().now_us();
        try {
          ssd_->read(b.id, src).wait();
        } catch (const std::exception& e) {
          failure = e.what();
        }
        record("ssd read through ", b, "load", t0, ssd_lane);
      }
    }
    if (!failure)
      copy_traced<Space, host_space>(reinterpret_cast<T*>(slot), reinterpret_cast<const T*>(src), n, "to device ", b);
    lk.lock();
    if (through) staging_busy_ = false;
    if (failure) {
      device_.deallocate(slot, dev_bytes(b));
      b.busy = false;
      cv_.notify_all();
      throw error(*failure);
    }
    stats_.device.bytes_in += n * sizeof(T);
    if (through)
      ++stats_.read_through;
    else
      stats_.host.bytes_out += n * sizeof(T);
    b.dev = slot;
    b.dev_grads = b.dev_dirty = false;  // weights only; backward's acquire brings gradients
    b.fresh = prefetch;
    b.dev_use = ++dev_clock_;
    b.busy = false;
    cv_.notify_all();
    return true;
  }
}

template <bool HasSsd>
template <class T, MemorySpace Space>
bool tiered_policy<HasSsd>::store<T, Space>::refused_by_host(const block& b) const {
  if constexpr (HasSsd) {
    // A block already in DRAM is copied from there, whatever its count.
    return !b.host && b.on_ssd && !host_.has_room(host_bytes(b)) &&
           !std::visit([&](const auto& c) { return c.admits(b.id); }, cache_);
  } else {
    (void)b;
    return false;  // without SSD every block lives in DRAM
  }
}

template <bool HasSsd>
template <class T, MemorySpace Space>
bool tiered_policy<HasSsd>::store<T, Space>::make_staging(std::unique_lock<std::mutex>& lk, const block& b) {
  const std::size_t bytes = ssd_block_bytes();
  std::byte* p = alloc(lk, host_, bytes, true, b, [&](block& v) { return host_victim_ok(v, b, true); },
                       [&](std::unique_lock<std::mutex>& l, block& v) { evict_host(l, v); });
  if (!p) return false;
  if (staging_buf_) {  // another thread made one while this one evicted
    host_.deallocate(p, bytes);
  } else {
    staging_buf_ = p;
    staging_bytes_ = bytes;
  }
  return true;
}

template <bool HasSsd>
template <class T, MemorySpace Space>
bool tiered_policy<HasSsd>::store<T, Space>::host_victim_ok(const block& v, const block& self, bool prefetch) const {
  return &v != &self && v.host && (!v.busy || v.writing) && v.pins == 0 && !(prefetch && v.fresh);
}

template <bool HasSsd>
template <class T, MemorySpace Space>
bool tiered_policy<HasSsd>::store<T, Space>::dev_victim_ok(const block& v, bool prefetch) const {
  return v.dev && !v.busy && v.pins == 0 && !(prefetch && v.fresh);
}

template <bool HasSsd>
template <class T, MemorySpace Space>
template <class Arena, class Ok, class Evict>
std::byte* tiered_policy<HasSsd>::store<T, Space>::alloc_for(std::unique_lock<std::mutex>& lk, block& b,
                                                             Arena& arena, std::size_t bytes, bool prefetch, Ok ok,
                                                             Evict evict) {
  try {
    return alloc(lk, arena, bytes, prefetch, b, ok, evict);
  } catch (...) {
    if (!lk.owns_lock()) lk.lock();
    b.busy = false;
    cv_.notify_all();
    throw;
  }
}

template <bool HasSsd>
template <class T, MemorySpace Space>
template <class Arena, class Ok, class Evict>
std::byte* tiered_policy<HasSsd>::store<T, Space>::alloc(std::unique_lock<std::mutex>& lk, Arena& arena,
                                                         std::size_t bytes, bool prefetch, const block& self, Ok ok,
                                                         Evict evict) {
  constexpr bool is_host = std::is_same_v<Arena, host_arena>;
  for (;;) {
    if (std::byte* p = arena.allocate(bytes)) return p;
    std::vector<std::size_t> cand;
    for (auto& v : blocks_)
      if (ok(v)) cand.push_back(v.id);
    if (!cand.empty()) {
      std::size_t victim;
      if constexpr (is_host) {
        victim = std::visit([&](auto& c) { return c.pick(std::span<const std::size_t>(cand)); }, cache_);
      } else if (opt_.device_cache == cache_kind::lfu) {
        victim = device_lfu_.pick(std::span<const std::size_t>(cand));
      } else {
        victim = *std::min_element(cand.begin(), cand.end(),
                                   [&](auto a, auto c) { return blocks_[a].dev_use < blocks_[c].dev_use; });
      }
      // A victim being written back is waited for, not passed over: the
      // cache policy picks victims, not the timing of the movers.
      if (block& v = blocks_[victim]; v.busy) {
        cv_.wait(lk, [&] { return !v.busy; });
        continue;
      }
      evict(lk, blocks_[victim]);
      continue;
    }
    if (prefetch) return nullptr;
    // Wait only for a move that will end by itself: another block's, or a
    // mover's (movers never wait for memory). Pins end when compute
    // releases, which may be this very thread: no waiting on those.
    const bool progress_possible =
        std::any_of(blocks_.begin(), blocks_.end(), [&](const block& v) { return v.busy && &v != &self; }) ||
        active_movers_ > 0;
    if (!progress_possible) {
      std::size_t pinned = 0;
      for (auto& v : blocks_) pinned += v.pins > 0;
      semoe::detail::fail("semoe::storage::tiered: the ", is_host ? "host" : "device", " budget (", arena.budget(),
                 " bytes, ", arena.used(), " in use) cannot take a block of ", bytes, " bytes: ", pinned,
                 " blocks are in use by compute",
                 is_host ? (HasSsd ? " or on the device" : " and there is no SSD tier to evict to") : "",
                 "; raise the budget");
    }
    cv_.wait(lk);
  }
}

template <bool HasSsd>
template <class T, MemorySpace Space>
void tiered_policy<HasSsd>::store<T, Space>::evict_device(std::unique_lock<std::mutex>& lk, block& v) {
  v.busy = true;
  await_compute(lk, v);
  if (v.dev_dirty) {
    lk.unlock();
    const auto n = static_cast<std::size_t>(v.elems);
    copy_traced<host_space, Space>(reinterpret_cast<T*>(v.host) + n, reinterpret_cast<const T*>(v.dev) + n, n,
                                   "grads to host ", v);
    lk.lock();
    stats_.device.bytes_out += n * sizeof(T);
    stats_.host.bytes_in += n * sizeof(T);
    v.host_dirty = true;
    v.dev_dirty = false;
  }
  device_.deallocate(v.dev, dev_bytes(v));
  v.dev = nullptr;
  v.dev_grads = false;
  v.fresh = false;
  v.busy = false;
  cv_.notify_all();
}

template <bool HasSsd>
template <class T, MemorySpace Space>
void tiered_policy<HasSsd>::store<T, Space>::await_compute(std::unique_lock<std::mutex>& lk, block& b) {
  if (!b.compute_done) return;
  auto done = std::exchange(b.compute_done, nullptr);
  lk.unlock();
  done();
  lk.lock();
}

template <bool HasSsd>
template <class T, MemorySpace Space>
void tiered_policy<HasSsd>::store<T, Space>::evict_host(std::unique_lock<std::mutex>& lk, block& v) {
  if constexpr (HasSsd) {
    if (v.dev && v.dev_dirty) evict_device(lk, v);  // its gradients come home first
    if (v.host_dirty || !v.on_ssd) write_back(lk, v);
    v.busy = true;
    host_.deallocate(v.host, host_bytes(v));
    v.host = nullptr;
    v.busy = false;
    cv_.notify_all();
  } else {
    (void)lk;
    (void)v;  // never chosen: host_victim_ok holds, but there is nowhere to go
    semoe::detail::fail("semoe::storage::tiered: the host budget (", host_.budget(),
               " bytes) must hold every block when there is no SSD tier");
  }
}

template <bool HasSsd>
template <class T, MemorySpace Space>
void tiered_policy<HasSsd>::store<T, Space>::write_back(std::unique_lock<std::mutex>& lk, block& v) {
  if constexpr (HasSsd) {
    ensure_ssd();
    v.busy = v.writing = true;
    const bool zero = v.grads_zero;
    lk.unlock();
    if (zero) {  // the file holds the true block: its gradients are zero
      const auto n = static_cast<std::size_t>(v.elems);
      std::fill(reinterpret_cast<T*>(v.host) + n, reinterpret_cast<T*>(v.host) + 2 * n, T(0));
    }
    const double t0 = trace::recorder::instance().now_us();
    std::optional<std::string> failure;
    try {
      ssd_->write(v.id, v.host).wait();
    } catch (const std::exception& e) {
      failure = e.what();
    }
    record("ssd write ", v, "store", t0, ssd_lane);
    lk.lock();
    v.busy = v.writing = false;
    cv_.notify_all();
    if (failure) throw error(*failure);
    v.on_ssd = true;
    v.host_dirty = false;
  } else {
    (void)lk;
    (void)v;
  }
}

template <bool HasSsd>
template <class T, MemorySpace Space>
void tiered_policy<HasSsd>::store<T, Space>::ensure_ssd() {
  if constexpr (HasSsd) {
    if (!ssd_) {
      ssd_.emplace(opt_.ssd, ssd_block_bytes(), blocks_.size());
      ssd_base_ = {0, 0};
    }
  }
}

template <bool HasSsd>
template <class T, MemorySpace Space>
void tiered_policy<HasSsd>::store<T, Space>::mover_loop() {
  std::unique_lock lk(m_);
  for (;;) {
    cv_.wait(lk, [&] { return stopping_ || !queue_.empty() || !writebacks_.empty(); });
    if (stopping_) return;
    ++active_movers_;
    try {
      if (!queue_.empty()) {
        task t = queue_.front();
        queue_.pop_front();
        t.b->queued = false;
        if (t.to == tier_level::device)
          ensure_device(lk, *t.b, true, !opt_.device_grads);  // an inference store needs no host home
        else
          ensure_host(lk, *t.b, true);
      } else {
        block* b = writebacks_.front();
        writebacks_.pop_front();
        b->queued_writeback = false;
        // A busy block is being used or moved: it is written back when it
        // leaves host DRAM or in the next cycle, and a mover never waits.
        if (!b->busy && b->host && b->host_dirty) write_back(lk, *b);
      }
    } catch (const std::exception& e) {
      // A failed prefetch or write-back: the block stays where it was, and
      // the next acquire or checkpoint meets the same error in its thread.
      trace::recorder::instance().add({std::string("mover error: ") + e.what(), "error",
                                       trace::recorder::instance().now_us(), 0, opt_.rank, copy_lane});
    }
    --active_movers_;
    cv_.notify_all();
  }
}

}  // namespace semoe::storage::detail
