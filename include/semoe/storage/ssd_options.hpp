// semoe/storage/ssd_options.hpp: what the SSD tier is told (where its file
// lives, how it does I/O) and what a checkpoint keeps of each block.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

namespace semoe::storage {

struct ssd_options {
  std::filesystem::path dir;  ///< created if missing; the file is dir / ("semoe-rank<rank>.blocks")
  int rank = 0;
  /// The file's name in dir; empty: semoe-rank<rank>.blocks. A new tier
  /// never replaces a file that exists (a checkpoint may name it): it takes
  /// a fresh name beside it, which path() reports and checkpoints record.
  std::string file{};
  int io_threads = 2;  ///< workers of the pread/pwrite engine (checksum + submit workers under io_uring)
  bool direct = true;  ///< O_DIRECT; falls back to buffered I/O where open() says EINVAL (see direct_io())
  enum class engine_kind { automatic, io_uring, threads } engine = engine_kind::automatic;
};

/// A block's committed copy: which of its two slots, its version, its
/// checksum. A checkpoint stores these; version 0 means "never written".
struct ssd_block_record {
  std::uint64_t version = 0;
  std::uint64_t checksum = 0;
  std::uint32_t slot = 0;
};

}  // namespace semoe::storage
