// Benchmark: reading a safetensors header of many tensors. semoe checks the
// header (duplicate keys, nesting, counts) and validates every entry against
// the data; the floor is nlohmann's bare DOM parse of the same JSON text,
// measured in the same run. A parser linear in the header keeps the time per
// tensor flat as the tensor count grows.
// Usage: bench_safetensors_header [--max N]   (largest header, default 200000 tensors)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "semoe/io/safetensors.hpp"

namespace {

std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

/// A header of n one-byte U8 tensors, as a real checkpoint's entries look.
std::string header_of(std::size_t n) {
  std::string h = "{";
  for (std::size_t i = 0; i < n; ++i) {
    if (i) h += ',';
    h += "\"model.layers." + std::to_string(i / 16) + ".mlp.experts." + std::to_string(i % 16) +
         ".weight\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[" + std::to_string(i) + "," +
         std::to_string(i + 1) + "]}";
  }
  return h + "}";
}

template <class F>
double median_seconds(int reps, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t max_n = 200000;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("usage: bench_safetensors_header [--max N]\n"
                  "  times semoe's safetensors header parse against nlohmann's bare DOM parse of the same\n"
                  "  JSON, for headers of 5000 up to N tensors (default 200000)\n");
      return 0;
    }
    if (a == "--max" && i + 1 < argc) {
      max_n = static_cast<std::size_t>(std::strtoull(argv[++i], nullptr, 10));
    } else {
      std::fprintf(stderr, "bench_safetensors_header: unknown argument '%s' (see --help)\n", a.c_str());
      return 2;
    }
  }
  nlohmann::json rows = nlohmann::json::array();
  for (std::size_t n = 5000; n <= max_n; n *= 4) {
    const std::string text = header_of(n);
    const std::string bytes = le64(text.size()) + text + std::string(n, '\x01');
    const auto span = std::span<const std::byte>(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size());
    std::size_t parsed = 0;
    const double t_semoe =
        median_seconds(3, [&] { parsed = semoe::io::safetensors_file::parse(span).tensors().size(); });
    const double t_dom = median_seconds(3, [&] { parsed += nlohmann::json::parse(text).size() - n; });
    if (parsed != n) {
      std::fprintf(stderr, "bench_safetensors_header: parsed %zu tensors of %zu\n", parsed, n);
      return 1;
    }
    std::printf("%7zu tensors (%5.1f MB header): semoe %8.3f ms (%.3f us/tensor), bare DOM %8.3f ms, ratio %.2f\n", n,
                static_cast<double>(text.size()) / 1e6, 1e3 * t_semoe, 1e6 * t_semoe / static_cast<double>(n),
                1e3 * t_dom, t_semoe / t_dom);
    rows.push_back({{"tensors", n},
                    {"header_bytes", text.size()},
                    {"seconds", t_semoe},
                    {"us_per_tensor", 1e6 * t_semoe / static_cast<double>(n)},
                    {"dom_seconds", t_dom},
                    {"ratio_vs_dom", t_semoe / t_dom}});
  }
  std::printf("%s\n", nlohmann::json{{"benchmark", "safetensors_header"}, {"results", rows}}.dump().c_str());
  return 0;
}
