// semoe/core/random.hpp: a counter-based generator (Philox4x32-10, Salmon et
// al., SC'11). A draw is a pure function of (seed, stream, counter), so every
// rank and every thread produces the same noise for the same token without
// talking, and CPU and GPU agree bit for bit.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

#include "semoe/core/config.hpp"

namespace semoe {

class philox {
 public:
  using result_type = std::array<std::uint32_t, 4>;

  SEMOE_HD constexpr philox(std::uint64_t seed, std::uint64_t stream = 0)
      : key0_(static_cast<std::uint32_t>(seed)), key1_(static_cast<std::uint32_t>(seed >> 32)),
        stream_(stream) {}

  /// Four independent 32-bit words for `counter`.
  SEMOE_HD constexpr result_type operator()(std::uint64_t counter) const {
    std::uint32_t c0 = static_cast<std::uint32_t>(counter), c1 = static_cast<std::uint32_t>(counter >> 32);
    std::uint32_t c2 = static_cast<std::uint32_t>(stream_), c3 = static_cast<std::uint32_t>(stream_ >> 32);
    std::uint32_t k0 = key0_, k1 = key1_;
    for (int round = 0; round < 10; ++round) {
      const std::uint64_t p0 = std::uint64_t{0xD2511F53u} * c0;
      const std::uint64_t p1 = std::uint64_t{0xCD9E8D57u} * c2;
      const std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const std::uint32_t n1 = static_cast<std::uint32_t>(p1);
      const std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3 ^ k1;
      const std::uint32_t n3 = static_cast<std::uint32_t>(p0);
      c0 = n0, c1 = n1, c2 = n2, c3 = n3;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    return {c0, c1, c2, c3};
  }

  /// Uniform in (0, 1): never 0, so log() of it is finite.
  SEMOE_HD constexpr float uniform(std::uint64_t counter, int lane = 0) const {
    return to_unit((*this)(counter)[lane & 3]);
  }

  /// Standard normal by Box-Muller over lanes 0 and 1.
  SEMOE_HD float normal(std::uint64_t counter) const {
    const auto w = (*this)(counter);
    const float u1 = to_unit(w[0]), u2 = to_unit(w[1]);
    return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.28318530717958647692f * u2);
  }

  /// The top 23 bits, centred in their bin: (m + 1/2) / 2^23 needs 24
  /// significant bits, so it is exact and lies in [2^-24, 1 - 2^-24]. (With 24
  /// bits, m + 1/2 rounds and the top words gave exactly 1.0f.)
  SEMOE_HD static constexpr float to_unit(std::uint32_t x) {
    return (static_cast<float>(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
  }

 private:
  std::uint32_t key0_, key1_;
  std::uint64_t stream_;
};

}  // namespace semoe
