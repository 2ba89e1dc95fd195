// comm::nccl on the GPUs of this machine, one rank per GPU, thread-ranks of
// comm::local as the side channel. One GPU runs the 1-rank communicator (every
// collective, host and device spans, split); the cases that need two or more
// GPUs say so and end without checking anything where there are fewer.
// Skipped without a device (gpu_main.cuh).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "compare.hpp"
#include "gpu_main.cuh"
#include "semoe/comm/hierarchical.hpp"
#include "semoe/comm/local.hpp"
#include "semoe/comm/nccl.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/cuda/backend.cuh"
#include "semoe/gate/top_k.hpp"
#include "semoe/layer/moe_layer.hpp"

using namespace semoe;
using semoe::test::random_vec;
using semoe::test::scaled_error;

static_assert(comm::Communicator<comm::nccl>);
static_assert(comm::moves_device_memory_v<comm::nccl> && !comm::moves_device_memory_v<comm::local>);

namespace {

struct set_value {
  float* p;
  float v;
  SEMOE_HD void operator()(index_t i) const { p[i] = v; }
};

int gpus() {
  int n = 0;
  SEMOE_CUDA_TRY(cudaGetDeviceCount(&n));
  return n;
}

template <class T>
std::vector<T> to_host(const buffer<T, device_space>& d) {
  std::vector<T> h(static_cast<std::size_t>(d.size()));
  SEMOE_CUDA_TRY(cudaMemcpy(h.data(), d.data(), d.bytes(), cudaMemcpyDeviceToHost));
  return h;
}

template <class T>
buffer<T, device_space> to_device(const std::vector<T>& h) {
  buffer<T, device_space> d(static_cast<index_t>(h.size()));
  SEMOE_CUDA_TRY(cudaMemcpy(d.data(), h.data(), d.bytes(), cudaMemcpyHostToDevice));
  return d;
}

/// P thread-ranks, each with its own GPU and a comm::nccl over comm::local.
template <class F>
void on_gpus(int P, F body) {
  comm::local::run(P, [&](comm::local& side) {
    comm::nccl_options o;
    o.device = side.rank();
    o.timeout = std::chrono::seconds(30);
    cuda_executor ex({.device = side.rank()});
    auto world = comm::nccl::over(side.split(0, side.rank()), o);
    body(ex, world);
  });
}

/// The value rank r sends to rank p at position i of an all-to-all.
float a2a_value(int r, int p, index_t i) { return static_cast<float>(1000 * r + 100 * p) + static_cast<float>(i); }

/// Each rank sends (r + p) % 3 + 2 elements to rank p; checks what arrives.
template <class C>
void check_all_to_all(C& world, bool host_spans) {
  const int P = world.size(), me = world.rank();
  std::vector<index_t> sc(P), rc(P);
  for (int p = 0; p < P; ++p) {
    sc[p] = (me + p) % 3 + 2;
    rc[p] = (p + me) % 3 + 2;
  }
  std::vector<float> send, want;
  for (int p = 0; p < P; ++p)
    for (index_t i = 0; i < sc[p]; ++i) send.push_back(a2a_value(me, p, i));
  for (int p = 0; p < P; ++p)
    for (index_t i = 0; i < rc[p]; ++i) want.push_back(a2a_value(p, me, i));
  std::vector<float> got(want.size());
  if (host_spans) {
    comm::all_to_all_v(world, std::span<const float>(send), std::span<const index_t>(sc), std::span<float>(got),
                       std::span<const index_t>(rc));
  } else {
    auto d_send = to_device(send);
    buffer<float, device_space> d_recv(static_cast<index_t>(want.size()));
    comm::all_to_all_v(world, std::span<const float>(d_send.data(), send.size()), std::span<const index_t>(sc),
                       std::span<float>(d_recv.data(), want.size()), std::span<const index_t>(rc));
    got = to_host(d_recv);
  }
  CHECK(got == want);
}

void check_reductions(comm::nccl& world) {
  const int P = world.size(), me = world.rank();
  // all_reduce (sum, max) on device memory, double on the host.
  std::vector<float> x(1000);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i) * static_cast<float>(me + 1);
  auto d = to_device(x);
  comm::all_reduce(world, std::span<float>(d.data(), x.size()));
  const auto sum = to_host(d);
  for (std::size_t i = 0; i < x.size(); ++i)
    CHECK(sum[i] == static_cast<float>(i) * static_cast<float>(P * (P + 1) / 2));
  std::vector<double> m{static_cast<double>(me), -static_cast<double>(me)};
  comm::all_reduce(world, std::span<double>(m), comm::reduce_op::max);
  CHECK(m == std::vector<double>{static_cast<double>(P - 1), 0.0});
  // all_gather and reduce_scatter on the host, broadcast on the device.
  std::vector<std::int64_t> mine{me, 10 * me}, all(2 * static_cast<std::size_t>(P));
  comm::all_gather(world, std::span<const std::int64_t>(mine), std::span<std::int64_t>(all));
  for (int r = 0; r < P; ++r) {
    CHECK(all[2 * r] == r);
    CHECK(all[2 * r + 1] == 10 * r);
  }
  std::vector<float> in(3 * static_cast<std::size_t>(P), 1.0f), out(3);
  comm::reduce_scatter(world, std::span<const float>(in), std::span<float>(out));
  CHECK(out == std::vector<float>(3, static_cast<float>(P)));
  auto b = to_device(std::vector<float>(4, static_cast<float>(me + 7)));
  comm::broadcast(world, std::span<float>(b.data(), 4), P - 1);
  CHECK(to_host(b) == std::vector<float>(4, static_cast<float>(P - 1 + 7)));
  world.barrier();
}

}  // namespace

TEST_CASE("nccl, 1 rank: every collective, on device and host memory, and split") {
  on_gpus(1, [](cuda_executor&, comm::nccl& world) {
    CHECK(world.rank() == 0);
    CHECK(world.size() == 1);
    check_all_to_all(world, false);
    check_all_to_all(world, true);
    check_reductions(world);
    auto sub = world.split(0, 0);
    CHECK(sub.size() == 1);
    check_reductions(sub);
  });
}

TEST_CASE("nccl, 1 rank: collectives run after the compute stream's work") {
  // A device buffer written by the executor's compute stream is all-reduced
  // at once: the communicator's stream must wait for the write.
  on_gpus(1, [](cuda_executor& ex, comm::nccl& world) {
    buffer<float, device_space> d(1 << 20);
    ex.parallel_for(d.size(), set_value{d.data(), 3.0f});
    comm::all_reduce(world, std::span<float>(d.data(), static_cast<std::size_t>(d.size())));
    const auto h = to_host(d);
    CHECK(std::all_of(h.begin(), h.end(), [](float v) { return v == 3.0f; }));
  });
}

TEST_CASE("nccl, 2 or more GPUs: all-to-all with uneven counts and every reduction equal the expected values") {
  const int P = gpus();
  if (P < 2) {
    MESSAGE("this machine has " << P << " GPU: the multi-rank cases need 2 or more and were not run");
    return;
  }
  on_gpus(P, [](cuda_executor&, comm::nccl& world) {
    check_all_to_all(world, false);
    check_all_to_all(world, true);
    check_reductions(world);
    // Two groups of alternating ranks.
    auto half = world.split(world.rank() % 2, world.rank());
    check_all_to_all(half, false);
    check_reductions(half);
  });
}

TEST_CASE("nccl: bad arguments are errors naming the collective") {
  on_gpus(1, [](cuda_executor&, comm::nccl& world) {
    std::vector<float> a(4), b(4);
    const std::vector<index_t> two{2, 2};
    CHECK_THROWS_WITH_AS(comm::all_to_all_v(world, std::span<const float>(a), std::span<const index_t>(two),
                                            std::span<float>(b), std::span<const index_t>(two)),
                         doctest::Contains("semoe::comm::nccl::all_to_all_v: expected 1 send and receive counts"),
                         semoe::error);
    CHECK_THROWS_WITH_AS(comm::all_gather(world, std::span<const float>(a), std::span<float>(b.data(), 3)),
                         doctest::Contains("semoe::comm::nccl::all_gather"), semoe::error);
    CHECK_THROWS_WITH_AS(comm::broadcast(world, std::span<float>(a), 1), doctest::Contains("root = 1"),
                         semoe::error);
  });
}

TEST_CASE("hierarchical<comm::nccl> over two simulated nodes equals the expected bytes (4 or more GPUs)") {
  const int P = gpus() / 2 * 2;
  if (P < 4) {
    MESSAGE("this machine has " << gpus() << " GPU(s): two nodes of two or more ranks need 4 and were not run");
    return;
  }
  on_gpus(P, [P](cuda_executor&, comm::nccl& world) {
    const int L = P / 2, r = world.rank();
    auto intra = world.split(r / L, r);
    auto rail = world.split(r % L, r);
    comm::hierarchical<comm::nccl> h(world, std::move(intra), std::move(rail));
    CHECK(h.nodes() == 2);
    check_all_to_all(h, false);
    check_all_to_all(h, true);
  });
}

TEST_CASE("moe_layer on the cuda backend over comm::nccl (device buffers, no host staging) equals the cpu layer") {
  using cpu_layer = moe_layer<cpu, gate::top_k<2>>;
  using gpu_layer = basic_moe_layer<float, semoe::cuda, gate::top_k<2>, expert::ffn<act::gelu>, comm::nccl>;
  const index_t T = 256, H = 64, F = 128, E = 4;
  const auto x = random_vec(T * H, 1), dy = random_vec(T * H, 2);
  std::vector<float> ya(T * H), dxa(T * H);
  {
    cpu_executor cex({.threads = 2});
    auto c1 = comm::local::make_world(1);
    cpu_layer a(cex, c1[0], {.hidden = H, .ffn = F, .experts = E, .seed = 5});
    a.forward(as_matrix(x.data(), T, H), as_matrix(ya.data(), T, H));
    a.zero_grad();
    a.backward(as_matrix(dy.data(), T, H), as_matrix(dxa.data(), T, H));
  }
  on_gpus(1, [&](cuda_executor& gex, comm::nccl& world) {
    gpu_layer b(gex, world, {.hidden = H, .ffn = F, .experts = E, .seed = 5});
    auto xd = to_device(x), dyd = to_device(dy);
    buffer<float, device_space> yd(T * H), dxd(T * H);
    b.forward(matrix_view<const float>(xd.matrix(T, H)), yd.matrix(T, H));
    b.zero_grad();
    b.backward(matrix_view<const float>(dyd.matrix(T, H)), dxd.matrix(T, H));
    CHECK(scaled_error(to_host(yd), ya) < 1e-5);
    CHECK(scaled_error(to_host(dxd), dxa) < 1e-5);
  });
}
