// semoe/infer/ring_engine.hpp: SE-MoE's ring memory for inference (§4).
// Fast memory is formed into K fixed slots; layer i's expert weights live in
// slot i mod K. A loader thread (copying on its own stream on the cuda
// backend, where the slots are device memory) fills the slots
// in layer order from the weights' home, host DRAM or an SSD file: layers
// 0..K-1 first, then, as soon as layer i's forward ends and frees its slot,
// layer i+K while layers i+1.. compute. Fixed slots mean no fragmentation; the
// loader never writes a slot whose layer is computing, and compute never reads
// a slot before its load completed (a condition variable, no sleeps).
//
// Use it as the storage policy of the MoE layers with prefetch policy
// infer::ring_release (it frees a layer's slot when its forward ends); the
// layers are then forward-only.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "semoe/core/memory_space.hpp"
#include "semoe/core/trace.hpp"
#include "semoe/prefetch/concepts.hpp"
#include "semoe/storage/concepts.hpp"
#include "semoe/storage/detail/arena.hpp"
#include "semoe/storage/ssd_tier.hpp"

namespace semoe::infer {

/// Where the weights come from when a slot is filled.
enum class ring_source { dram, ssd };

struct ring_stats {
  std::uint64_t loads = 0;        ///< layer loads into a slot
  std::uint64_t bytes_loaded = 0;
  double load_seconds = 0;        ///< loader time spent filling slots
  double wait_seconds = 0;        ///< compute time spent waiting for a slot
  std::uint64_t bytes_verified = 0;  ///< SSD source: payload bytes whose XXH3 was checked (see verify_every)
};

/// What one slot of the ring holds: a whole layer's experts (the paper's
/// ring), or one expert, for models whose single layer is larger than the
/// fast budget. Experts of a layer are then used in increasing order, and an
/// expert the gate gave no rows is skipped: its slot frees as soon as a
/// later expert of the layer (or the layer's end) shows it was not needed.
enum class ring_unit { layer, expert };

struct ring_release;

struct ring {
  using policy_kind = storage::storage_tag;
  /// Only ring_release frees a layer's slot for the loader.
  template <class Prefetch>
  static constexpr bool pairs_with_prefetch() {
    static_assert(std::is_same_v<Prefetch, ring_release>,
                  "semoe::infer::ring needs the prefetch policy semoe::infer::ring_release: it frees each layer's "
                  "slot when the layer's forward ends; with any other the loader waits forever at layer K");
    return true;
  }

  struct store_options {
    index_t slots = 2;              ///< K; or derived from budget_bytes when that is set
    std::size_t budget_bytes = 0;   ///< fast memory for the ring: K = budget / slot bytes (at least 1)
    ring_source source = ring_source::dram;
    ring_unit unit = ring_unit::layer;
    storage::ssd_options ssd{};     ///< with ring_source::ssd; dir defaults to a temp dir
    /// With ring_source::ssd: every read checks the block's trailer (block,
    /// slot, version, expected checksum); the XXH3 of the payload is checked
    /// on a block's first read and then on every verify_every-th, a rolling
    /// scrub of a file the ring wrote itself and never changes. 1: every
    /// read (hashing every byte loaded costs this 2-core machine about 7 %
    /// of inference time); 0: first read only.
    std::uint32_t verify_every = 8;
    int rank = 0;                   ///< trace process id
  };

  /// Slots in Space (device memory on a device backend); the weights' home
  /// copies, which visit() reads and writes, in host memory.
  template <class T, MemorySpace Space = host_space>
  class store {
   public:
    using value_type = T;
    using options = store_options;
    using memory_space = Space;
    using visit_space = host_space;

    store() : store(options{}) {}
    explicit store(options o) : opt_(std::move(o)) {
      SEMOE_CHECK(opt_.budget_bytes > 0 || opt_.slots >= 1, "semoe::infer::ring: options.slots = ", opt_.slots,
                  ": expected at least 1 (or set budget_bytes)");
      if (opt_.source == ring_source::ssd && opt_.ssd.dir.empty())
        opt_.ssd.dir = std::filesystem::temp_directory_path() / ("semoe-ring-" + std::to_string(::getpid()));
      trace::recorder::instance().name_lane(opt_.rank, loader_lane, "ring loader");
    }
    store(const store&) = delete;
    store& operator=(const store&) = delete;
    ~store() {
      {
        std::lock_guard lk(m_);
        stopping_ = true;
      }
      cv_.notify_all();
      if (loader_.joinable()) loader_.join();
      for (auto& sl : slots_) {
        if (sl.compute_done) try {
            sl.compute_done();
          } catch (...) {  // a failed device: its memory goes back all the same
          }
        arena_->deallocate(reinterpret_cast<std::byte*>(sl.data), slot_bytes());
      }
      if (ssd_) {
        const auto path = ssd_->path();
        ssd_.reset();
        std::error_code ec;
        std::filesystem::remove(path, ec);
      }
    }

    // -- Store interface ------------------------------------------------------

    index_t add_layer(index_t experts, index_t block_elems) {
      SEMOE_CHECK(experts >= 0 && block_elems > 0, "semoe::infer::ring: add_layer(experts = ", experts,
                  ", block_elems = ", block_elems, "): expected experts >= 0 and block_elems > 0");
      std::lock_guard lk(m_);
      SEMOE_CHECK(!started_, "semoe::infer::ring: add_layer after inference started");
      layer_info l;
      l.experts = experts;
      l.elems = block_elems;
      l.first_block = layers_.empty() ? 0 : layers_.back().first_block + static_cast<std::size_t>(layers_.back().experts);
      l.home.resize(static_cast<std::size_t>(experts));
      for (auto& h : l.home) h.assign(static_cast<std::size_t>(block_elems), T(0));
      layers_.push_back(std::move(l));
      return static_cast<index_t>(layers_.size()) - 1;
    }
    index_t layers() const { return static_cast<index_t>(layers_.size()); }
    index_t experts(index_t layer) const { return info(layer).experts; }
    index_t block_elems(index_t layer) const { return info(layer).elems; }
    void reserve_state(index_t) {}
    void zero_grads(index_t) {}

    /// Write or read a block's home copy (weights only: the ring serves
    /// inference). Before the first forward: loading weights, initializing.
    template <class F>
    void visit(index_t layer, index_t expert, F&& f, bool = true) {
      std::lock_guard lk(m_);
      SEMOE_CHECK(!started_, "semoe::infer::ring: visit(", layer, ", ", expert,
                  ") after inference started: the weights are fixed once layers stream through the ring");
      auto& h = home(layer, expert);
      f(storage::block_ref<T>{std::span<T>(h), {}, {}});
    }

    /// The expert's weights in the ring, once their load completed.
    storage::block_ref<T> acquire(index_t layer, index_t expert, bool grads = false) {
      SEMOE_CHECK(!grads, "semoe::infer::ring: layer ", layer, " asked for gradients; the ring store serves "
                  "forward-only inference (train with a tiered or resident store)");
      std::unique_lock lk(m_);
      start();
      const layer_info& l = info(layer);
      SEMOE_CHECK(expert >= 0 && expert < l.experts, "semoe::infer::ring: expert ", expert, " is not one of the ",
                  l.experts, " local experts of layer ", layer);
      const std::uint64_t q = item_seq(layer, expert);
      SEMOE_CHECK(all_fit_ || q >= dead_before_ || (slots_[q % static_cast<std::uint64_t>(k_)].q == q),
                  "semoe::infer::ring: layer ", layer, " expert ", expert, " was already passed over in this forward",
                  opt_.unit == ring_unit::expert ? " (one-expert slots need a layer's experts in increasing order)"
                                                 : " (layers must run in order, each once per forward)");
      if (opt_.unit == ring_unit::expert) kill_before(q);  // earlier experts of this layer were skipped
      slot& s = slots_[static_cast<std::size_t>(q % static_cast<std::uint64_t>(k_))];
      if (!(s.q == q && s.loaded)) {
        const double t0 = trace::recorder::instance().now_us();
        cv_.wait(lk, [&] { return (s.q == q && s.loaded) || failure_; });
        const double t1 = trace::recorder::instance().now_us();
        stats_.wait_seconds += (t1 - t0) * 1e-6;
        auto& rec = trace::recorder::instance();
        if (rec.enabled())
          rec.add({"wait L" + std::to_string(layer) + ".E" + std::to_string(expert), "wait", t0, t1 - t0, opt_.rank,
                   trace::this_thread_lane()});
      }
      if (failure_) ::semoe::detail::fail(*failure_);
      ++s.users;
      const std::size_t offset = opt_.unit == ring_unit::layer ? static_cast<std::size_t>(expert) * stride(l) : 0;
      return {std::span<T>(s.data + offset, static_cast<std::size_t>(l.elems)), {}, {}};
    }
    void release(index_t layer, index_t expert) { release(layer, expert, nullptr); }

    /// Release while device compute may still read the slot: the loader
    /// calls compute_done() before it overwrites the slot (see
    /// storage::event_released).
    void release(index_t layer, index_t expert, std::function<void()> compute_done) {
      std::lock_guard lk(m_);
      const std::uint64_t q = item_seq(layer, expert);
      slot& s = slots_[static_cast<std::size_t>(q % static_cast<std::uint64_t>(k_))];
      SEMOE_CHECK(s.q == q && s.users > 0, "semoe::infer::ring: release of layer ", layer, " expert ", expert,
                  " that holds no slot");
      --s.users;
      if (compute_done) s.compute_done = std::move(compute_done);  // a later use ends after an earlier one
      if (opt_.unit == ring_unit::expert) kill_before(q + 1);  // used: its slot takes the next expert
    }

    /// Layer `layer`'s forward is over: its slot(s) take what comes K ahead.
    void end_layer(index_t layer) {
      std::lock_guard lk(m_);
      if (!started_) return;
      const layer_info& l = info(layer);
      kill_before(pass_ * items_ + (opt_.unit == ring_unit::layer ? static_cast<std::uint64_t>(layer + 1)
                                                                  : l.first_block + static_cast<std::size_t>(l.experts)));
      if (layer + 1 == layers()) ++pass_;  // the next forward starts the next turn of the ring
    }

    index_t slots() const {
      std::lock_guard lk(m_);
      return started_ ? k_ : derive_slots();
    }
    std::size_t slot_bytes() const { return slot_elems() * sizeof(T); }
    ring_stats stats() const {
      std::lock_guard lk(m_);
      return stats_;
    }
    void reset_stats() {
      std::lock_guard lk(m_);
      stats_ = {};
    }
    const options& opts() const { return opt_; }

   private:
    static constexpr int loader_lane = 1003;
    static constexpr std::uint64_t none = ~std::uint64_t{0};

    struct layer_info {
      index_t experts = 0, elems = 0;
      std::size_t first_block = 0;  // this layer's first expert among all experts
      std::vector<std::vector<T>> home;  // the DRAM copy (the SSD source is filled from it)
    };
    /// Items are loaded in a fixed cyclic order (layers, or experts layer by
    /// layer), numbered without wrapping: item q goes to slot q mod K.
    struct slot {
      T* data = nullptr;
      std::uint64_t q = none;
      bool loaded = false;
      int users = 0;
      std::function<void()> compute_done;  ///< waits for the compute of the last release
    };

    const layer_info& info(index_t layer) const {
      SEMOE_CHECK(layer >= 0 && layer < static_cast<index_t>(layers_.size()), "semoe::infer::ring: no layer ", layer);
      return layers_[static_cast<std::size_t>(layer)];
    }
    std::vector<T>& home(index_t layer, index_t expert) {
      const layer_info& l = info(layer);
      SEMOE_CHECK(expert >= 0 && expert < l.experts, "semoe::infer::ring: expert ", expert, " is not one of the ",
                  l.experts, " local experts of layer ", layer);
      return layers_[static_cast<std::size_t>(layer)].home[static_cast<std::size_t>(expert)];
    }
    /// Elements between experts in a slot: 4 KiB aligned so SSD reads land in place.
    static std::size_t stride(const layer_info& l) {
      const std::size_t bytes = static_cast<std::size_t>(l.elems) * sizeof(T);
      return (bytes + 4095) / 4096 * 4096 / sizeof(T);
    }
    std::size_t slot_elems() const {
      std::size_t m = 0;
      for (const auto& l : layers_)
        m = std::max(m, stride(l) * (opt_.unit == ring_unit::layer ? static_cast<std::size_t>(l.experts) : 1));
      return std::max<std::size_t>(m, 4096 / sizeof(T));
    }
    index_t derive_slots() const {
      if (opt_.budget_bytes == 0) return opt_.slots;
      return std::max<index_t>(1, static_cast<index_t>(opt_.budget_bytes / slot_bytes()));
    }
    std::uint64_t item_of(index_t layer, index_t expert) const {
      return opt_.unit == ring_unit::layer ? static_cast<std::uint64_t>(layer)
                                           : info(layer).first_block + static_cast<std::size_t>(expert);
    }
    std::uint64_t item_seq(index_t layer, index_t expert) const {
      return (all_fit_ ? 0 : pass_ * items_) + item_of(layer, expert);
    }
    /// Which layer and experts item q (of any turn) holds.
    std::pair<index_t, std::pair<index_t, index_t>> item_content(std::uint64_t q) const {
      const std::uint64_t j = q % items_;
      if (opt_.unit == ring_unit::layer) {
        const auto l = static_cast<index_t>(j);
        return {l, {0, info(l).experts}};
      }
      index_t l = 0;
      while (layers_[static_cast<std::size_t>(l)].first_block + static_cast<std::size_t>(layers_[static_cast<std::size_t>(l)].experts) <= j) ++l;
      const auto e = static_cast<index_t>(j - layers_[static_cast<std::size_t>(l)].first_block);
      return {l, {e, e + 1}};
    }

    /// Items before q of this turn will not be used (anymore): their slots
    /// are free once no one holds them, and the loader skips them.
    void kill_before(std::uint64_t q) {
      if (all_fit_) return;
      dead_before_ = std::max(dead_before_, q);
      for (auto& s : slots_)
        if (s.q != none && s.q < dead_before_ && s.users == 0 && s.loaded) {
          s.q = none;
          s.loaded = false;
        }
      cv_.notify_all();
    }

    /// First acquire: the slots, the SSD copy if that is the source, the loader.
    void start() {
      if (started_) return;
      SEMOE_CHECK(!layers_.empty(), "semoe::infer::ring: no layers");
      items_ = 0;
      for (const auto& l : layers_)
        items_ += opt_.unit == ring_unit::layer ? 1 : static_cast<std::uint64_t>(l.experts);
      SEMOE_CHECK(items_ > 0, "semoe::infer::ring: the layers have no experts");
      k_ = derive_slots();
      SEMOE_CHECK(opt_.budget_bytes == 0 || static_cast<std::size_t>(k_) * slot_bytes() <= opt_.budget_bytes,
                  "semoe::infer::ring: budget_bytes = ", opt_.budget_bytes, " cannot hold one slot of ", slot_bytes(),
                  " bytes (the largest ", opt_.unit == ring_unit::layer ? "layer's expert weights" : "expert",
                  "; ring_unit::expert needs less)");
      all_fit_ = static_cast<std::uint64_t>(k_) >= items_;
      if constexpr (std::is_same_v<Space, host_space>)
        arena_ = std::make_unique<storage::detail::budget_arena>("semoe::infer::ring", 0, 4096);
      else
        arena_ = std::make_unique<storage::detail::budget_arena>(
            "semoe::infer::ring", 0, 4096, [](std::size_t b, std::size_t) { return Space::allocate(b); },
            [](void* p, std::size_t b) { Space::deallocate(p, b); });
      slots_.resize(static_cast<std::size_t>(k_));
      for (auto& s : slots_) s.data = reinterpret_cast<T*>(arena_->allocate(slot_bytes()));
      if (opt_.source == ring_source::ssd) write_ssd_copy();
      started_ = true;
      const int context = space_context<Space>::current();  // the loader fills slots on this thread's device
      loader_ = std::thread([this, context] {
        space_context<Space>::adopt(context);
        loader_loop();
      });
    }

    /// The SSD source: each expert's weights as one checksummed block.
    void write_ssd_copy() {
      std::size_t blocks = 0, bytes = 4096;
      for (const auto& l : layers_) {
        blocks += static_cast<std::size_t>(l.experts);
        bytes = std::max(bytes, stride(l) * sizeof(T));
      }
      ssd_.emplace(opt_.ssd, bytes, std::max<std::size_t>(blocks, 1));
      std::unique_ptr<std::byte, void (*)(std::byte*)> buf(static_cast<std::byte*>(std::aligned_alloc(4096, bytes)),
                                                           [](std::byte* p) { std::free(p); });
      if (!buf) throw std::bad_alloc();
      std::size_t b = 0;
      for (const auto& l : layers_)
        for (const auto& h : l.home) {
          std::memset(buf.get(), 0, bytes);
          std::memcpy(buf.get(), h.data(), h.size() * sizeof(T));
          ssd_->write(b++, buf.get()).wait();
        }
      ssd_->commit();
      ssd_bytes_ = bytes;
      reads_.assign(blocks, 0);
    }

    void loader_loop() {
      std::unique_lock lk(m_);
      for (std::uint64_t q = 0;; ++q) {
        if (all_fit_ && q == items_) return;  // every item has a slot of its own: the ring never turns
        slot& s = slots_[static_cast<std::size_t>(q % static_cast<std::uint64_t>(k_))];
        cv_.wait(lk, [&] { return stopping_ || s.q == none; });
        if (stopping_) return;
        if (q < dead_before_) continue;  // already known unused: not loaded at all
        s.q = q;  // claimed: compute waits for `loaded`
        const auto [layer, range] = item_content(q);
        auto compute_done = std::exchange(s.compute_done, nullptr);
        lk.unlock();
        const double t0 = trace::recorder::instance().now_us();
        std::optional<std::string> failed;
        std::size_t bytes = 0;
        try {
          if (compute_done) compute_done();  // the slot's last reader is done with it
          bytes = fill(s.data, layer, range.first, range.second);
        } catch (const std::exception& e) {
          failed = e.what();
        }
        const double t1 = trace::recorder::instance().now_us();
        auto& rec = trace::recorder::instance();
        if (rec.enabled())
          rec.add({"ring load L" + std::to_string(layer) +
                       (opt_.unit == ring_unit::expert ? ".E" + std::to_string(range.first) : std::string()),
                   "load", t0, t1 - t0, opt_.rank, loader_lane});
        lk.lock();
        if (failed) {
          failure_ = "semoe::infer::ring: loading layer " + std::to_string(layer) + ": " + *failed;
          cv_.notify_all();
          return;
        }
        s.loaded = true;
        stats_.bytes_verified += last_verified_;
        last_verified_ = 0;
        ++stats_.loads;
        stats_.bytes_loaded += bytes;
        stats_.load_seconds += (t1 - t0) * 1e-6;
        if (q < dead_before_ && s.users == 0) {  // became unused while loading
          s.q = none;
          s.loaded = false;
        }
        cv_.notify_all();
      }
    }

    /// Copy experts [e0, e1) of `layer` into a slot; returns the bytes moved.
    std::size_t fill(T* dst, index_t layer, index_t e0, index_t e1) {
      const layer_info& l = layers_[static_cast<std::size_t>(layer)];
      const std::size_t st = stride(l);
      if (opt_.source == ring_source::dram) {
        for (index_t e = e0; e < e1; ++e)
          copy_bytes<Space, host_space>(dst + static_cast<std::size_t>(e - e0) * st,
                                        l.home[static_cast<std::size_t>(e)].data(),
                                        static_cast<std::size_t>(l.elems) * sizeof(T));
        return static_cast<std::size_t>(e1 - e0) * static_cast<std::size_t>(l.elems) * sizeof(T);
      }
      // In place when the slot is host memory whose stride equals the SSD
      // block; otherwise through a bounce buffer.
      const bool in_place = Space::host_accessible && st * sizeof(T) == ssd_bytes_;
      std::unique_ptr<std::byte[], void (*)(std::byte*)> bounce(nullptr, [](std::byte* p) { std::free(p); });
      if (!in_place) bounce.reset(static_cast<std::byte*>(std::aligned_alloc(4096, ssd_bytes_)));
      std::vector<storage::io_handle> pending;
      std::uint64_t verified = 0;
      for (index_t e = e0; e < e1; ++e) {
        T* to = dst + static_cast<std::size_t>(e - e0) * st;
        const std::size_t block = l.first_block + static_cast<std::size_t>(e);
        const std::uint32_t n = reads_[block]++;
        const bool full = n == 0 || (opt_.verify_every > 0 && n % opt_.verify_every == 0);
        const auto check = full ? storage::ssd_tier::check::payload : storage::ssd_tier::check::trailer_only;
        if (full) verified += ssd_bytes_;
        if (in_place) {
          pending.push_back(ssd_->read(block, reinterpret_cast<std::byte*>(to), check));
        } else {
          ssd_->read(block, bounce.get(), check).wait();
          copy_bytes<Space, host_space>(to, bounce.get(), static_cast<std::size_t>(l.elems) * sizeof(T));
        }
      }
      for (auto& h : pending) h.wait();
      last_verified_ = verified;  // published with the load, under m_
      return static_cast<std::size_t>(e1 - e0) * ssd_bytes_;
    }

    options opt_;
    std::vector<layer_info> layers_;
    std::unique_ptr<storage::detail::budget_arena> arena_;
    std::vector<slot> slots_;
    std::optional<storage::ssd_tier> ssd_;
    std::size_t ssd_bytes_ = 0;
    std::vector<std::uint32_t> reads_;  // loader thread: reads of each SSD block so far
    std::uint64_t last_verified_ = 0;   // loader thread: payload bytes hashed by the last fill
    index_t k_ = 0;
    std::uint64_t items_ = 0, pass_ = 0, dead_before_ = 0;
    bool all_fit_ = false;
    ring_stats stats_;
    std::optional<std::string> failure_;
    bool started_ = false, stopping_ = false;
    mutable std::mutex m_;
    std::condition_variable cv_;
    std::thread loader_;
  };
};

/// The prefetch policy that goes with ring: when a layer's forward ends its
/// slot is released to the loader.
struct ring_release {
  using policy_kind = prefetch::prefetch_tag;
  template <class Storage>
  static constexpr bool pairs_with_storage() {
    static_assert(std::is_same_v<Storage, ring>,
                  "semoe::infer::ring_release goes with the storage policy semoe::infer::ring only; with another "
                  "storage policy use prefetch::on_demand or prefetch::vertical<D>");
    return true;
  }
  template <class Store>
  void before(Store&, index_t, prefetch::phase, std::span<const std::int32_t>) {}
  template <class Store>
  void after(Store& s, index_t layer, prefetch::phase) {
    if constexpr (requires { s.end_layer(layer); }) s.end_layer(layer);
  }
  template <class Store>
  void end_step(Store&) {}
};

static_assert(storage::Storage<ring>);
static_assert(prefetch::Prefetcher<ring_release>);

}  // namespace semoe::infer
