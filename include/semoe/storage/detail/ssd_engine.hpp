// semoe/storage/detail/ssd_engine.hpp: the SSD tier's engine: one file of
// two slots per block (shadow paging), each slot's checksummed trailer, and
// the I/O underneath: io_uring where the kernel allows it, else a pool of
// pread/pwrite workers. storage::ssd_tier is its public face.
#pragma once

#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "semoe/core/error.hpp"
#include "semoe/storage/ssd_options.hpp"

namespace semoe::storage {

namespace detail {

inline constexpr std::size_t ssd_page = 4096;
inline constexpr char ssd_magic[8] = {'S', 'E', 'M', 'O', 'E', 'S', 'S', 'D'};
inline constexpr std::uint32_t ssd_format = 1;

/// The fields at the start of a slot's trailer page; the rest of the page is
/// zero. Native byte order: the file belongs to one rank on one machine.
struct ssd_trailer {
  char magic[8];
  std::uint32_t format;
  std::uint32_t slot;
  std::uint64_t block;
  std::uint64_t version;
  std::uint64_t payload_bytes;
  std::uint64_t payload_checksum;
  std::uint64_t trailer_checksum;  ///< XXH3 of every field above
};
static_assert(sizeof(ssd_trailer) == 56 && offsetof(ssd_trailer, trailer_checksum) == 48);

struct ssd_page_deleter {
  void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{ssd_page}); }
};
using ssd_page_ptr = std::unique_ptr<std::byte[], ssd_page_deleter>;

inline ssd_page_ptr make_ssd_page() {
  auto* p = static_cast<std::byte*>(::operator new[](ssd_page, std::align_val_t{ssd_page}));
  std::memset(p, 0, ssd_page);
  return ssd_page_ptr(p);
}

inline std::string errno_text(int e) { return std::system_category().message(e); }

/// Completion of one op, shared by the engine and the caller's io_handle.
struct ssd_op_state {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  std::exception_ptr err;

  void complete(std::exception_ptr e) {
    {
      std::lock_guard lk(m);
      err = std::move(e);
      done = true;
    }
    cv.notify_all();
  }
};

struct ssd_op {
  bool is_write = false;
  bool check_payload = true;  ///< read: hash the payload too (the trailer is always checked)
  std::size_t block = 0;
  std::uint32_t slot = 0;
  std::uint64_t version = 0;
  std::uint64_t checksum = 0;  ///< expected (read) or computed (write)
  std::byte* data = nullptr;
  ssd_page_ptr trailer = make_ssd_page();
  iovec iov[2]{};
  off_t offset = 0;
  std::shared_ptr<ssd_op_state> state = std::make_shared<ssd_op_state>();
};

/// Finish a transfer with preadv/pwritev from byte `done` on: bytes moved in
/// total (short only at end of file), or -errno.
inline long ssd_transfer(int fd, ssd_op& op, std::size_t done) {
  const std::size_t total = op.iov[0].iov_len + op.iov[1].iov_len;
  while (done < total) {
    iovec rest[2];
    int n = 0;
    std::size_t skip = done;
    for (const auto& v : op.iov) {
      if (skip >= v.iov_len) {
        skip -= v.iov_len;
        continue;
      }
      rest[n++] = {static_cast<char*>(v.iov_base) + skip, v.iov_len - skip};
      skip = 0;
    }
    const off_t at = op.offset + static_cast<off_t>(done);
    const ssize_t r = op.is_write ? ::pwritev(fd, rest, n, at) : ::preadv(fd, rest, n, at);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (r == 0) break;
    done += static_cast<std::size_t>(r);
  }
  return static_cast<long>(done);
}

class ssd_engine {
 public:
  ssd_engine(const ssd_options& o, std::size_t block_bytes, std::size_t blocks, bool create)
      : path_(o.dir / (o.file.empty() ? "semoe-rank" + std::to_string(o.rank) + ".blocks" : o.file)),
        block_bytes_(block_bytes),
        slot_bytes_(block_bytes + ssd_page),
        state_(blocks),
        blocks_(blocks) {
    std::error_code ec;
    std::filesystem::create_directories(o.dir, ec);
    SEMOE_CHECK(!ec, "semoe::storage::ssd_tier: options.dir = ", o.dir.string(), ": cannot create it: ", ec.message());
    bool made = false;
    try {
      open_file(o.direct, create);
      made = create;
      if (create) size_file();
      start(o);
    } catch (...) {
      shutdown();
      if (made) std::filesystem::remove(path_, ec);  // a new file that failed to size is not left half-made
      throw;
    }
  }

  ~ssd_engine() { shutdown(); }

  ssd_engine(const ssd_engine&) = delete;
  ssd_engine& operator=(const ssd_engine&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::size_t block_bytes() const { return block_bytes_; }
  std::size_t blocks() const { return blocks_.load(std::memory_order_acquire); }
  bool direct_io() const { return direct_; }
  std::string_view engine_name() const { return uring_ ? "io_uring" : "threads"; }
  std::uint64_t bytes_read() const { return bytes_read_.load(std::memory_order_relaxed); }
  std::uint64_t bytes_written() const { return bytes_written_.load(std::memory_order_relaxed); }
  std::uint64_t file_bytes() const { return 2 * blocks() * slot_bytes_; }

  bool has_data(std::size_t block) const {
    check_block(block, "has_data");
    std::lock_guard lk(m_);
    return state_[block].current.version > 0;
  }

  /// Adopt checkpoint records as both the committed and the current copies.
  void adopt(std::span<const ssd_block_record> committed) {
    std::lock_guard lk(m_);
    for (std::size_t b = 0; b < state_.size(); ++b) state_[b].committed = state_[b].current = committed[b];
  }

  std::shared_ptr<ssd_op_state> submit(bool is_write, std::size_t block, std::byte* data, bool check_payload = true) {
    const char* what = is_write ? "write" : "read";
    check_block(block, what);
    SEMOE_CHECK(data != nullptr && reinterpret_cast<std::uintptr_t>(data) % ssd_page == 0,
                "semoe::storage::ssd_tier: ", what, "(block ", block, "): buffer ", static_cast<const void*>(data),
                " is not ", ssd_page, "-byte aligned (O_DIRECT needs page-aligned memory)");
    auto op = std::make_unique<ssd_op>();
    op->is_write = is_write;
    op->check_payload = check_payload;
    op->block = block;
    op->data = data;
    {
      std::unique_lock lk(m_);
      // commit() snapshots the current slots; a write landing meanwhile could
      // overwrite the slot being committed.
      if (is_write) cv_.wait(lk, [&] { return !committing_; });
      auto& s = state_[block];
      SEMOE_CHECK(!s.busy, "semoe::storage::ssd_tier: ", path_.string(), ": ", what, "(block ", block,
                  ") while another read or write of block ", block,
                  " is in flight; expected one op per block at a time (wait() "
                  "on its io_handle first)");
      if (is_write) {
        op->slot = s.committed.slot ^ 1u;  // never the committed copy
        op->version = s.current.version + 1;
      } else {
        SEMOE_CHECK(s.current.version > 0, "semoe::storage::ssd_tier: ", path_.string(), ": read(block ", block,
                    "): block ", block, " was never written; expected a block with data (see has_data())");
        op->slot = s.current.slot;
        op->version = s.current.version;
        op->checksum = s.current.checksum;
      }
      s.busy = true;
      ++inflight_;
      if (is_write) ++writes_inflight_;
    }
    op->offset = static_cast<off_t>((2 * block + op->slot) * slot_bytes_);
    op->iov[0] = {op->data, block_bytes_};
    op->iov[1] = {op->trailer.get(), ssd_page};
    auto state = op->state;
    {
      std::lock_guard lk(qm_);
      queue_.push_back(std::move(op));
    }
    qcv_.notify_one();
    return state;
  }

  std::vector<ssd_block_record> commit() {
    {
      std::unique_lock lk(m_);
      SEMOE_CHECK(!committing_, "semoe::storage::ssd_tier: ", path_.string(),
                  ": commit() while another commit() is running; expected one "
                  "at a time");
      // After a failed fdatasync the kernel may drop the dirty pages and report
      // success next time; no later commit can be trusted.
      SEMOE_CHECK(!sync_failed_, "semoe::storage::ssd_tier: ", path_.string(),
                  ": an earlier fdatasync failed; restart from the last checkpoint");
      committing_ = true;
      cv_.wait(lk, [&] { return writes_inflight_ == 0; });
    }
    const int rc = ::fdatasync(fd_);
    const int e = errno;
    std::vector<ssd_block_record> out;
    {
      std::lock_guard lk(m_);
      committing_ = false;
      sync_failed_ = rc != 0;
      if (rc == 0) {
        out.reserve(state_.size());
        for (auto& s : state_) {
          s.committed = s.current;
          out.push_back(s.committed);
        }
      }
    }
    cv_.notify_all();
    SEMOE_CHECK(rc == 0, "semoe::storage::ssd_tier: ", path_.string(), ": fdatasync: ", errno_text(e));
    return out;
  }

  /// Extend the file to `blocks` blocks; the new ones are never written.
  void grow(std::size_t blocks) {
    std::lock_guard lk(m_);
    const std::size_t old = state_.size();
    SEMOE_CHECK(blocks >= old, "semoe::storage::ssd_tier: ", path_.string(), ": grow(", blocks,
                "): expected at least the current blocks = ", old);
    if (blocks == old) return;
    const auto bytes = static_cast<off_t>(2 * blocks * slot_bytes_), from = static_cast<off_t>(2 * old * slot_bytes_);
    SEMOE_CHECK(::ftruncate(fd_, bytes) == 0, "semoe::storage::ssd_tier: ", path_.string(), ": ftruncate(", bytes,
                "): ", errno_text(errno));
    // The next commit()'s fdatasync persists the new size with the data.
    if (::fallocate(fd_, 0, from, bytes - from) != 0)
      SEMOE_CHECK(errno == EOPNOTSUPP || errno == ENOSYS, "semoe::storage::ssd_tier: ", path_.string(), ": fallocate(",
                  bytes - from, "): ", errno_text(errno));
    state_.resize(blocks);
    blocks_.store(blocks, std::memory_order_release);
  }

  /// Grow a file that lost its tail after every committed block verified.
  void restore_size() {
    struct stat st {};
    if (::fstat(fd_, &st) == 0 && static_cast<std::uint64_t>(st.st_size) < file_bytes())
      SEMOE_CHECK(::ftruncate(fd_, static_cast<off_t>(file_bytes())) == 0, "semoe::storage::ssd_tier: ", path_.string(),
                  ": ftruncate(", file_bytes(), "): ", errno_text(errno));
  }

 private:
  struct block_state {
    ssd_block_record committed, current;
    bool busy = false;
  };

  // Wait for in-flight ops, stop the workers and the reaper, close the file;
  // also undoes a constructor that failed halfway.
  void shutdown() noexcept {
    try {
      {
        std::unique_lock lk(m_);
        cv_.wait(lk, [&] { return inflight_ == 0; });
      }
      {
        std::lock_guard lk(qm_);
        stop_ = true;
      }
      qcv_.notify_all();
      for (auto& t : workers_) t.join();
      if (uring_) {
        // A NOP tagged nullptr tells the reaper to leave; every real op is done.
        {
          std::lock_guard lk(ring_m_);
          io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
          if (sqe) {
            io_uring_prep_nop(sqe);
            io_uring_sqe_set_data(sqe, nullptr);
          }
          while (io_uring_submit(&ring_) == -EINTR) {
          }
        }
        if (reaper_.joinable()) reaper_.join();
        io_uring_queue_exit(&ring_);
        uring_ = false;
      }
    } catch (...) {
    }
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  void check_block(std::size_t block, const char* what) const {
    const std::size_t n = blocks();
    SEMOE_CHECK(block < n, "semoe::storage::ssd_tier: ", path_.string(), ": ", what, "(block ", block,
                "): expected a block index < blocks = ", n);
  }

  /// An existing file (reopen), or a new one that replaces nothing: O_EXCL
  /// on the asked-for name, then on fresh names beside it while that exists
  /// (a checkpoint may still name the old file). Owner-only permissions.
  void open_file(bool direct, bool create) {
    const int base = O_RDWR | O_CLOEXEC | (create ? O_CREAT | O_EXCL : 0);
    const auto wanted = path_;
    std::mt19937_64 fresh(std::random_device{}() ^ static_cast<std::uint64_t>(::getpid()));
    for (int attempt = 0;; ++attempt) {
      direct_ = direct;
      fd_ = ::open(path_.c_str(), base | (direct ? O_DIRECT : 0), 0600);
      if (fd_ < 0 && direct && errno == EINVAL) {  // tmpfs and friends refuse O_DIRECT
        direct_ = false;
        fd_ = ::open(path_.c_str(), base, 0600);
      }
      if (fd_ >= 0 || !create || errno != EEXIST || attempt == 100) break;
      char tag[20];
      std::snprintf(tag, sizeof tag, ".%016llx", static_cast<unsigned long long>(fresh()));
      path_ = wanted.parent_path() / (wanted.stem().string() + tag + wanted.extension().string());
    }
    SEMOE_CHECK(fd_ >= 0, "semoe::storage::ssd_tier: open(", path_.string(), "): ", errno_text(errno));
  }

  void size_file() {
    const auto bytes = static_cast<off_t>(file_bytes());
    SEMOE_CHECK(::ftruncate(fd_, bytes) == 0, "semoe::storage::ssd_tier: ", path_.string(), ": ftruncate(", bytes,
                "): ", errno_text(errno));
    // Reserve the extents now so write-back cannot hit ENOSPC mid-training;
    // filesystems without fallocate keep the sparse file.
    if (bytes > 0 && ::fallocate(fd_, 0, 0, bytes) != 0)
      SEMOE_CHECK(errno == EOPNOTSUPP || errno == ENOSYS, "semoe::storage::ssd_tier: ", path_.string(), ": fallocate(",
                  bytes, "): ", errno_text(errno));
    SEMOE_CHECK(::fsync(fd_) == 0, "semoe::storage::ssd_tier: ", path_.string(), ": fsync: ", errno_text(errno));
    const auto dir = path_.parent_path();
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    SEMOE_CHECK(dfd >= 0, "semoe::storage::ssd_tier: open(", dir.string(), "): ", errno_text(errno));
    const int rc = ::fsync(dfd), e = errno;
    ::close(dfd);
    SEMOE_CHECK(rc == 0, "semoe::storage::ssd_tier: fsync(", dir.string(), "): ", errno_text(e));
  }

  void start(const ssd_options& o) {
    using kind = ssd_options::engine_kind;
    if (o.engine != kind::threads) {
      const int rc = io_uring_queue_init(ring_depth, &ring_, 0);
      SEMOE_CHECK(rc == 0 || o.engine == kind::automatic,
                  "semoe::storage::ssd_tier: options.engine = io_uring: ", "io_uring_queue_init: ", errno_text(-rc),
                  "; expected a kernel that allows io_uring (or use ", "engine_kind::automatic / threads)");
      uring_ = rc == 0;
    }
    if (uring_) reaper_ = std::thread([this] { reap(); });
    for (int i = 0; i < o.io_threads; ++i) workers_.emplace_back([this] { work(); });
  }

  std::string where(const ssd_op& op) const {
    return ::semoe::detail::concat("semoe::storage::ssd_tier: ", path_.string(), ": block ", op.block, " (slot ",
                                   op.slot, ", version ", op.version, "): ");
  }

  // Both engines do checksums here, on a worker: under io_uring the worker
  // hashes the payload, then submits, so the caller's thread only enqueues.
  void work() {
    for (;;) {
      std::unique_ptr<ssd_op> op;
      {
        std::unique_lock lk(qm_);
        qcv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        op = std::move(queue_.front());
        queue_.pop_front();
      }
      if (op->is_write) seal(*op);
      if (uring_) {
        submit_ring(std::move(op));
      } else {
        const long r = ssd_transfer(fd_, *op, 0);
        const char* call = op->is_write ? "pwritev" : "preadv";
        finish(std::move(op), r, call);
      }
    }
  }

  void seal(ssd_op& op) const {
    op.checksum = XXH3_64bits(op.data, block_bytes_);
    ssd_trailer t{};
    std::memcpy(t.magic, ssd_magic, sizeof t.magic);
    t.format = ssd_format;
    t.slot = op.slot;
    t.block = op.block;
    t.version = op.version;
    t.payload_bytes = block_bytes_;
    t.payload_checksum = op.checksum;
    t.trailer_checksum = XXH3_64bits(&t, offsetof(ssd_trailer, trailer_checksum));
    std::memcpy(op.trailer.get(), &t, sizeof t);
  }

  void submit_ring(std::unique_ptr<ssd_op> op) {
    std::unique_lock lk(ring_m_);
    // Bounding in-flight SQEs by the SQ size keeps the CQ (twice as large) from overflowing.
    ring_cv_.wait(lk, [&] { return ring_inflight_ < ring_depth; });
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) {  // cannot happen while ring_inflight_ < depth; finish synchronously rather than stall
      lk.unlock();
      const long r = ssd_transfer(fd_, *op, 0);
      const char* call = op->is_write ? "pwritev" : "preadv";
      finish(std::move(op), r, call);
      return;
    }
    if (op->is_write)
      io_uring_prep_writev(sqe, fd_, op->iov, 2, static_cast<std::uint64_t>(op->offset));
    else
      io_uring_prep_readv(sqe, fd_, op->iov, 2, static_cast<std::uint64_t>(op->offset));
    io_uring_sqe_set_data(sqe, op.get());
    int rc;
    do rc = io_uring_submit(&ring_);
    while (rc == -EINTR || rc == -EAGAIN || rc == -EBUSY);
    ++ring_inflight_;
    if (rc >= 0) {
      op.release();  // the reaper owns it now
      return;
    }
    // The kernel did not take the SQE: turn it into a NOP the next submit
    // flushes harmlessly, and fail this op.
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data(sqe, &nop_tag_);
    lk.unlock();
    finish(std::move(op), rc, "io_uring_submit");
  }

  // The reaper also verifies reads (trailer + XXH3), off the caller's thread.
  void reap() {
    for (;;) {
      io_uring_cqe* cqe = nullptr;
      const int rc = io_uring_wait_cqe(&ring_, &cqe);
      if (rc < 0) continue;  // EINTR/EAGAIN; the sentinel NOP always ends the loop
      void* data = io_uring_cqe_get_data(cqe);
      const int res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      {
        std::lock_guard lk(ring_m_);
        --ring_inflight_;
      }
      ring_cv_.notify_one();
      if (data == nullptr) return;
      if (data == &nop_tag_) continue;
      std::unique_ptr<ssd_op> op(static_cast<ssd_op*>(data));
      long r = res;
      const auto total = static_cast<long>(block_bytes_ + ssd_page);
      // Short transfers (EOF, a signal) and EAGAIN are rare: finish them synchronously.
      if ((r >= 0 && r < total) || r == -EAGAIN || r == -EINTR)
        r = ssd_transfer(fd_, *op, static_cast<std::size_t>(std::max(r, 0L)));
      const char* call = op->is_write ? "io_uring writev" : "io_uring readv";
      finish(std::move(op), r, call);
    }
  }

  void verify(const ssd_op& op) const {
    ssd_trailer t;
    std::memcpy(&t, op.trailer.get(), sizeof t);
    const auto fail = [&](auto&&... why) { ::semoe::detail::fail(where(op), why...); };
    if (t.trailer_checksum != XXH3_64bits(&t, offsetof(ssd_trailer, trailer_checksum)))
      fail(
          "trailer checksum mismatch (file corrupted, or the slot was never "
          "written)");
    if (std::memcmp(t.magic, ssd_magic, sizeof t.magic) != 0) fail("trailer magic is not SEMOESSD (not a semoe file)");
    if (t.format != ssd_format) fail("trailer format ", t.format, ", expected ", ssd_format);
    if (t.block != op.block) fail("trailer names block ", t.block, " (misplaced data)");
    if (t.slot != op.slot) fail("trailer names slot ", t.slot, " (misplaced data)");
    if (t.payload_bytes != block_bytes_)
      fail("trailer says ", t.payload_bytes, " payload bytes, expected block_bytes = ", block_bytes_);
    if (t.version != op.version) fail("slot holds version ", t.version, ", expected ", op.version, " (stale slot)");
    if (!op.check_payload) {  // the trailer must still vouch for the data this reader verified before
      if (t.payload_checksum != op.checksum)
        fail("payload checksum ", t.payload_checksum, " in the trailer differs from the expected ", op.checksum,
             " (the record does not describe this data)");
      return;
    }
    const std::uint64_t actual = XXH3_64bits(op.data, block_bytes_);
    if (actual != t.payload_checksum) fail("payload checksum mismatch (file corrupted)");
    if (actual != op.checksum)
      fail("payload checksum ", t.payload_checksum, " differs from the expected ", op.checksum,
           " (the record does not describe this data)");
  }

  void finish(std::unique_ptr<ssd_op> op, long r, const char* call) {
    std::exception_ptr err;
    try {
      const auto total = static_cast<long>(block_bytes_ + ssd_page);
      if (r < 0) ::semoe::detail::fail(where(*op), call, ": ", errno_text(static_cast<int>(-r)));
      if (r < total)
        ::semoe::detail::fail(where(*op), "short ", op->is_write ? "write" : "read", ": ", r, " of ", total,
                              " bytes (file truncated?)");
      if (!op->is_write) verify(*op);
    } catch (...) {
      err = std::current_exception();
    }
    {
      std::lock_guard lk(m_);
      auto& s = state_[op->block];
      if (op->is_write) {
        // A failed write leaves its slot unknown; the committed slot is untouched.
        s.current = err ? s.committed : ssd_block_record{op->version, op->checksum, op->slot};
        --writes_inflight_;
      }
      s.busy = false;
      --inflight_;
    }
    cv_.notify_all();
    if (!err) (op->is_write ? bytes_written_ : bytes_read_).fetch_add(block_bytes_, std::memory_order_relaxed);
    op->state->complete(std::move(err));
  }

  static constexpr unsigned ring_depth = 64;

  std::filesystem::path path_;
  std::size_t block_bytes_, slot_bytes_;
  int fd_ = -1;
  bool direct_ = false;

  mutable std::mutex m_;  // guards state_, inflight_, writes_inflight_, committing_
  std::condition_variable cv_;
  std::vector<block_state> state_;
  std::atomic<std::size_t> blocks_;  // state_.size(), readable without m_: blocks only grow
  std::size_t inflight_ = 0, writes_inflight_ = 0;
  bool committing_ = false, sync_failed_ = false;

  std::mutex qm_;  // guards queue_, stop_
  std::condition_variable qcv_;
  std::deque<std::unique_ptr<ssd_op>> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;

  bool uring_ = false;
  io_uring ring_{};
  std::mutex ring_m_;  // guards the SQ side and ring_inflight_
  std::condition_variable ring_cv_;
  unsigned ring_inflight_ = 0;
  char nop_tag_ = 0;
  std::thread reaper_;

  std::atomic<std::uint64_t> bytes_read_{0}, bytes_written_{0};
};

}  // namespace detail

}  // namespace semoe::storage
