// tests/support/files.hpp: what tests need of the file system: a temporary
// directory removed at the end of the test, and everything written to a
// stdio stream read back.
#pragma once

#include <cstdio>
#include <filesystem>
#include <string>

#include <unistd.h>

namespace semoe::testing {

/// $TMPDIR/semoe-<tag>-<pid>, empty when made, removed with everything in it.
struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(const std::string& tag)
      : path(std::filesystem::temp_directory_path() / ("semoe-" + tag + "-" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
};

/// Everything written to `f` so far (a std::tmpfile() handed to a launcher).
inline std::string slurp(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string s;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
  return s;
}

}  // namespace semoe::testing
