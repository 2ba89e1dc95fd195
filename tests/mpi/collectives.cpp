// comm::mpi under mpirun: the collective bodies comm::local and comm::tcp
// pass (tests/unit/comm/collective_checks.hpp, the same code), bit for bit
// against comm::local's thread-ranks computed in each process; the library's
// own reductions within rounding; hierarchical over MPI equal to the flat
// exchange; MPI errors returned as semoe::errors naming the call; the node
// split. Run as `mpirun -n P semoe_mpi_tests` (ctest: P = 2 and 4).
#define DOCTEST_CONFIG_IMPLEMENT
#include "semoe/comm/mpi.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <unistd.h>

#include "semoe/comm/hierarchical.hpp"
#include "unit/comm/collective_checks.hpp"

using semoe::index_t;
namespace comm = semoe::comm;
using comm::reduce_op;

TEST_CASE("mpi: every collective gives exactly comm::local's bytes") {
  auto world = comm::mpi::from_env();
  const int P = world.size();
  const auto ref = semoe::test::local_reference(P, 11 + P);
  const auto got = semoe::test::everything(world, 11 + P);
  CHECK(got.size() == ref[world.rank()].size());
  CHECK(got == ref[world.rank()]);  // bit for bit
}

TEST_CASE("mpi: multi-MiB exchanges land intact, bit for bit") {
  auto world = comm::mpi::from_env();
  std::vector<semoe::test::bytes> ref(world.size());
  comm::local::run(world.size(), [&](comm::local& c) { ref[c.rank()] = semoe::test::large_exchanges(c); });
  const auto got = semoe::test::large_exchanges(world);
  CHECK(got.size() > (std::size_t{8} << 20));
  CHECK(got == ref[world.rank()]);
}

TEST_CASE("mpi: async collectives in flight, waited in any order, complete correctly") {
  auto world = comm::mpi::from_env();
  semoe::test::check_async_in_flight(world);
  // ready() drives MPI's progress: polling alone completes a two-phase
  // reduction (if it did not, this loop would run into ctest's timeout).
  std::vector<double> x(1000, 1.0);
  auto r = world.all_reduce_async(std::span<double>(x));
  while (!r.ready()) {
  }
  r.wait();
  CHECK(x[999] == world.size());
}

TEST_CASE("mpi: the library's own reductions (deterministic = false) agree within rounding") {
  auto world = comm::mpi::from_env({.deterministic = false});
  const int P = world.size(), me = world.rank();
  std::vector<std::vector<double>> want(P);
  std::vector<std::vector<double>> want_rs(P);
  comm::local::run(P, [&](comm::local& c) {
    auto x = semoe::test::reduce_input<double>(c.rank(), 4097, 3);
    comm::all_reduce(c, std::span<double>(x));
    want[c.rank()] = x;
    const auto in = semoe::test::reduce_input<double>(c.rank(), 513 * P, 4);
    std::vector<double> o(513);
    comm::reduce_scatter(c, std::span<const double>(in), std::span<double>(o));
    want_rs[c.rank()] = o;
  });
  auto x = semoe::test::reduce_input<double>(me, 4097, 3);
  comm::all_reduce(world, std::span<double>(x));
  const auto in = semoe::test::reduce_input<double>(me, 513 * P, 4);
  std::vector<double> o(513);
  comm::reduce_scatter(world, std::span<const double>(in), std::span<double>(o));
  double worst = 0;
  for (std::size_t i = 0; i < x.size(); ++i)
    worst = std::max(worst, std::abs(x[i] - want[me][i]) / std::max(1e-300, std::abs(want[me][i]) + 1e-3));
  for (std::size_t i = 0; i < o.size(); ++i)
    worst = std::max(worst, std::abs(o[i] - want_rs[me][i]) / std::max(1e-300, std::abs(want_rs[me][i]) + 1e-3));
  CHECK(worst < 1e-12);
}

TEST_CASE("mpi: hierarchical over MPI equals the flat exchange bit for bit") {
  auto world = comm::mpi::from_env();
  const int P = world.size();
  if (P % 2 != 0) return;
  // Two simulated nodes of P/2 ranks (on one host every rank shares memory).
  comm::mpi two_nodes(world.native(), {.local_size = P / 2});
  CHECK(two_nodes.local_size() == P / 2);
  CHECK(two_nodes.node() == world.rank() / (P / 2));
  comm::hierarchical<comm::mpi> hier(two_nodes.split(0, world.rank()));
  semoe::test::bytes flat, layered;
  semoe::test::a2a<comm::mpi, float>(two_nodes, flat, 21, 3);
  semoe::test::a2a<comm::hierarchical<comm::mpi>, float>(hier, layered, 21, 3);
  CHECK(flat == layered);
}

TEST_CASE("mpi: the node split comes from shared memory, or from options") {
  auto world = comm::mpi::from_env();
  // mpirun on one host: every rank shares memory with every other.
  CHECK(world.local_size() == world.size());
  CHECK(world.local_rank() == world.rank());
  auto g = world.split(world.rank() % 2, world.rank());
  CHECK(g.size() == (world.size() + 1 - world.rank() % 2) / 2);
  CHECK_THROWS_WITH_AS(comm::mpi(world.native(), {.local_size = world.size() + 1}),
                       doctest::Contains("does not divide"), semoe::error);
}

TEST_CASE("mpi: MPI errors come back as semoe::errors naming the call and MPI's reason") {
  auto world = comm::mpi::from_env();
  // Errors return on semoe's communicators: a bad count is reported, not fatal.
  int v = 0;
  const int rc = MPI_Bcast(&v, -1, MPI_INT, 0, world.native());
  CHECK(rc != MPI_SUCCESS);
  CHECK_THROWS_WITH_AS(comm::detail::mpi_check(rc, "MPI_Bcast"), doctest::Contains("MPI_Bcast failed: "), semoe::error);
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  CHECK_THROWS_WITH_AS(comm::detail::mpi_check(rc, "MPI_Bcast"), doctest::Contains(std::string(text, len).c_str()),
                       semoe::error);
  // Sizes MPI's int counts cannot express are refused before any call.
  std::vector<index_t> counts(world.size(), 0);
  counts[0] = index_t{1} << 31;
  std::vector<float> buf(1);
  CHECK_THROWS_WITH_AS(world.all_to_all_v_async(std::span<const float>(buf), std::span<const index_t>(counts),
                                                std::span<float>(buf), std::span<const index_t>(counts)),
                       doctest::Contains("exceeds MPI's int counts"), semoe::error);
  CHECK_THROWS_WITH_AS(world.broadcast_async(std::span<float>(buf), world.size()), doctest::Contains("root = "),
                       semoe::error);
}

int main(int argc, char** argv) {
  // SEMOE_MPI_TEST_DIE=R: rank R exits with status 3 while the others wait
  // in an all_reduce; mpirun must end the job and name the process.
  if (const char* die = std::getenv("SEMOE_MPI_TEST_DIE")) {
    auto world = comm::mpi::from_env();
    std::vector<double> x(16, 1.0);
    if (world.rank() == std::atoi(die)) {
      std::fprintf(stderr, "rank %d exits on purpose\n", world.rank());
      std::fflush(stderr);
      ::_exit(3);
    }
    comm::all_reduce(world, std::span<double>(x));
    return 0;
  }
  doctest::Context ctx(argc, argv);
  const int rc = ctx.run();
  // Every rank's verdict: one failing rank fails the job.
  comm::mpi::from_env();
  int any = rc != 0, all_rc = 0;
  MPI_Allreduce(&any, &all_rc, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return all_rc;
}
