// semoe/storage/ssd_tier.hpp: the SSD tier of SE-MoE's hierarchical storage
// (SE-MoE §3.2): expert parameter blocks live in one file per rank and move
// asynchronously while training computes. Crash safety comes from shadow
// paging: every block has two slots, a write never touches the committed one,
// and each slot carries a checksummed trailer so a restart can prove it.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <limits>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "semoe/core/error.hpp"
#include "semoe/storage/concepts.hpp"
#include "semoe/storage/detail/ssd_engine.hpp"
#include "semoe/storage/ssd_options.hpp"

namespace semoe::storage {

/// The completion of one read or write. Movable; a default-constructed handle
/// is ready. wait() rethrows the op's semoe::error once, then the handle is empty.
class io_handle {
 public:
  io_handle() = default;
  explicit io_handle(std::shared_ptr<detail::ssd_op_state> s) : s_(std::move(s)) {}
  io_handle(io_handle&&) noexcept = default;
  io_handle& operator=(io_handle&&) noexcept = default;
  io_handle(const io_handle&) = delete;
  io_handle& operator=(const io_handle&) = delete;

  void wait() {
    if (!s_) return;
    auto s = std::move(s_);
    std::unique_lock lk(s->m);
    s->cv.wait(lk, [&] { return s->done; });
    if (s->err) std::rethrow_exception(s->err);
  }
  bool ready() const {
    if (!s_) return true;
    std::lock_guard lk(s_->m);
    return s_->done;
  }

 private:
  std::shared_ptr<detail::ssd_op_state> s_;
};

/// Expert blocks on SSD, two slots each. Writes go to the slot that is not the
/// block's committed one; commit() fdatasyncs and promotes the written slots.
/// Crash safety needs the caller to persist commit()'s records before the next
/// write of a block: that write reuses the slot the previous checkpoint names.
class ssd_tier {
 public:
  using tier_kind = tier_tag;
  static constexpr std::string_view name = "ssd";
  static constexpr std::size_t alignment = detail::ssd_page;

  /// Throws a semoe::error naming the first bad field.
  static void validate(const ssd_options& o, std::size_t block_bytes, std::size_t blocks) {
    SEMOE_CHECK(!o.dir.empty(), "semoe::storage::ssd_tier: options.dir is empty; expected a directory");
    SEMOE_CHECK(o.rank >= 0, "semoe::storage::ssd_tier: options.rank = ", o.rank, "; expected >= 0");
    SEMOE_CHECK(o.io_threads >= 1 && o.io_threads <= 256,
                "semoe::storage::ssd_tier: options.io_threads = ", o.io_threads, "; expected 1..256");
    SEMOE_CHECK(block_bytes > 0 && block_bytes % alignment == 0,
                "semoe::storage::ssd_tier: block_bytes = ", block_bytes, "; expected a positive multiple of ",
                alignment);
    const auto max = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());
    SEMOE_CHECK(blocks <= max / 2 / (block_bytes + detail::ssd_page), "semoe::storage::ssd_tier: blocks = ", blocks,
                " of block_bytes = ", block_bytes, " do not fit in one file");
  }
  /// The file these options name (a new tier may take a fresh name beside
  /// it; see ssd_options::file and path()).
  static std::filesystem::path file_path(const ssd_options& o) {
    return o.dir / (o.file.empty() ? "semoe-rank" + std::to_string(o.rank) + ".blocks" : o.file);
  }
  /// Size of the file: two slots of payload + trailer page per block.
  static std::uint64_t file_bytes(std::size_t block_bytes, std::size_t blocks) {
    return 2ull * blocks * (block_bytes + detail::ssd_page);
  }

  /// A new, empty file, sized up front; an existing file of that name is
  /// left alone (the new one takes a fresh name beside it).
  ssd_tier(ssd_options o, std::size_t block_bytes, std::size_t blocks)
      : e_((validate(o, block_bytes, blocks), std::make_unique<detail::ssd_engine>(o, block_bytes, blocks, true))) {}

  /// Restart from a checkpoint's records: reads and verifies every committed
  /// block, so a damaged or truncated file fails here, naming the block.
  static ssd_tier reopen(ssd_options o, std::size_t block_bytes, std::span<const ssd_block_record> committed) {
    validate(o, block_bytes, committed.size());
    for (std::size_t b = 0; b < committed.size(); ++b) {
      const auto& r = committed[b];
      SEMOE_CHECK(r.slot <= 1, "semoe::storage::ssd_tier: reopen(", file_path(o).string(), "): block ", b,
                  ": record slot = ", r.slot, "; expected 0 or 1");
      SEMOE_CHECK(r.version > 0 || r.checksum == 0, "semoe::storage::ssd_tier: reopen(", file_path(o).string(),
                  "): block ", b, ": record version 0 (never written) with checksum ", r.checksum,
                  "; expected checksum 0");
    }
    // Verify in waves through the normal read path; the lowest bad block is
    // reported. The scratch outlives t, whose destructor waits for its reads.
    const std::size_t wave = std::min<std::size_t>(committed.size(), 2 * static_cast<std::size_t>(o.io_threads) + 2);
    std::vector<std::unique_ptr<std::byte[], buffer_deleter>> scratch;
    for (std::size_t i = 0; i < wave; ++i) scratch.push_back(make_buffer(block_bytes));
    ssd_tier t(std::make_unique<detail::ssd_engine>(o, block_bytes, committed.size(), false));
    t.e_->adopt(committed);
    std::vector<io_handle> pending(wave);
    for (std::size_t b0 = 0; b0 < committed.size(); b0 += wave) {
      const std::size_t n = std::min(wave, committed.size() - b0);
      for (std::size_t i = 0; i < n; ++i)
        if (committed[b0 + i].version > 0) pending[i] = t.read(b0 + i, scratch[i].get());
      std::exception_ptr first;
      for (std::size_t i = 0; i < n; ++i) {
        try {
          pending[i].wait();
        } catch (...) {
          if (!first) first = std::current_exception();
        }
      }
      if (first) std::rethrow_exception(first);
    }
    t.e_->restore_size();
    return t;
  }

  ssd_tier(ssd_tier&&) noexcept = default;
  ssd_tier& operator=(ssd_tier&&) noexcept = default;
  ~ssd_tier() = default;  // the engine waits for in-flight ops and never throws

  /// Write block_bytes() from `src` (alignment-aligned; valid and unchanged until done).
  io_handle write(std::size_t block, const std::byte* src) {
    return io_handle(engine().submit(true, block, const_cast<std::byte*>(src)));
  }
  /// How much of a read is verified.
  enum class check { payload, trailer_only };
  /// Read the current version into `dst` (alignment-aligned), verified by its
  /// trailer (block, slot, version, expected checksum) and the XXH3 of the
  /// payload; check::trailer_only skips hashing the payload, for a reader
  /// that re-reads immutable blocks it has verified before (infer::ring).
  io_handle read(std::size_t block, std::byte* dst, check c = check::payload) {
    return io_handle(engine().submit(false, block, dst, c == check::payload));
  }
  /// Wait for in-flight writes, fdatasync, and make the current slots the
  /// committed ones; the records returned are what a checkpoint must store.
  std::vector<ssd_block_record> commit() { return engine().commit(); }
  /// Make room for `blocks` blocks (>= blocks()); the new ones have no data yet.
  void grow(std::size_t blocks) {
    validate(ssd_options{.dir = path().parent_path()}, block_bytes(), blocks);
    engine().grow(blocks);
  }

  bool has_data(std::size_t block) const { return engine().has_data(block); }
  std::size_t block_bytes() const { return engine().block_bytes(); }
  std::size_t blocks() const { return engine().blocks(); }
  const std::filesystem::path& path() const { return engine().path(); }
  bool direct_io() const { return engine().direct_io(); }
  std::string_view engine_name() const { return engine().engine_name(); }
  std::uint64_t bytes_read() const { return engine().bytes_read(); }
  std::uint64_t bytes_written() const { return engine().bytes_written(); }

 private:
  struct buffer_deleter {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{alignment}); }
  };
  static std::unique_ptr<std::byte[], buffer_deleter> make_buffer(std::size_t bytes) {
    return std::unique_ptr<std::byte[], buffer_deleter>(
        static_cast<std::byte*>(::operator new[](bytes, std::align_val_t{alignment})));
  }

  explicit ssd_tier(std::unique_ptr<detail::ssd_engine> e) : e_(std::move(e)) {}
  detail::ssd_engine& engine() const {
    SEMOE_CHECK(e_ != nullptr, "semoe::storage::ssd_tier: use of a moved-from ssd_tier");
    return *e_;
  }

  std::unique_ptr<detail::ssd_engine> e_;
};

static_assert(Tier<ssd_tier>);

}  // namespace semoe::storage
