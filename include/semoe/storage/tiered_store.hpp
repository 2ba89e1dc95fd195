// semoe/storage/tiered_store.hpp: SE-MoE's hierarchical storage (§3.2).
// Every expert block (weights, gradients, optimizer moments) has its home on
// SSD (or in host DRAM when there is no SSD tier); host DRAM caches blocks
// under a byte budget with the LFU-with-decay policy of cache.hpp; a block
// the policy does not admit (hit fewer than theta times) and which finds
// DRAM full is read through one staging buffer to the device instead of
// displacing a cached block, when compute needs only its weights (the buffer
// is one block of the host budget, taken on first use); the device
// tier holds the weights and gradients of the blocks compute works on, under
// its own budget. Blocks move on demand (acquire) or ahead of need when a
// prefetcher asks (prefetch), on mover threads that stand for copy engines.
//
// Invariants (all under one mutex):
//  * a block whose gradients live on the device is also in host DRAM (as
//    ZeRO-Offload keeps master weights and optimizer state on the host), so
//    evicting it from the device only copies its gradients back and never
//    needs memory; host eviction of such a block evicts it from the device
//    first. A device copy of weights alone needs no host copy;
//  * a block being moved is `busy`; nobody else touches its copies until the
//    move finishes;
//  * prefetch never waits for memory: a prefetch that finds no room gives up
//    (a later acquire loads on demand), so compute can never wait on a mover
//    that waits on compute;
//  * budgets are checked on every allocation and never exceeded.
#pragma once

#include <algorithm>
#include <array>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include <unistd.h>

#include "semoe/core/trace.hpp"
#include "semoe/storage/cache.hpp"
#include "semoe/storage/concepts.hpp"
#include "semoe/storage/device_tier.hpp"
#include "semoe/storage/host_tier.hpp"
#include "semoe/storage/ssd_tier.hpp"

namespace semoe::storage {

/// Per-tier figures of a tiered store since the last reset_stats().
struct tier_stats {
  std::size_t budget_bytes = 0;  ///< 0: unbounded
  std::size_t used_bytes = 0;
  std::size_t peak_bytes = 0;
  std::uint64_t bytes_in = 0;   ///< moved into this tier
  std::uint64_t bytes_out = 0;  ///< written back out of it
};

struct store_stats {
  tier_stats device, host, ssd;
  std::uint64_t hits = 0;      ///< acquires that found the block on the device
  std::uint64_t misses = 0;    ///< acquires that loaded or waited
  std::uint64_t prefetches = 0;
  std::uint64_t read_through = 0;  ///< SSD -> device loads through the staging buffer, past DRAM
  double wait_seconds = 0;     ///< compute time spent in acquire waiting for blocks
  double hit_rate() const { return hits + misses ? double(hits) / double(hits + misses) : 1.0; }
};

enum class cache_kind { lfu, lru };

namespace detail {

/// Trace lanes of the store's movers.
inline constexpr int copy_lane = 1001;
inline constexpr int ssd_lane = 1002;

template <bool HasSsd>
struct tiered_policy {
  using policy_kind = storage_tag;

  struct store_options {
    device_tier::options device{};
    host_tier::options host{};
    ssd_options ssd{};               ///< used when the tier list has ssd_tier; dir defaults to a temp dir
    std::size_t state_slots = 2;     ///< optimizer arrays per block (AdamW: 2), fixed up front
    cache_kind cache = cache_kind::lfu;         ///< host DRAM's eviction policy
    cache_kind device_cache = cache_kind::lru;  ///< the device tier's: lfu makes it an expert cache for decoding
    bool device_grads = true;  ///< room for gradients in device copies; false: inference only, twice the experts
    lfu::options lfu_options{};  ///< decay, and the admission threshold theta of host DRAM (and of the device under lfu)
    int movers = 1;                  ///< threads serving prefetches (copy engines)
    /// A block a visit changed (the optimizer updated it) is queued for
    /// write-back to SSD at once, for the movers' idle time (prefetches go
    /// first), so that evicting it later costs no write. false: dirty blocks
    /// are written when evicted or at the end of the step's cycle.
    bool eager_write_back = true;
    int rank = 0;                    ///< trace process id
  };

  /// Blocks under compute live in Space (device memory on a device backend);
  /// visit() works on the host DRAM copy, where the optimizer state is.
  template <class T, MemorySpace Space = host_space>
  class store {
   public:
    using value_type = T;
    using options = store_options;
    using memory_space = Space;     ///< where acquire()'s spans point
    using visit_space = host_space;  ///< where visit()'s spans point
    store() : store(options{}) {}
    explicit store(options o)
        : opt_(std::move(o)), device_(opt_.device), host_(opt_.host) {
      SEMOE_CHECK(opt_.movers >= 1 && opt_.movers <= 16, "semoe::storage::tiered: options.movers = ", opt_.movers,
                  ": expected in [1, 16]");
      SEMOE_CHECK(opt_.state_slots <= 8, "semoe::storage::tiered: options.state_slots = ",
                  opt_.state_slots, ": expected at most 8");
      device_lfu_ = lfu(opt_.lfu_options);
      if (opt_.cache == cache_kind::lfu)
        cache_.template emplace<lfu>(opt_.lfu_options);
      else
        cache_.template emplace<lru>();
      if constexpr (HasSsd) {
        if (opt_.ssd.dir.empty()) {  // a new private directory, never one that exists (mkdtemp, mode 0700)
          std::string tmpl = (std::filesystem::temp_directory_path() / ("semoe-ssd-" + std::string(6, 'X'))).string();
          SEMOE_CHECK(::mkdtemp(tmpl.data()) != nullptr, "semoe::storage::tiered: mkdtemp(", tmpl,
                      ") for the default SSD directory: ", std::strerror(errno));
          opt_.ssd.dir = tmpl;
          made_dir_ = true;
        }
      }
      auto& rec = trace::recorder::instance();
      rec.name_lane(opt_.rank, copy_lane, "copy engine");
      if constexpr (HasSsd) rec.name_lane(opt_.rank, ssd_lane, "ssd io");
      const int context = space_context<Space>::current();  // movers work on this thread's device
      for (int i = 0; i < opt_.movers; ++i)
        movers_.emplace_back([this, context] {
          space_context<Space>::adopt(context);
          mover_loop();
        });
    }
    store(const store&) = delete;
    store& operator=(const store&) = delete;
    ~store() {
      {
        std::lock_guard lk(m_);
        stopping_ = true;
      }
      cv_.notify_all();
      for (auto& t : movers_) t.join();
      if constexpr (HasSsd) {
        if (ssd_ && !keep_file_) {  // a file no checkpoint names is scratch
          const auto path = ssd_->path();
          ssd_.reset();
          std::error_code ec;
          std::filesystem::remove(path, ec);
        }
        std::error_code ec;
        if (made_dir_ && !keep_file_) std::filesystem::remove(opt_.ssd.dir, ec);  // ours, and empty by now
      }
      host_.deallocate(staging_buf_, staging_bytes_);
      for (auto& b : blocks_) {
        if (b.compute_done) try {
            b.compute_done();
          } catch (...) {  // a failed device: its memory goes back all the same
          }
        device_.deallocate(b.dev, dev_bytes(b));
        host_.deallocate(b.host, host_bytes(b));
      }
    }

    // -- Store interface ------------------------------------------------------

    index_t add_layer(index_t experts, index_t block_elems) {
      SEMOE_CHECK(experts >= 0 && block_elems > 0, "semoe::storage::tiered: add_layer(experts = ", experts,
                  ", block_elems = ", block_elems, "): expected experts >= 0 and block_elems > 0");
      std::unique_lock lk(m_);
      layer_info li{static_cast<std::size_t>(blocks_.size()), experts, block_elems};
      const std::size_t hb = host_block_bytes(block_elems);
      SEMOE_CHECK(host_.fits(hb) && device_.fits((opt_.device_grads ? 2 : 1) * sizeof(T) * static_cast<std::size_t>(block_elems)),
                  "semoe::storage::tiered: one block of ", block_elems, " elements (", hb,
                  " bytes with its optimizer state) does not fit the host budget (", host_.budget(),
                  " bytes) or its weights and gradients the device budget (", device_.budget(), " bytes)");
      if constexpr (HasSsd) {
        SEMOE_CHECK(!ssd_ || hb <= ssd_->block_bytes(), "semoe::storage::tiered: layer ", layers_.size(),
                    " has blocks of ", hb, " bytes, larger than the SSD file's ", ssd_->block_bytes(),
                    " (add the largest layer first)");
        if (ssd_) ssd_->grow(blocks_.size() + static_cast<std::size_t>(experts));
      }
      for (index_t e = 0; e < experts; ++e) {
        block b;
        b.layer = static_cast<index_t>(layers_.size());
        b.elems = block_elems;
        b.id = blocks_.size();
        b.grads_zero = true;
        blocks_.push_back(b);
      }
      std::visit([&](auto& c) { c.resize(blocks_.size()); }, cache_);
      device_lfu_.resize(blocks_.size());
      layers_.push_back(li);
      counts_.emplace_back();
      return static_cast<index_t>(layers_.size()) - 1;
    }
    index_t layers() const { return static_cast<index_t>(layers_.size()); }
    index_t experts(index_t layer) const { return info(layer).experts; }
    index_t block_elems(index_t layer) const { return info(layer).elems; }
    index_t state_slots() const { return static_cast<index_t>(opt_.state_slots); }

    void reserve_state(index_t slots) {
      SEMOE_CHECK(slots <= state_slots(), "semoe::storage::tiered: the optimizer needs ", slots,
                  " state arrays per block, the store was made with options.state_slots = ", state_slots(),
                  " (set it up front: the block layout on SSD is fixed)");
    }

    /// The block's weights (and its gradients when `grads`: backward) in
    /// device memory, loaded now if a prefetch has not brought them; valid
    /// until release(). Forward asks for weights only, so its loads move half
    /// the bytes and leave nothing to write back.
    block_ref<T> acquire(index_t layer, index_t expert, bool grads = true) {
      SEMOE_CHECK(!grads || opt_.device_grads, "semoe::storage::tiered: layer ", layer,
                  " asked for gradients of a store made for inference (options.device_grads = false)");
      block& b = at(layer, expert);
      std::unique_lock lk(m_);
      const bool hit = b.dev && !b.busy;
      if (hit) {
        ++stats_.hits;
      } else {
        ++stats_.misses;
        const double t0 = trace::recorder::instance().now_us();
        ensure_device(lk, b, false, !grads);
        const double t1 = trace::recorder::instance().now_us();
        stats_.wait_seconds += (t1 - t0) * 1e-6;
        record("wait ", b, "wait", t0, compute_lane());
      }
      ++b.pins;  // from here on no one evicts it, while we may wait below
      // Gradients on the device need a home in host DRAM to go back to.
      if (grads && !b.host) {
        try {
          ensure_host(lk, b, false);
        } catch (...) {
          --b.pins;
          cv_.notify_all();
          throw;
        }
      }
      const auto n = static_cast<std::size_t>(b.elems);
      T* d = reinterpret_cast<T*>(b.dev);
      if (grads && !b.dev_grads) {
        if (b.grads_zero) {
          Space::zero(d + n, n * sizeof(T));
          b.grads_zero = false;
        } else {
          copy_bytes<Space, host_space>(d + n, reinterpret_cast<const T*>(b.host) + n, n * sizeof(T));
          stats_.device.bytes_in += n * sizeof(T);
        }
        b.dev_grads = true;
      }
      if (grads) b.dev_dirty = true;  // backward accumulates into them
      b.fresh = false;
      b.dev_use = ++dev_clock_;
      touch(b);
      return {std::span<T>(d, n), grads ? std::span<T>(d + n, n) : std::span<T>(), {}};
    }

    void release(index_t layer, index_t expert) { release(layer, expert, nullptr); }

    /// Release while device compute may still read the block: compute_done()
    /// returns once it is over, and runs before the block is copied out or
    /// its device memory freed (see storage::event_released).
    void release(index_t layer, index_t expert, std::function<void()> compute_done) {
      block& b = at(layer, expert);
      std::lock_guard lk(m_);
      SEMOE_CHECK(b.pins > 0, "semoe::storage::tiered: release of ", label(b), " without acquire");
      --b.pins;
      if (compute_done) b.compute_done = std::move(compute_done);  // a later use ends after an earlier one
      cv_.notify_all();
    }

    /// f(block_ref) on the whole block in host DRAM, where its optimizer
    /// state lives. `writes`: f changes it (marks it for write-back and drops
    /// a now stale device copy).
    template <class F>
    void visit(index_t layer, index_t expert, F&& f, bool writes = true) {
      block& b = at(layer, expert);
      std::unique_lock lk(m_);
      ensure_host(lk, b, false);
      b.busy = true;
      b.fresh = false;
      await_compute(lk, b);
      const bool pull_grads = b.dev && b.dev_dirty;
      const bool zero = b.grads_zero;
      lk.unlock();
      const auto n = static_cast<std::size_t>(b.elems);
      T* h = reinterpret_cast<T*>(b.host);
      if (pull_grads) copy_traced<host_space, Space>(h + n, reinterpret_cast<const T*>(b.dev) + n, n, "grads to host ", b);
      if (zero) std::fill(h + n, h + 2 * n, T(0));
      try {
        f(block_ref<T>{std::span<T>(h, n), std::span<T>(h + n, n),
                       std::span<T>(h + 2 * n, n * static_cast<std::size_t>(opt_.state_slots))});
      } catch (...) {
        lk.lock();
        settle_after_visit(b, pull_grads, zero, true);
        throw;
      }
      lk.lock();
      settle_after_visit(b, pull_grads, zero, writes);
    }

    void zero_grads(index_t layer) {
      const layer_info& li = info(layer);
      std::unique_lock lk(m_);
      for (index_t e = 0; e < li.experts; ++e) {
        block& b = blocks_[li.first + static_cast<std::size_t>(e)];
        cv_.wait(lk, [&] { return !b.busy; });
        b.grads_zero = true;
        b.dev_dirty = b.dev_grads = false;
      }
    }

    // -- Prefetch interface ---------------------------------------------------

    /// Bring a block to `to` ahead of need, on a mover thread. Gives up
    /// quietly when there is no room (acquire then loads on demand).
    void prefetch(index_t layer, index_t expert, tier_level to) {
      block& b = at(layer, expert);
      std::lock_guard lk(m_);
      if (b.queued || (to == tier_level::device ? b.dev != nullptr : b.host != nullptr)) return;
      b.queued = true;
      queue_.push_back({&b, to});
      ++stats_.prefetches;
      cv_.notify_all();
    }

    /// Routed rows per local expert of `layer` in its latest forward, kept
    /// for the vertical prefetcher (prefetch/expert_prediction.hpp), which
    /// predicts the next use from them.
    void record_counts(index_t layer, std::span<const std::int32_t> counts) {
      std::lock_guard lk(m_);
      auto& c = counts_.at(static_cast<std::size_t>(layer));
      c.assign(counts.begin(), counts.end());
    }
    /// The counts record_counts kept for `layer` (empty: none yet).
    std::vector<std::int32_t> recorded_counts(index_t layer) const {
      std::lock_guard lk(m_);
      (void)info(layer);
      return counts_[static_cast<std::size_t>(layer)];
    }

    /// Once per optimizer step per layer; after the last layer's call the
    /// step's cycle ends: cache counters decay and dirty host blocks are
    /// written back to SSD on the movers (SE-MoE writes back at the end of
    /// each update cycle).
    void end_step(index_t layer) {
      (void)info(layer);
      std::lock_guard lk(m_);
      if (++end_calls_ < layers_.size()) return;
      end_calls_ = 0;
      std::visit([](auto& c) { c.end_step(); }, cache_);
      device_lfu_.end_step();
      if constexpr (HasSsd) {
        for (auto& b : blocks_) queue_write_back(b);
        cv_.notify_all();
      }
    }

    /// Write every dirty block to SSD, make the file's current versions the
    /// committed ones, and hand their records (and where the file is) to
    /// `persist`, which must make them durable (the checkpoint file) before
    /// returning: no block is written meanwhile, so the previous checkpoint's
    /// slots stay intact until the new one exists. (detail/tiered_checkpoint.hpp)
    template <class Persist>
    void checkpoint(Persist&& persist)
      requires HasSsd;

    /// Restart from a checkpoint: every block comes from the SSD file the
    /// checkpoint names (`where`), at its committed versions, verified by
    /// checksum; nothing from memory. Training goes on in that file.
    void restore(std::span<const ssd_block_record> records, const ssd_options& where)
      requires HasSsd;

    /// Wait until no prefetch or write-back is queued or running.
    void drain() {
      std::unique_lock lk(m_);
      cv_.wait(lk, [&] { return queue_.empty() && writebacks_.empty() && active_movers_ == 0; });
    }

    store_stats stats() const {
      std::lock_guard lk(m_);
      store_stats s = stats_;
      s.device.budget_bytes = device_.budget();
      s.device.used_bytes = device_.used();
      s.device.peak_bytes = device_.peak();
      s.host.budget_bytes = host_.budget();
      s.host.used_bytes = host_.used();
      s.host.peak_bytes = host_.peak();
      if constexpr (HasSsd)
        if (ssd_) {
          s.ssd.bytes_in = ssd_->bytes_written() - ssd_base_[0];
          s.ssd.bytes_out = ssd_->bytes_read() - ssd_base_[1];
        }
      return s;
    }
    void reset_stats() {
      std::lock_guard lk(m_);
      stats_ = {};
      device_.reset_peak();
      host_.reset_peak();
      if constexpr (HasSsd)
        if (ssd_) ssd_base_ = {ssd_->bytes_written(), ssd_->bytes_read()};
    }

    /// Where block (layer, expert) is now, for tests and tools.
    bool on_device(index_t layer, index_t expert) const {
      std::lock_guard lk(m_);
      return at(layer, expert).dev != nullptr;
    }
    bool in_host(index_t layer, index_t expert) const {
      std::lock_guard lk(m_);
      return at(layer, expert).host != nullptr;
    }
    const options& opts() const { return opt_; }
    std::filesystem::path ssd_path() const
      requires HasSsd
    {
      std::lock_guard lk(m_);
      return ssd_ ? ssd_->path() : std::filesystem::path{};
    }

   private:
    struct layer_info {
      std::size_t first = 0;
      index_t experts = 0, elems = 0;
    };
    struct block {
      index_t layer = 0, elems = 0;
      std::size_t id = 0;
      std::byte* host = nullptr;  ///< whole block: params | grads | state
      std::byte* dev = nullptr;   ///< params | grads
      bool on_ssd = false;        ///< SSD holds a copy (host may be newer: host_dirty)
      bool host_dirty = false;
      bool dev_grads = false;     ///< the device copy holds the gradients too
      bool dev_dirty = false;     ///< device gradients newer than host's
      bool grads_zero = false;    ///< gradients read as zero wherever they are
      bool busy = false;
      bool queued = false, queued_writeback = false;
      bool writing = false;  ///< busy with a write-back: a host victim all the same, waited for
      bool fresh = false;         ///< prefetched and not used yet: other prefetches do not evict it
      int pins = 0;
      std::function<void()> compute_done;  ///< waits for the compute of the last release
      std::uint64_t dev_use = 0;
    };
    struct task {
      block* b;
      tier_level to;
    };

    static std::size_t host_block_bytes_of(index_t elems, std::size_t slots) {
      const std::size_t raw = (2 + slots) * sizeof(T) * static_cast<std::size_t>(elems);
      return (raw + 4095) / 4096 * 4096;
    }
    std::size_t host_block_bytes(index_t elems) const { return host_block_bytes_of(elems, opt_.state_slots); }
    std::size_t host_bytes(const block& b) const { return host_block_bytes(b.elems); }
    std::size_t dev_bytes(const block& b) const {
      return (opt_.device_grads ? 2 : 1) * sizeof(T) * static_cast<std::size_t>(b.elems);
    }
    std::size_t ssd_block_bytes() const {
      std::size_t m = 4096;
      for (const auto& l : layers_) m = std::max(m, host_block_bytes(l.elems));
      return m;
    }

    const layer_info& info(index_t layer) const {
      SEMOE_CHECK(layer >= 0 && layer < static_cast<index_t>(layers_.size()), "semoe::storage::tiered: no layer ",
                  layer);
      return layers_[static_cast<std::size_t>(layer)];
    }
    block& at(index_t layer, index_t expert) {
      const layer_info& li = info(layer);
      SEMOE_CHECK(expert >= 0 && expert < li.experts, "semoe::storage::tiered: expert ", expert,
                  " is not one of the ", li.experts, " local experts of layer ", layer);
      return blocks_[li.first + static_cast<std::size_t>(expert)];
    }
    const block& at(index_t layer, index_t expert) const { return const_cast<store*>(this)->at(layer, expert); }
    std::string label(const block& b) const {
      return "L" + std::to_string(b.layer) + ".E" + std::to_string(b.id - layers_[static_cast<std::size_t>(b.layer)].first);
    }
    static int compute_lane() {
      return trace::this_thread_lane();
    }
    void touch(const block& b) {
      std::visit([&](auto& c) { c.touch(b.id); }, cache_);
      device_lfu_.touch(b.id);
    }

    /// A trace event from t0 to now named `what` + the block (only when tracing).
    void record(const char* what, const block& b, const char* cat, double t0, int lane) const {
      auto& rec = trace::recorder::instance();
      if (rec.enabled()) rec.add({what + label(b), cat, t0, rec.now_us() - t0, opt_.rank, lane});
    }

    template <class DstSpace, class SrcSpace>
    void copy_traced(T* dst, const T* src, std::size_t n, const char* what, const block& b) {
      const double t0 = trace::recorder::instance().now_us();
      copy_bytes<DstSpace, SrcSpace>(dst, src, n * sizeof(T));
      record(what, b, "load", t0, copy_lane);
    }

    void settle_after_visit(block& b, bool pulled, bool zeroed, bool writes) {
      if (pulled) {  // host holds the newest gradients now, the SSD copy does not
        b.dev_dirty = false;
        b.host_dirty = true;
      }
      if (zeroed) {
        b.grads_zero = false;
        b.host_dirty = true;
      }
      if (writes) {
        b.host_dirty = true;
        if constexpr (HasSsd)
          if (opt_.eager_write_back) queue_write_back(b);
        if (b.dev && b.pins == 0) {  // its weights are stale now
          device_.deallocate(b.dev, dev_bytes(b));
          b.dev = nullptr;
          b.dev_dirty = b.dev_grads = false;
        }
      }
      touch(b);
      b.busy = false;
      cv_.notify_all();
    }

    // -- moves (called with lk held; they unlock around copies and I/O) -------

    /// Make b resident in host DRAM. `prefetch`: give up (false) rather than
    /// wait for room.
    bool ensure_host(std::unique_lock<std::mutex>& lk, block& b, bool prefetch);

    /// Make b's weights resident on the device. `weights_only`: the caller
    /// will not need a host copy next, so a block host DRAM does not admit
    /// may be read through the staging buffer.
    bool ensure_device(std::unique_lock<std::mutex>& lk, block& b, bool prefetch, bool weights_only = false);

    /// Whether b, to be loaded, is one host DRAM turns away: it is on SSD,
    /// DRAM has no free room for it and the cache policy does not admit it.
    bool refused_by_host(const block& b) const;

    /// Take the staging buffer (one SSD block) from the host budget, evicting
    /// as a prefetch would; false when that finds no room. b is not busy.
    bool make_staging(std::unique_lock<std::mutex>& lk, const block& b);

    bool host_victim_ok(const block& v, const block& self, bool prefetch) const;
    bool dev_victim_ok(const block& v, bool prefetch) const;

    /// alloc() for block b, which the caller marked busy: b is unmarked if it throws.
    template <class Arena, class Ok, class Evict>
    std::byte* alloc_for(std::unique_lock<std::mutex>& lk, block& b, Arena& arena, std::size_t bytes, bool prefetch,
                         Ok ok, Evict evict);

    /// Memory from `arena`, evicting victims chosen by the cache policy
    /// (host) or least recent device use (device) until it fits.
    template <class Arena, class Ok, class Evict>
    std::byte* alloc(std::unique_lock<std::mutex>& lk, Arena& arena, std::size_t bytes, bool prefetch,
                     const block& self, Ok ok, Evict evict);

    void evict_device(std::unique_lock<std::mutex>& lk, block& v);

    /// Waits, unlocked, for the device compute that last read b (if the
    /// layer handed one over with its release). Callers have set b.busy.
    void await_compute(std::unique_lock<std::mutex>& lk, block& b);

    void evict_host(std::unique_lock<std::mutex>& lk, block& v);

    /// Queue b for a mover to write back, if it is dirty in host DRAM and not
    /// queued yet (the caller holds m_ and notifies).
    void queue_write_back(block& b) {
      if (b.host && b.host_dirty && !b.queued_writeback) {
        b.queued_writeback = true;
        writebacks_.push_back(&b);
      }
    }
    /// Write v's host copy to SSD (v stays in host DRAM, clean).
    void write_back(std::unique_lock<std::mutex>& lk, block& v);

    void ensure_ssd();

    void mover_loop();

    options opt_;
    using host_arena = host_tier::basic_arena<host_staging_t<Space>>;  // pinned under a device
    device_tier::basic_arena<Space> device_;
    host_arena host_;
    std::byte* staging_buf_ = nullptr;  ///< the read-through buffer, in host_'s budget
    std::size_t staging_bytes_ = 0;
    bool staging_busy_ = false;
    std::conditional_t<HasSsd, std::optional<ssd_tier>, std::monostate> ssd_{};
    std::array<std::uint64_t, 2> ssd_base_{0, 0};
    std::variant<lfu, lru> cache_;
    lfu device_lfu_;  ///< hit counts for the device tier when device_cache is lfu
    std::vector<layer_info> layers_;
    std::deque<block> blocks_;  // stable addresses: movers hold block*
    std::vector<std::vector<std::int32_t>> counts_;
    std::deque<task> queue_;
    std::deque<block*> writebacks_;
    std::size_t end_calls_ = 0;
    std::uint64_t dev_clock_ = 0;
    store_stats stats_;
    mutable std::mutex m_;
    std::condition_variable cv_;
    bool stopping_ = false;
    bool keep_file_ = false;  ///< the SSD file outlives the store once a checkpoint names it
    bool made_dir_ = false;   ///< the SSD directory is the default one this store made
    int active_movers_ = 0;
    std::vector<std::thread> movers_;
  };
};

}  // namespace detail

/// The tier list of a tiered store, fastest first.
template <class... Tiers>
struct tiered {
  static_assert(sizeof...(Tiers) == 0 && false,
                "semoe::storage::tiered: the supported tier lists are <device_tier, host_tier> and "
                "<device_tier, host_tier, ssd_tier>");
};
template <>
struct tiered<device_tier, host_tier> : detail::tiered_policy<false> {};
template <>
struct tiered<device_tier, host_tier, ssd_tier> : detail::tiered_policy<true> {};

static_assert(Storage<tiered<device_tier, host_tier>>);

}  // namespace semoe::storage

// The store's moves between tiers and its checkpoint I/O, defined out of line.
#include "semoe/storage/detail/tiered_moves.hpp"
#include "semoe/storage/detail/tiered_checkpoint.hpp"
