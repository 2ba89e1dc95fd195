// Fuzz target: the frame header decoder. Any 48 bytes must decode to a
// header or to a sentence saying why not; a header that decodes encodes back
// to the same fields. The first input byte chooses whether the checksum is
// fixed up first, so the fuzzer gets past it to the field checks. Also
// wire::printable: whatever a peer sends prints as printable ASCII.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "semoe/comm/wire.hpp"

namespace wire = semoe::comm::wire;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text = wire::printable(std::string_view(reinterpret_cast<const char*>(data), size));
  for (const char c : text)
    if (c < 0x20 || c > 0x7e) std::abort();
  if (size < 1 + wire::header_size) return 0;
  wire::header_bytes b;
  std::memcpy(b.data(), data + 1, wire::header_size);
  if (data[0] & 1) wire::detail::put(b.data() + 44, wire::detail::checksum(b.data()), 4);
  wire::header h;
  const std::string why = wire::decode(b, h, std::size_t{1} << 20);
  if (why.empty()) {
    wire::header again;
    if (!wire::decode(wire::encode(h), again, std::size_t{1} << 20).empty() || again.type != h.type ||
        again.step != h.step || again.dtype != h.dtype || again.arg != h.arg || again.group != h.group ||
        again.seq != h.seq || again.total != h.total || again.length != h.length || h.length > h.total)
      std::abort();
  }
  return 0;
}

/// For the stand-in driver: the bytes after the flag decode to a header.
bool fuzz_accepts(const std::string& in) {
  if (in.size() < 1 + wire::header_size) return false;
  wire::header_bytes b;
  std::memcpy(b.data(), in.data() + 1, wire::header_size);
  if (in[0] & 1) wire::detail::put(b.data() + 44, wire::detail::checksum(b.data()), 4);
  wire::header h;
  return wire::decode(b, h, std::size_t{1} << 20).empty();
}

/// Seeds for the stand-in driver (driver.cpp): a well-formed all_reduce
/// frame header, with and without the checksum fix-up flag.
std::vector<std::string> fuzz_seeds() {
  wire::header h;
  h.type = wire::kind::all_reduce;
  h.dtype = 4;
  h.seq = 3;
  h.total = 4000;
  h.length = 4000;
  const auto b = wire::encode(h);
  const std::string bytes(reinterpret_cast<const char*>(b.data()), b.size());
  return {std::string(1, '\0') + bytes, std::string(1, '\1') + bytes, "plain \x1b[2J text\n"};
}
