// A stand-in for libFuzzer's main where only g++ is available: runs the target
// over its seeds, then over random mutations of them (fixed-seed PRNG) for a
// bounded time. No coverage feedback; mutants the target accepts join the pool,
// so valid-looking files keep being explored. The input that crashes is saved
// to crash-<pid>.bin first (signal handler / sanitizer death callback).
//
//   fuzz_<target> [--seconds S] [--seed N] [--iterations N] [files to replay...]
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "semoe/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);
extern "C" void __sanitizer_set_death_callback(void (*)()) __attribute__((weak));
std::vector<std::string> fuzz_seeds();
bool fuzz_accepts(const std::string& input);  // the target takes it as valid (mutants it accepts join the pool)

namespace {

const std::string* current = nullptr;  // the input being run, for the crash handlers
char crash_path[64];

void save_current() {
  if (!current) return;
  const int fd = ::open(crash_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return;
  const char* p = current->data();
  std::size_t n = current->size();
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w <= 0) break;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  ::close(fd);
  static const char msg[] = "fuzz driver: crashing input saved to ";
  (void)!::write(2, msg, sizeof msg - 1);
  (void)!::write(2, crash_path, std::strlen(crash_path));
  (void)!::write(2, "\n", 1);
}

void on_signal(int sig) {
  save_current();
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

void run(const std::string& in) {
  current = &in;
  LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(in.data()), in.size());
  current = nullptr;
}

/// True when the library accepts the input (the target swallows its errors).
bool accepted(const std::string& in) { return fuzz_accepts(in); }

// Pieces of JSON headers and numbers at the edges of what is checked (tokens
// for the safetensors target; harmless bytes for the others).
const std::vector<std::string_view> dictionary = {
    "{", "}", "[", "]", ",", ":", "\"", "\"dtype\"", "\"shape\"", "\"data_offsets\"", "\"__metadata__\"",
    "\"F32\"", "\"BF16\"", "\"BOOL\"", "\"U64\"", "\"F8_E4M3\"", "null", "true", "[]", "{}", "0", "1", "-1", "-0",
    "8", "1.5", "1e3", "1e400", "4294967296", "9223372036854775807", "9223372036854775808",
    "18446744073709551615", "18446744073709551616", "\"\\u0000\"", "\"\\ud800\"", "\"\xc3\xa9\"", "\xff", " "};

class mutator {
 public:
  explicit mutator(std::uint64_t seed) : rng_(seed) {}

  std::size_t below(std::size_t n) { return n == 0 ? 0 : std::uniform_int_distribution<std::size_t>(0, n - 1)(rng_); }
  bool coin(int percent) { return below(100) < static_cast<std::size_t>(percent); }

  std::string mutate(const std::string& in, const std::vector<std::string>& pool) {
    // Most mutations edit the header and then restore a consistent length
    // field, so they reach the JSON checks instead of the length check.
    std::uint64_t n = 0;
    for (int i = 7; in.size() >= 8 && i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(in[i]);
    if (in.size() >= 8 && n <= in.size() - 8 && coin(75)) {
      std::string header = in.substr(8, n), data = in.substr(8 + n);
      const int rounds = 1 + static_cast<int>(below(4));
      for (int r = 0; r < rounds; ++r) edit(coin(85) ? header : data, pool);
      if (coin(10)) data.resize(below(data.size() + 16), '\x01');
      std::string out(8, '\0');
      const std::int64_t skew = coin(90) ? 0 : static_cast<std::int64_t>(below(5)) - 2;
      const auto len = static_cast<std::uint64_t>(static_cast<std::int64_t>(header.size()) + skew);
      for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(len >> (8 * i));
      return out + header + data;
    }
    std::string out = in;
    const int rounds = 1 + static_cast<int>(below(3));
    for (int r = 0; r < rounds; ++r) edit(out, pool);
    if (coin(15) && out.size() >= 8) {  // rewrite the length field
      static const std::uint64_t edge[] = {0, 1, 7, 8, 100 << 20, (100 << 20) + 1, ~std::uint64_t{0}, std::uint64_t{1} << 63};
      const std::uint64_t len = coin(50) ? edge[below(std::size(edge))] : out.size() - 8 - below(std::min<std::size_t>(out.size() - 8, 4) + 1);
      for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(len >> (8 * i));
    }
    return out;
  }

 private:
  void edit(std::string& s, const std::vector<std::string>& pool) {
    switch (below(10)) {
      case 0:  // flip a bit
        if (!s.empty()) s[below(s.size())] ^= static_cast<char>(1 << below(8));
        break;
      case 1:  // set a byte
        if (!s.empty()) s[below(s.size())] = static_cast<char>(below(256));
        break;
      case 2: {  // insert random bytes
        std::string b(1 + below(8), '\0');
        for (auto& c : b) c = static_cast<char>(below(256));
        s.insert(below(s.size() + 1), b);
        break;
      }
      case 3:  // erase a range
        if (!s.empty()) {
          const std::size_t at = below(s.size());
          s.erase(at, 1 + below(std::min<std::size_t>(s.size() - at, 16)));
        }
        break;
      case 4:  // truncate
        s.resize(below(s.size() + 1));
        break;
      case 5: {  // duplicate a range elsewhere
        if (s.empty()) break;
        const std::size_t at = below(s.size()), len = 1 + below(std::min<std::size_t>(s.size() - at, 32));
        const std::string piece = s.substr(at, len);
        s.insert(below(s.size() + 1), piece);
        break;
      }
      case 6:  // insert a dictionary token
      case 7: {
        s.insert(below(s.size() + 1), dictionary[below(dictionary.size())]);
        break;
      }
      case 8: {  // replace a run of digits with an edge number
        std::vector<std::size_t> starts;
        for (std::size_t i = 0; i < s.size(); ++i)
          if (std::isdigit(static_cast<unsigned char>(s[i])) && (i == 0 || !std::isdigit(static_cast<unsigned char>(s[i - 1]))))
            starts.push_back(i);
        if (starts.empty()) break;
        const std::size_t at = starts[below(starts.size())];
        std::size_t end = at;
        while (end < s.size() && std::isdigit(static_cast<unsigned char>(s[end]))) ++end;
        static const char* nums[] = {"0", "1", "7", "8", "16", "24", "4294967296", "9223372036854775807",
                                     "9223372036854775808", "18446744073709551615", "18446744073709551616", "1e3"};
        s.replace(at, end - at, nums[below(std::size(nums))]);
        break;
      }
      default: {  // splice in a slice of another pool input
        const std::string& o = pool[below(pool.size())];
        if (o.empty()) break;
        const std::size_t at = below(o.size()), len = 1 + below(std::min<std::size_t>(o.size() - at, 64));
        s.insert(below(s.size() + 1), o.substr(at, len));
        break;
      }
    }
  }

  std::mt19937_64 rng_;
};

}  // namespace

int main(int argc, char** argv) {
  double seconds = 20;
  std::uint64_t seed = 20240611, max_iterations = ~std::uint64_t{0};
  std::vector<std::string> replay;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::atof(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--iterations" && i + 1 < argc) max_iterations = std::strtoull(argv[++i], nullptr, 10);
    else if (a.starts_with("--")) {
      std::fprintf(stderr, "usage: %s [--seconds S] [--seed N] [--iterations N] [files to replay...]\n", argv[0]);
      return 2;
    } else replay.emplace_back(a);
  }
  if (!replay.empty()) {  // reproduce saved inputs, as libFuzzer does with file arguments
    for (const auto& path : replay) {
      std::ifstream f(path, std::ios::binary);
      const std::string in((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      run(in);
      std::printf("%s: %zu bytes, %s\n", path.c_str(), in.size(), accepted(in) ? "accepted" : "refused");
    }
    return 0;
  }

  std::snprintf(crash_path, sizeof crash_path, "crash-%d.bin", static_cast<int>(::getpid()));
  for (int sig : {SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL}) ::signal(sig, on_signal);
  if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(save_current);
  std::vector<std::string> pool = fuzz_seeds();
  const std::size_t seeds = pool.size();
  std::size_t valid_seeds = 0;
  for (const auto& s : pool) {
    run(s);
    valid_seeds += accepted(s);
  }
  mutator m(seed);
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::duration<double>(seconds);
  std::uint64_t iterations = 0, kept = 0, accepted_count = 0;
  while (iterations < max_iterations) {
    if ((iterations & 255) == 0 && std::chrono::steady_clock::now() >= deadline) break;
    const std::string in = m.mutate(pool[m.below(pool.size())], pool);
    run(in);
    ++iterations;
    if (in.size() <= 4096 && accepted(in)) {  // accepted mutants are worth mutating further
      ++accepted_count;
      if (pool.size() < seeds + 512) {
        pool.push_back(in);
        ++kept;
      } else {
        pool[seeds + m.below(512)] = in;
      }
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const char* self = std::strrchr(argv[0], '/') ? std::strrchr(argv[0], '/') + 1 : argv[0];
  std::printf("%s: %zu seeds (%zu valid), %llu mutants in %.1f s (%.0f/s), %llu accepted, %llu kept; "
              "no crash\n",
              self, seeds, valid_seeds, static_cast<unsigned long long>(iterations), secs,
              secs > 0 ? static_cast<double>(iterations) / secs : 0.0, static_cast<unsigned long long>(accepted_count),
              static_cast<unsigned long long>(kept));
  return 0;
}
