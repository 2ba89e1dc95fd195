// semoe/io/idx.hpp: the IDX format of MNIST and Fashion-MNIST, plain or
// gzip-compressed, read with every header field bounded before use.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/core/error.hpp"

namespace semoe::io {

/// An IDX array of unsigned bytes: dims (outermost first) and the data, row-major.
struct idx_file {
  std::vector<std::size_t> dims;
  std::vector<std::uint8_t> data;
};

namespace detail {

/// Reads a file as bytes, through zlib when it starts with the gzip magic.
class byte_source {
 public:
  explicit byte_source(const std::string& path) : path_(path) {
    file_ = std::fopen(path.c_str(), "rb");
    SEMOE_CHECK(file_, "semoe::io::read_idx: cannot open '", path, "': ", std::system_category().message(errno));
    unsigned char magic[2] = {0, 0};
    const std::size_t got = std::fread(magic, 1, 2, file_);
    if (got == 2 && magic[0] == 0x1f && magic[1] == 0x8b) {
      std::fclose(file_);
      file_ = nullptr;
      gz_ = gzopen(path.c_str(), "rb");
      SEMOE_CHECK(gz_, "semoe::io::read_idx: cannot open '", path, "' with zlib");
    } else {
      std::rewind(file_);
    }
  }
  byte_source(const byte_source&) = delete;
  byte_source& operator=(const byte_source&) = delete;
  ~byte_source() {
    if (file_) std::fclose(file_);
    if (gz_) gzclose(gz_);
  }

  /// Up to n bytes; fewer only at the end of the data. Throws on I/O errors
  /// and on a corrupt or truncated gzip stream.
  std::size_t read(void* dst, std::size_t n) {
    auto* out = static_cast<unsigned char*>(dst);
    std::size_t total = 0;
    while (total < n) {
      const std::size_t want = std::min<std::size_t>(n - total, std::size_t{1} << 30);  // gzread takes an int
      std::size_t got;
      if (gz_) {
        const int r = gzread(gz_, out + total, static_cast<unsigned>(want));
        int code = Z_OK;
        const char* msg = gzerror(gz_, &code);
        // zlib reports a stream cut short as Z_BUF_ERROR after returning what
        // it could: the caller's length check says how much is missing.
        truncated_ = truncated_ || code == Z_BUF_ERROR;
        SEMOE_CHECK(r >= 0 && (code == Z_OK || code == Z_BUF_ERROR), "semoe::io::read_idx: '", path_,
                    "': corrupt gzip stream: ", msg ? msg : "unknown zlib error");
        got = static_cast<std::size_t>(r);
      } else {
        got = std::fread(out + total, 1, want, file_);
        SEMOE_CHECK(!std::ferror(file_), "semoe::io::read_idx: '", path_,
                    "': read failed: ", std::system_category().message(errno));
      }
      total += got;
      if (got < want) break;
    }
    return total;
  }

  /// The gzip stream ended before its trailer.
  bool truncated() const { return truncated_; }

 private:
  std::string path_;
  bool truncated_ = false;
  std::FILE* file_ = nullptr;
  gzFile gz_ = nullptr;
};

}  // namespace detail

/// Reads an IDX file of unsigned bytes. The header is 00 00 <type> <ndims>
/// then ndims big-endian uint32 dims; the data must be exactly their product,
/// which may not exceed max_bytes. Memory grows with the bytes actually read,
/// so a hostile header cannot make us allocate what the file does not hold.
inline idx_file read_idx(const std::string& path, std::size_t max_bytes = std::size_t{1} << 30) {
  detail::byte_source in(path);
  const auto where = "semoe::io::read_idx: '" + path + "': ";
  unsigned char head[4];
  const std::size_t got_head = in.read(head, 4);
  SEMOE_CHECK(got_head == 4, where, "file holds ", got_head, " bytes; an IDX header needs at least 4");
  SEMOE_CHECK(head[0] == 0 && head[1] == 0, where, "bad magic: first two bytes are ", int(head[0]), ", ",
              int(head[1]), "; expected 0, 0");
  SEMOE_CHECK(head[2] == 0x08, where, "element type 0x", std::hex, int(head[2]), std::dec,
              " is not supported; expected 0x8 (unsigned byte)");
  const int ndims = head[3];
  SEMOE_CHECK(ndims >= 1 && ndims <= 4, where, "ndims = ", ndims, "; expected 1 to 4");

  idx_file f;
  unsigned char raw[16];
  const std::size_t got_dims = in.read(raw, 4 * std::size_t(ndims));
  SEMOE_CHECK(got_dims == 4 * std::size_t(ndims), where, "truncated header: expected ", 4 * ndims,
              " bytes of dims, got ", got_dims);
  std::size_t total = 1;
  for (int d = 0; d < ndims; ++d) {
    const std::size_t dim = (std::size_t{raw[4 * d]} << 24) | (std::size_t{raw[4 * d + 1]} << 16) |
                            (std::size_t{raw[4 * d + 2]} << 8) | std::size_t{raw[4 * d + 3]};
    // Checked product: each step stays <= max_bytes, so nothing overflows.
    SEMOE_CHECK(dim == 0 || total <= max_bytes / dim, where, "dims[", d, "] = ", dim, " makes the data larger than ",
                "max_bytes = ", max_bytes);
    total *= dim;
    f.dims.push_back(dim);
  }

  std::size_t have = 0;
  constexpr std::size_t chunk = std::size_t{1} << 22;
  while (have < total) {
    const std::size_t want = std::min(chunk, total - have);
    f.data.resize(have + want);
    const std::size_t got = in.read(f.data.data() + have, want);
    have += got;
    if (got < want) break;
  }
  f.data.resize(have);
  SEMOE_CHECK(have == total, where, "truncated: expected ", total, " bytes of data after the header, got ", have);
  unsigned char extra;
  SEMOE_CHECK(in.read(&extra, 1) == 0, where, "trailing bytes after the ", total, " bytes of data");
  SEMOE_CHECK(!in.truncated(), where, "truncated: the gzip stream ends before its trailer");
  return f;
}

/// One split of an MNIST-format data set: images [n, rows * cols] in [0, 1]
/// and labels in [0, 10).
struct mnist_split {
  matrix<float> images;
  std::vector<std::int32_t> labels;
  index_t size() const { return images.rows(); }
};

/// Loads <dir>/<split>-images-idx3-ubyte and <dir>/<split>-labels-idx1-ubyte,
/// each with or without a .gz suffix (the plain file wins when both exist).
inline mnist_split load_mnist_split(const std::string& dir, const std::string& split) {
  SEMOE_CHECK(split == "train" || split == "t10k", "semoe::io::load_mnist_split: split = '", split,
              "'; expected 'train' or 't10k'");
  const auto find = [&](const std::string& stem) {
    const std::string plain = dir + "/" + split + stem;
    std::error_code ec;
    return std::filesystem::exists(plain, ec) ? plain : plain + ".gz";
  };
  const std::string image_path = find("-images-idx3-ubyte"), label_path = find("-labels-idx1-ubyte");
  const idx_file img = read_idx(image_path);
  const idx_file lab = read_idx(label_path);
  SEMOE_CHECK(img.dims.size() == 3, "semoe::io::load_mnist_split: '", image_path, "' has ", img.dims.size(),
              " dims; expected 3 (count, rows, cols)");
  SEMOE_CHECK(lab.dims.size() == 1, "semoe::io::load_mnist_split: '", label_path, "' has ", lab.dims.size(),
              " dims; expected 1 (count)");
  SEMOE_CHECK(img.dims[0] == lab.dims[0], "semoe::io::load_mnist_split: '", image_path, "' holds ", img.dims[0],
              " images but '", label_path, "' holds ", lab.dims[0], " labels");
  const auto n = static_cast<index_t>(img.dims[0]);
  const auto pixels = static_cast<index_t>(img.dims[1] * img.dims[2]);
  mnist_split s;
  s.labels.resize(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) {
    const int y = lab.data[static_cast<std::size_t>(i)];
    SEMOE_CHECK(y < 10, "semoe::io::load_mnist_split: '", label_path, "': label[", i, "] = ", y,
                "; expected 0 to 9");
    s.labels[static_cast<std::size_t>(i)] = y;
  }
  s.images.resize(n, pixels);
  float* out = s.images.data();
  for (std::size_t k = 0; k < img.data.size(); ++k) out[k] = static_cast<float>(img.data[k]) * (1.0f / 255.0f);
  return s;
}

}  // namespace semoe::io
