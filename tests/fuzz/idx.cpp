// Fuzz target: read_idx over arbitrary bytes, plain or gzip. A hostile file
// must end in semoe::error; an accepted one holds exactly the product of its
// dims in bytes. The bytes reach the reader as a file through a memfd.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "semoe/io/idx.hpp"

namespace {
/// The input as a file: a memfd rewritten for each run.
std::string as_file(const std::uint8_t* data, std::size_t size) {
  static const int fd = ::memfd_create("semoe-fuzz-idx", 0);
  if (fd < 0 || ::ftruncate(fd, 0) != 0) std::abort();
  for (std::size_t at = 0; at < size;) {
    const ssize_t w = ::pwrite(fd, data + at, size - at, static_cast<off_t>(at));
    if (w <= 0) std::abort();
    at += static_cast<std::size_t>(w);
  }
  return "/proc/self/fd/" + std::to_string(fd);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string path = as_file(data, size);
  try {
    const auto f = semoe::io::read_idx(path, std::size_t{1} << 20);
    std::size_t n = 1;
    for (const auto d : f.dims) n *= d;
    if (f.dims.empty() || f.data.size() != n) {
      std::fprintf(stderr, "read_idx accepted %zu dims holding %zu bytes\n", f.dims.size(), f.data.size());
      std::abort();
    }
  } catch (const semoe::error&) {
  }
  return 0;
}

/// For the stand-in driver: read_idx accepts the file.
bool fuzz_accepts(const std::string& in) {
  try {
    (void)semoe::io::read_idx(as_file(reinterpret_cast<const std::uint8_t*>(in.data()), in.size()), std::size_t{1} << 20);
    return true;
  } catch (const semoe::error&) {
    return false;
  }
}

/// Seeds for the stand-in driver (driver.cpp): a valid 2 x 3 file, a 1-D
/// one, and a header whose dims promise more than the file holds.
std::vector<std::string> fuzz_seeds() {
  const std::string head2 = std::string("\0\0\x08\x02", 4) + std::string("\0\0\0\x02\0\0\0\x03", 8);
  return {head2 + "abcdef", std::string("\0\0\x08\x01\0\0\0\x04", 8) + "wxyz", head2 + "ab",
          std::string("\x1f\x8b\x08\0\0\0\0\0", 8)};
}
