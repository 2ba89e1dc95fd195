// comm::tcp from the installed package: two ranks, threads of this process,
// meet over loopback (authenticated rendezvous) and all_reduce a vector.
#include <semoe/comm/tcp.hpp>

#include <cstdio>
#include <exception>
#include <thread>
#include <vector>

int main() {
  namespace asio = boost::asio;
  int port = 0;
  {  // a port nobody listens on right now: the kernel's pick for port 0
    asio::io_context io;
    asio::ip::tcp::acceptor a(io, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    port = a.local_endpoint().port();
  }
  const int P = 2;
  std::vector<std::vector<float>> sums(P);
  std::vector<std::exception_ptr> errors(P);
  std::vector<std::thread> ranks;
  for (int r = 0; r < P; ++r)
    ranks.emplace_back([&, r] {
      try {
        semoe::comm::tcp c({.rank = r, .size = P, .master_port = port, .secret = "consumer"});
        std::vector<float> v{1.0f + r, 10.0f * (r + 1), -0.5f};
        semoe::comm::all_reduce(c, std::span<float>(v));
        c.drain();
        sums[r] = v;
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : ranks) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  const std::vector<float> want{3.0f, 30.0f, -1.0f};
  std::printf("semoe::tcp consumer: all_reduce over 2 ranks = {%g, %g, %g}\n", sums[0][0], sums[0][1], sums[0][2]);
  return sums[0] == want && sums[1] == want ? 0 : 1;
}
