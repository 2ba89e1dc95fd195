#include "semoe/io/idx.hpp"

#include <doctest/doctest.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using semoe::io::read_idx;

namespace {

/// A scratch directory removed at the end of the test.
struct scratch_dir {
  fs::path path;
  scratch_dir() {
    path = fs::temp_directory_path() / ("semoe_idx_test_" + std::to_string(::getpid()));
    fs::create_directories(path);
  }
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::vector<unsigned char> idx_bytes(std::vector<std::uint32_t> dims, const std::vector<unsigned char>& data,
                                     unsigned char type = 0x08) {
  std::vector<unsigned char> b{0, 0, type, static_cast<unsigned char>(dims.size())};
  for (auto d : dims)
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<unsigned char>(d >> s));
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

void write_plain(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  REQUIRE(f);
  REQUIRE(std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size());
  std::fclose(f);
}

void write_gzip(const std::string& path, const std::vector<unsigned char>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f);
  REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

std::vector<unsigned char> read_all(const std::string& path) {
  std::vector<unsigned char> b(fs::file_size(path));
  std::FILE* f = std::fopen(path.c_str(), "rb");
  REQUIRE(f);
  REQUIRE(std::fread(b.data(), 1, b.size(), f) == b.size());
  std::fclose(f);
  return b;
}

}  // namespace

TEST_CASE("read_idx: round trip, plain and gzip") {
  scratch_dir dir;
  std::vector<unsigned char> data(2 * 3 * 5);
  for (std::size_t k = 0; k < data.size(); ++k) data[k] = static_cast<unsigned char>(k * 9);
  const auto bytes = idx_bytes({2, 3, 5}, data);
  write_plain(dir.file("a.idx"), bytes);
  write_gzip(dir.file("a.idx.gz"), bytes);
  for (const char* name : {"a.idx", "a.idx.gz"}) {
    CAPTURE(name);
    const auto f = read_idx(dir.file(name));
    CHECK(f.dims == std::vector<std::size_t>{2, 3, 5});
    CHECK(f.data == std::vector<std::uint8_t>(data.begin(), data.end()));
  }
  // A larger gzip file, read across several chunks of zlib output.
  std::vector<unsigned char> big(3'000'000);
  for (std::size_t k = 0; k < big.size(); ++k) big[k] = static_cast<unsigned char>((k * 2654435761u) >> 13);
  write_gzip(dir.file("big.gz"), idx_bytes({3000, 1000}, big));
  const auto f = read_idx(dir.file("big.gz"));
  CHECK(f.data == std::vector<std::uint8_t>(big.begin(), big.end()));
}

TEST_CASE("read_idx: hostile and broken files are errors naming the path") {
  scratch_dir dir;
  const std::vector<unsigned char> data(24, 7);

  SUBCASE("missing file") {
    const auto p = dir.file("nope.idx");
    CHECK_THROWS_WITH_AS(read_idx(p), doctest::Contains(p.c_str()), semoe::error);
  }
  SUBCASE("truncated data, plain and gzip") {
    auto bytes = idx_bytes({4, 6}, data);
    bytes.resize(bytes.size() - 5);
    write_plain(dir.file("t.idx"), bytes);
    write_gzip(dir.file("t.idx.gz"), bytes);
    for (const char* name : {"t.idx", "t.idx.gz"}) {
      const auto p = dir.file(name);
      CHECK_THROWS_WITH_AS(read_idx(p), doctest::Contains((p + "': truncated: expected 24 bytes of data after the "
                                                               "header, got 19").c_str()),
                           semoe::error);
    }
  }
  SUBCASE("a cut gzip stream") {
    write_gzip(dir.file("c.gz"), idx_bytes({4, 6}, data));
    auto gz = read_all(dir.file("c.gz"));
    gz.resize(gz.size() - 6);  // into the CRC/length trailer: all data present, stream incomplete
    write_plain(dir.file("c.gz"), gz);
    CHECK_THROWS_WITH_AS(read_idx(dir.file("c.gz")), doctest::Contains("truncated"), semoe::error);
  }
  SUBCASE("truncated header") {
    write_plain(dir.file("h.idx"), {0, 0, 8});
    CHECK_THROWS_WITH_AS(read_idx(dir.file("h.idx")), doctest::Contains("holds 3 bytes"), semoe::error);
    auto bytes = idx_bytes({4, 6}, {});
    bytes.resize(9);
    write_plain(dir.file("h2.idx"), bytes);
    CHECK_THROWS_WITH_AS(read_idx(dir.file("h2.idx")), doctest::Contains("expected 8 bytes of dims, got 5"),
                         semoe::error);
  }
  SUBCASE("trailing bytes") {
    auto bytes = idx_bytes({4, 6}, data);
    bytes.push_back(1);
    write_plain(dir.file("x.idx"), bytes);
    CHECK_THROWS_WITH_AS(read_idx(dir.file("x.idx")), doctest::Contains("trailing bytes"), semoe::error);
  }
  SUBCASE("bad magic, type and ndims") {
    auto bytes = idx_bytes({4, 6}, data);
    bytes[1] = 3;
    write_plain(dir.file("m.idx"), bytes);
    CHECK_THROWS_WITH_AS(read_idx(dir.file("m.idx")), doctest::Contains("bad magic"), semoe::error);
    write_plain(dir.file("ty.idx"), idx_bytes({4, 6}, data, 0x0D));
    CHECK_THROWS_WITH_AS(read_idx(dir.file("ty.idx")), doctest::Contains("element type 0xd is not supported"),
                         semoe::error);
    write_plain(dir.file("n0.idx"), {0, 0, 8, 0});
    CHECK_THROWS_WITH_AS(read_idx(dir.file("n0.idx")), doctest::Contains("ndims = 0"), semoe::error);
    write_plain(dir.file("n5.idx"), idx_bytes({1, 1, 1, 1, 1}, {1}));
    CHECK_THROWS_WITH_AS(read_idx(dir.file("n5.idx")), doctest::Contains("ndims = 5"), semoe::error);
  }
  SUBCASE("huge dims: rejected from the header, nothing allocated") {
    // 4 x 2^32-1 dims would overflow 64 bits; the check stops at the bound.
    write_plain(dir.file("huge.idx"), idx_bytes({0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}, {}));
    CHECK_THROWS_WITH_AS(read_idx(dir.file("huge.idx")), doctest::Contains("larger than max_bytes"), semoe::error);
    // Within a caller's smaller bound.
    write_plain(dir.file("mid.idx"), idx_bytes({1000, 1000}, {}));
    CHECK_THROWS_WITH_AS(read_idx(dir.file("mid.idx"), 999'999), doctest::Contains("dims[1] = 1000"), semoe::error);
    // Within the bound but not in the file: truncated.
    CHECK_THROWS_WITH_AS(read_idx(dir.file("mid.idx")), doctest::Contains("expected 1000000 bytes of data"),
                         semoe::error);
  }
  SUBCASE("load_mnist_split: counts and labels are checked") {
    std::vector<unsigned char> img(3 * 2 * 2, 255), lab{1, 2, 3};
    write_plain(dir.file("train-images-idx3-ubyte"), idx_bytes({3, 2, 2}, img));
    write_gzip(dir.file("train-labels-idx1-ubyte.gz"), idx_bytes({3}, lab));
    const auto s = semoe::io::load_mnist_split(dir.path.string(), "train");
    CHECK(s.size() == 3);
    CHECK(s.images.cols() == 4);
    CHECK(s.images(2, 3) == 1.0f);
    CHECK(s.labels == std::vector<std::int32_t>{1, 2, 3});

    write_plain(dir.file("train-labels-idx1-ubyte"), idx_bytes({2}, {1, 2}));
    CHECK_THROWS_WITH_AS(semoe::io::load_mnist_split(dir.path.string(), "train"),
                         doctest::Contains("holds 3 images but"), semoe::error);
    write_plain(dir.file("train-labels-idx1-ubyte"), idx_bytes({3}, {1, 12, 3}));
    CHECK_THROWS_WITH_AS(semoe::io::load_mnist_split(dir.path.string(), "train"),
                         doctest::Contains("label[1] = 12"), semoe::error);
    CHECK_THROWS_WITH_AS(semoe::io::load_mnist_split(dir.path.string(), "valid"), doctest::Contains("split = 'valid'"),
                         semoe::error);
  }
}

TEST_CASE("load_mnist_split: the real Fashion-MNIST test split") {
  const std::string dir = "/usr/share/datasets/fashion-mnist";
  if (!fs::exists(dir + "/t10k-images-idx3-ubyte.gz")) {
    MESSAGE("skipped: ", dir, " is not present");
    return;
  }
  const auto s = semoe::io::load_mnist_split(dir, "t10k");
  CHECK(s.size() == 10000);
  CHECK(s.images.cols() == 784);
  CHECK(s.labels.size() == 10000);
  std::vector<int> per_class(10);
  for (auto y : s.labels) ++per_class[y];
  for (int c : per_class) CHECK(c == 1000);  // Fashion-MNIST's test split is balanced
  float lo = 1, hi = 0;
  for (float v : s.images.span()) lo = std::min(lo, v), hi = std::max(hi, v);
  CHECK(lo == 0.0f);
  CHECK(hi == 1.0f);
}
