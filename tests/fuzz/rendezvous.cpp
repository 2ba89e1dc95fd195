// Fuzz target: the rendezvous handshake, both sides, over a real loopback TCP
// connection. The input is what a hostile peer sends:
//   byte 0, bit 0 clear: a stranger connecting to a rank that accepts
//                        (accept_handshake, which sends its challenge first);
//   byte 0, bit 0 set:   a fake rank 0 that a joining rank 1 connects to
//                        (connect_handshake, which reads the challenge first);
//   byte 0, bit 1 set:   the checksum of the first frame header is fixed up,
//                        so the fuzzer gets past it to the field checks;
//   bytes 1..:           sent as they are, then the peer's side is shut.
// Whatever arrives, the handshake ends in a semoe::error (no input can prove
// the secret: every proof covers a fresh random nonce); anything else (a
// crash, a sanitizer finding, another exception, an accepted stranger) aborts.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "semoe/comm/rendezvous.hpp"

namespace {

namespace asio = boost::asio;
namespace d = semoe::comm::detail;
namespace wire = semoe::comm::wire;

struct loopback {
  asio::io_context io;
  asio::ip::tcp::acceptor acc{io, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)};
};

loopback& net() {
  static loopback l;
  return l;
}

/// The input's frames, with the first header's checksum fixed up when asked.
std::string frames(const std::uint8_t* data, std::size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  if ((data[0] & 2) && bytes.size() >= wire::header_size) {
    auto* b = reinterpret_cast<unsigned char*>(bytes.data());
    wire::detail::put(b + 44, wire::detail::checksum(b), 4);
  }
  return bytes;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const bool joiner = data[0] & 1;
  const std::string hostile = frames(data, size);
  auto& n = net();
  d::tcp_socket ours(n.io), theirs(n.io);
  // The side under test is "ours"; the hostile peer writes everything at once
  // and shuts its side, so every read ends at the data or at end of stream.
  d::tcp_socket& dialer = joiner ? ours : theirs;
  d::tcp_socket& accepted = joiner ? theirs : ours;
  dialer.connect(n.acc.local_endpoint());
  n.acc.accept(accepted);
  boost::system::error_code ec;
  asio::write(theirs, asio::buffer(hostile), ec);
  theirs.shutdown(asio::socket_base::shutdown_send, ec);

  semoe::comm::tcp_options o;
  o.size = 2;
  o.rank = joiner ? 1 : 0;
  o.secret = "fuzz";
  const auto deadline = d::steady::now() + std::chrono::seconds(5);
  try {
    if (joiner)
      d::connect_handshake(n.io, ours, o, 0, 4242, deadline);
    else
      d::accept_handshake(n.io, ours, o, deadline, [](const d::join_claim&) { return std::string(); });
    std::abort();  // a peer without the secret got through
  } catch (const semoe::error&) {
  }
  return 0;
}

/// For the stand-in driver: the first frame decodes and is the kind the
/// side under test reads first (a challenge, or a stranger's response).
bool fuzz_accepts(const std::string& in) {
  if (in.size() < 1 + wire::header_size) return false;
  const std::string f = frames(reinterpret_cast<const std::uint8_t*>(in.data()), in.size());
  wire::header_bytes b;
  std::memcpy(b.data(), f.data(), wire::header_size);
  wire::header h;
  return wire::decode(b, h, wire::max_control_bytes).empty() &&
         h.type == ((in[0] & 1) ? wire::kind::challenge : wire::kind::response);
}

namespace {

std::string frame(wire::kind k, const std::vector<unsigned char>& payload) {
  wire::header h;
  h.type = k;
  h.total = h.length = static_cast<std::uint32_t>(payload.size());
  const auto b = wire::encode(h);
  return std::string(reinterpret_cast<const char*>(b.data()), b.size()) +
         std::string(reinterpret_cast<const char*>(payload.data()), payload.size());
}

}  // namespace

/// Seeds for the stand-in driver: a stranger's well-formed response with a
/// wrong MAC; a fake rank 0's well-formed challenge then a wrong proof.
std::vector<std::string> fuzz_seeds() {
  std::vector<unsigned char> response;
  for (std::uint32_t x : {1u, 2u, 2u, 4242u}) d::put32(response, x);
  response.resize(16 + d::nonce_bytes + d::mac_bytes, 7);
  std::vector<unsigned char> challenge(d::nonce_bytes, 9);
  d::put32(challenge, 0);
  d::put32(challenge, 2);
  return {std::string(1, '\0') + frame(wire::kind::response, response),
          std::string(1, '\1') + frame(wire::kind::challenge, challenge) +
              frame(wire::kind::proof, std::vector<unsigned char>(d::mac_bytes, 3)),
          std::string(1, '\3') + std::string(60, 'x')};
}
