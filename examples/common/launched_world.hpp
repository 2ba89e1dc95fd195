// examples/common/launched_world.hpp: the communicator of a launched job,
// shared by the examples so that none repeats its training code per
// transport. `--comm tcp` (the default) joins over comm::tcp (semoe-run, or
// mpirun / srun with SEMOE_MASTER_PORT and SEMOE_SECRET set); `--comm mpi`
// over comm::mpi (mpirun, mpiexec, srun), in builds with MPI.
#pragma once

#include <cstdlib>
#include <string>

#include "semoe/comm/tcp.hpp"
#include "semoe/core/error.hpp"
#ifdef SEMOE_WITH_MPI
#include "semoe/comm/mpi.hpp"
#endif

namespace examples {

/// True when this process is one rank of a launched job (semoe-run, Open MPI,
/// MPICH / Hydra, Slurm).
inline bool launched() {
  for (const char* v : {"SEMOE_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_NTASKS"})
    if (const char* s = std::getenv(v); s && *s) return true;
  return false;
}

/// The transports a build offers, for --help.
inline const char* comm_choices() {
#ifdef SEMOE_WITH_MPI
  return "tcp|mpi";
#else
  return "tcp";
#endif
}

/// f(world) with the launched job's communicator of kind `comm` ("tcp" or
/// "mpi"); f is a generic lambda instantiated once per transport.
template <class F>
auto with_launched_world(const std::string& comm, F&& f) {
  if (comm == "mpi") {
#ifdef SEMOE_WITH_MPI
    auto world = semoe::comm::mpi::from_env();
    return f(world);
#else
    SEMOE_CHECK(false, "--comm mpi: this build has no MPI (configure with Open MPI or MPICH installed)");
#endif
  }
  SEMOE_CHECK(comm == "tcp", "--comm ", comm, ": expected ", comm_choices());
  auto world = semoe::comm::tcp::from_env();
  return f(world);
}

}  // namespace examples
