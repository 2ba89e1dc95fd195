// semoe/core/units.hpp: byte sizes as people write them on a command line.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <string_view>

#include "semoe/core/error.hpp"

namespace semoe {

/// "4096", "64K", "1.5M", "2G" (also "KiB", "MiB", "GiB"; powers of 1024) in
/// bytes. Anything else, a negative size or one past size_t is a semoe::error.
inline std::size_t parse_bytes(std::string_view text) {
  const std::string s(text);
  std::size_t used = 0;
  double x = 0;
  try {
    x = std::stod(s, &used);
  } catch (const std::exception&) {
    ::semoe::detail::fail("semoe::parse_bytes: '", s, "' is not a size (expected e.g. 4096, 64K, 1.5M, 2G)");
  }
  const std::string_view unit = text.substr(used);
  double scale = 1;
  if (unit == "K" || unit == "KiB") scale = 1024.0;
  else if (unit == "M" || unit == "MiB") scale = 1024.0 * 1024;
  else if (unit == "G" || unit == "GiB") scale = 1024.0 * 1024 * 1024;
  else if (unit == "T" || unit == "TiB") scale = 1024.0 * 1024 * 1024 * 1024;
  else SEMOE_CHECK(unit.empty(), "semoe::parse_bytes: '", s, "': unknown unit '", unit, "' (expected K, M, G or T)");
  const double bytes = x * scale;
  SEMOE_CHECK(std::isfinite(bytes) && bytes >= 0 && bytes < 1.8e19, "semoe::parse_bytes: '", s,
              "' is not a size between 0 and 2^64 bytes");
  return static_cast<std::size_t>(bytes);
}

}  // namespace semoe
