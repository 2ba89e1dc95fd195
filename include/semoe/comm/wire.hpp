// semoe/comm/wire.hpp: the frame format comm::tcp speaks.
// Every message on a connection is a run of frames; each frame is a fixed
// 48-byte little-endian header followed by at most max_frame_bytes of payload.
// The header is checked in full (magic, version, checksum, bounds) before a
// single payload byte is read or a buffer allocated, so a hostile or confused
// peer yields an error message, never a crash or an unbounded allocation.
#pragma once

#include <array>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include <zlib.h>

#include "semoe/core/error.hpp"

namespace semoe::comm::wire {

/// "SMOE" as the first four bytes on the wire.
inline constexpr std::uint32_t magic = 0x454F4D53u;
inline constexpr std::uint16_t version = 1;
inline constexpr std::size_t header_size = 48;
/// Control payloads (handshake, abort reasons) are small; bound them tightly.
inline constexpr std::size_t max_control_bytes = 4096;

enum class kind : std::uint8_t {
  // connection setup (rendezvous.hpp)
  challenge = 1,
  response = 2,
  proof = 3,
  table = 4,
  // a rank gave up; the payload says why, so peers can name the root cause
  abort = 16,
  // the receiver has posted its buffer for the message named by group, seq
  // and step (of `total` bytes): its sender may send the rest (tcp.hpp)
  clear_to_send = 17,
  // collectives (tcp.hpp)
  all_to_all_v = 32,
  all_reduce = 33,
  all_gather = 34,
  reduce_scatter = 35,
  broadcast = 36,
  barrier = 37,
  split = 38,
};

/// Text a peer sent (an abort reason), safe to print: control bytes, DEL
/// and bytes past ASCII become \xNN, so a hostile peer cannot move the
/// cursor, clear the screen or forge lines of this rank's message.
inline std::string printable(std::string_view text) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size());
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f) {
      out += ch;
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

inline const char* kind_name(kind k) {
  switch (k) {
    case kind::challenge: return "challenge";
    case kind::response: return "response";
    case kind::proof: return "proof";
    case kind::table: return "address table";
    case kind::abort: return "abort";
    case kind::clear_to_send: return "clear-to-send";
    case kind::all_to_all_v: return "all_to_all_v";
    case kind::all_reduce: return "all_reduce";
    case kind::all_gather: return "all_gather";
    case kind::reduce_scatter: return "reduce_scatter";
    case kind::broadcast: return "broadcast";
    case kind::barrier: return "barrier";
    case kind::split: return "split";
  }
  return "unknown";
}

inline bool is_known(std::uint8_t k) {
  return (k >= 1 && k <= 4) || k == 16 || k == 17 || (k >= 32 && k <= 38);
}
inline bool is_collective(kind k) { return static_cast<std::uint8_t>(k) >= 32; }

/// One frame's header. `total` is the byte size of the whole message the
/// frame belongs to, so a receiver can check it against what it expects
/// before accepting any payload; `length` is this frame's payload.
struct header {
  kind type = kind::abort;
  std::uint8_t step = 0;     ///< phase of a multi-phase collective
  std::uint32_t dtype = 0;   ///< element size | category << 8 (0: bytes)
  std::uint32_t arg = 0;     ///< reduce op or broadcast root: ranks must agree
  std::uint64_t group = 0;   ///< communicator (split) the frame belongs to
  std::uint64_t seq = 0;     ///< collective number within the group
  std::uint64_t total = 0;   ///< bytes in the whole message
  std::uint32_t length = 0;  ///< payload bytes in this frame
};

using header_bytes = std::array<unsigned char, header_size>;

namespace detail {
inline void put(unsigned char* p, std::uint64_t v, int n) {
  for (int i = 0; i < n; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
inline std::uint64_t get(const unsigned char* p, int n) {
  std::uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= std::uint64_t{p[i]} << (8 * i);
  return v;
}
inline std::uint32_t checksum(const unsigned char* p) {
  return static_cast<std::uint32_t>(::crc32(0L, p, static_cast<uInt>(header_size - 4)));
}
}  // namespace detail

inline header_bytes encode(const header& h) {
  header_bytes b{};
  unsigned char* p = b.data();
  detail::put(p + 0, magic, 4);
  detail::put(p + 4, version, 2);
  p[6] = static_cast<unsigned char>(h.type);
  p[7] = h.step;
  detail::put(p + 8, h.dtype, 4);
  detail::put(p + 12, h.arg, 4);
  detail::put(p + 16, h.group, 8);
  detail::put(p + 24, h.seq, 8);
  detail::put(p + 32, h.total, 8);
  detail::put(p + 40, h.length, 4);
  detail::put(p + 44, detail::checksum(p), 4);
  return b;
}

/// Decode and check a header. Returns "" when it is well formed, otherwise a
/// sentence naming the problem (the caller adds the peer and the collective).
inline std::string decode(const header_bytes& b, header& h, std::size_t max_frame_bytes) {
  const unsigned char* p = b.data();
  const auto m = static_cast<std::uint32_t>(detail::get(p, 4));
  if (m != magic) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "bad magic 0x%08x (expected 0x%08x, \"SMOE\")", m, magic);
    return buf;
  }
  const auto v = static_cast<std::uint16_t>(detail::get(p + 4, 2));
  if (v != version)
    return semoe::detail::concat("wrong protocol version ", v, " (this build speaks version ", version, ")");
  if (static_cast<std::uint32_t>(detail::get(p + 44, 4)) != detail::checksum(p))
    return "header checksum mismatch (corrupt stream)";
  if (!is_known(p[6])) return semoe::detail::concat("unknown frame kind ", int(p[6]));
  h.type = static_cast<kind>(p[6]);
  h.step = p[7];
  h.dtype = static_cast<std::uint32_t>(detail::get(p + 8, 4));
  h.arg = static_cast<std::uint32_t>(detail::get(p + 12, 4));
  h.group = detail::get(p + 16, 8);
  h.seq = detail::get(p + 24, 8);
  h.total = detail::get(p + 32, 8);
  h.length = static_cast<std::uint32_t>(detail::get(p + 40, 4));
  const std::size_t limit = is_collective(h.type) ? max_frame_bytes : max_control_bytes;
  if (h.length > limit)
    return semoe::detail::concat("oversize frame: ", h.length, " payload bytes, more than the limit of ", limit);
  if (h.length > h.total)
    return semoe::detail::concat("frame length ", h.length, " exceeds its message total of ", h.total, " bytes");
  return {};
}

}  // namespace semoe::comm::wire
