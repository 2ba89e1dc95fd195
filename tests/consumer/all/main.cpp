// Every component from the installed package: a moe_layer over a one-rank
// comm::tcp job, its experts in device/host/SSD tiers under budgets smaller
// than they are, must compute what the all-resident layer over comm::local
// computes; its gate weights round-trip through a safetensors file. With CUDA,
// the cuda backend's libraries (cudart, cuBLAS) link and answer.
#include <semoe/comm/tcp.hpp>
#include <semoe/io/safetensors.hpp>
#include <semoe/semoe.hpp>
#include <semoe/storage/tiered_store.hpp>
#ifdef SEMOE_CONSUMER_CUDA
#include <semoe/cuda/error.cuh>
#endif

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

using namespace semoe;

int main() {
  const index_t T = 16, H = 32, F = 48, E = 4;
  const auto dir = std::filesystem::temp_directory_path() / ("semoe-consumer-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  cpu_executor ex({.threads = 2});
  std::vector<float> x(T * H), y_local(T * H), y_tcp(T * H);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(std::sin(0.1 * static_cast<double>(i)));
  const auto in = as_matrix(x.data(), T, H);

  // All resident, over comm::local.
  auto world = comm::local::make_world(1);
  basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>> resident(
      ex, world[0], {.hidden = H, .ffn = F, .experts = E, .seed = 11});
  resident.forward(matrix_view<const float>(in), as_matrix(y_local.data(), T, H));

  // Offloaded to SSD, over a one-rank TCP job.
  int port = 0;
  {
    boost::asio::io_context io;
    boost::asio::ip::tcp::acceptor a(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
    port = a.local_endpoint().port();
  }
  comm::tcp c({.rank = 0, .size = 1, .master_port = port, .secret = "consumer", .timeout = std::chrono::seconds(20)});
  using tiers = storage::tiered<storage::device_tier, storage::host_tier, storage::ssd_tier>;
  tiers::store<float>::options o;
  const auto block = static_cast<std::size_t>(expert::ffn<>::block_elems({H, F})) * sizeof(float);
  o.device.budget_bytes = 2 * 2 * block;         // weights and gradients of two experts
  o.host.budget_bytes = 2 * 4 * block + 4 * 4096;  // two of the four experts' whole blocks
  o.ssd.dir = dir;
  auto store = std::make_shared<tiers::store<float>>(o);
  basic_moe_layer<float, cpu, gate::top_k<2>, expert::ffn<act::gelu>, comm::tcp, tiers> offloaded(
      ex, c, {.hidden = H, .ffn = F, .experts = E, .seed = 11}, store);
  offloaded.forward(matrix_view<const float>(in), as_matrix(y_tcp.data(), T, H));
  const bool same = y_tcp == y_local;
  const auto ssd_bytes = store->stats().ssd.bytes_in;

  // The gate's weights through a safetensors file.
  const auto wg = offloaded.parameters()[0].value;
  const std::vector<float> saved(wg.begin(), wg.end());
  io::safetensors_writer w;
  w.add("gate", {H, E}, saved);
  w.write(dir / "gate.safetensors");
  const bool round_trip = io::safetensors_file::open(dir / "gate.safetensors").read_as<float>("gate") == saved;
  std::filesystem::remove_all(dir);

  std::printf("semoe consumer, every component: offloaded over tcp %s resident over local (%llu bytes to SSD); "
              "safetensors round trip %s\n",
              same ? "==" : "!=", static_cast<unsigned long long>(ssd_bytes), round_trip ? "ok" : "FAILED");
  bool ok = same && ssd_bytes > 0 && round_trip;
#ifdef SEMOE_CONSUMER_CUDA
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  std::printf("semoe::cuda: cudaGetDeviceCount: %s, %d devices; cuBLAS: %s\n", cudaGetErrorName(e),
              e == cudaSuccess ? devices : 0, cublasGetStatusName(CUBLAS_STATUS_SUCCESS));
  ok = ok && std::strcmp(cublasGetStatusName(CUBLAS_STATUS_SUCCESS), "CUBLAS_STATUS_SUCCESS") == 0;
#endif
  return ok ? 0 : 1;
}
