#include "parallel/process_grid.h"

#include "parallel/mpi_comm.h"
#include "parallel/mpi_runtime.h"
#include "parallel/self_comm.h"
#include "runtime/error.h"
#ifdef MOEFORGE_WITH_CUDA
#include "parallel/nccl_comm.h"
#endif

namespace moeforge {
namespace {

// The Comm of an MPI communicator of two or more ranks (taking ownership of it): NCCL for a
// CUDA run (collective: every member joins the group's NCCL communicator), MPI otherwise.
std::shared_ptr<Comm> wrap(const MpiRuntime& mpi, MPI_Comm comm, const char* name, double timeout_s, Device device) {
#ifdef MOEFORGE_WITH_CUDA
  if (device.is_cuda()) return std::make_shared<NcclComm>(comm, name, mpi.watchdog(), timeout_s, device.index);
#endif
  return std::make_shared<MpiComm>(comm, name, mpi.watchdog(), timeout_s);
}

// The group of `size` members this rank belongs to: every rank calls this for the same group
// kind in the same order, since MPI_Comm_split is collective over the world.
std::shared_ptr<Comm> make_group(const MpiRuntime& mpi, const char* name, int size, int color, int key,
                                 double timeout_s, Device device) {
  if (size == 1) return std::make_shared<SelfComm>(name, mpi.world_rank());
  MPI_Comm comm = MPI_COMM_NULL;
  MOE_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, color, key, &comm));
  return wrap(mpi, comm, name, timeout_s, device);
}

}  // namespace

void check_parallel_sizes(const ParallelSizes& s, int world_size) {
  const std::pair<const char*, int> fields[] = {{"tp", s.tp}, {"pp", s.pp}, {"dp", s.dp}, {"ep", s.ep}};
  for (const auto& [field, value] : fields) {
    MOE_CHECK(value >= 1, "parallel.{} must be >= 1, got {}", field, value);
  }
  const int64_t ranks = int64_t{s.tp} * s.pp * s.dp;
  MOE_CHECK(ranks == world_size,
            "parallel layout tp {} x pp {} x dp {} = {} ranks does not match the world size {} (the number of "
            "processes started by mpirun/srun)",
            s.tp, s.pp, s.dp, ranks, world_size);
  MOE_CHECK((s.tp * s.dp) % s.ep == 0,
            "parallel.ep ({}) must divide tp x dp = {}: expert parallelism regroups the tp x dp ranks of a "
            "pipeline stage",
            s.ep, s.tp * s.dp);
}

ProcessGrid ProcessGrid::create(const MpiRuntime& mpi, const ParallelSizes& sizes, double collective_timeout_s,
                                Device device) {
  check_parallel_sizes(sizes, mpi.world_size());
  MOE_CHECK(collective_timeout_s > 0, "parallel.collective_timeout_s must be > 0 seconds, got {}",
            collective_timeout_s);
#ifndef MOEFORGE_WITH_CUDA
  // Before any collective, so every rank fails alike.
  MOE_CHECK(device.is_cpu(), "ProcessGrid: the run's device is {}, but moeforge was built without CUDA "
            "(MOEFORGE_CUDA=OFF)", device.str());
#endif
  const int w = mpi.world_rank();
  const int tp = sizes.tp, dp = sizes.dp, ep = sizes.ep;
  const int tp_rank = w % tp, dp_rank = (w / tp) % dp, pp_rank = w / (tp * dp);
  const int in_stage = w % (tp * dp);  // = dp_rank * tp + tp_rank
  const int expert_dp = tp * dp / ep;

  ProcessGrid g;
  g.sizes_ = sizes;
  g.device_ = device;
  const double timeout = collective_timeout_s;
  if (mpi.world_size() == 1) {
    g.world_ = std::make_shared<SelfComm>("world", w);
  } else {
    MPI_Comm world = MPI_COMM_NULL;
    MOE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &world));
    g.world_ = wrap(mpi, world, "world", timeout, device);
  }
  g.tp_ = make_group(mpi, "tp", tp, w / tp, tp_rank, timeout, device);
  g.dp_ = make_group(mpi, "dp", dp, pp_rank * tp + tp_rank, dp_rank, timeout, device);
  g.pp_ = make_group(mpi, "pp", sizes.pp, in_stage, pp_rank, timeout, device);
  g.stage_ = make_group(mpi, "stage", tp * dp, pp_rank, in_stage, timeout, device);
  g.ep_ = make_group(mpi, "ep", ep, pp_rank * expert_dp + in_stage / ep, in_stage % ep, timeout, device);
  g.expert_dp_ = make_group(mpi, "expert_dp", expert_dp, pp_rank * ep + in_stage % ep, in_stage / ep, timeout, device);
  // The first and last stage's ranks of one (dp, tp) position; a middle stage's rank is alone.
  const bool end_stage = pp_rank == 0 || pp_rank == sizes.pp - 1;
  if (sizes.pp == 1) {
    g.embed_ = std::make_shared<SelfComm>("embed", w);
  } else {
    MPI_Comm comm = MPI_COMM_NULL;
    MOE_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, end_stage ? in_stage : MPI_UNDEFINED, pp_rank, &comm));
    if (end_stage) {
      g.embed_ = wrap(mpi, comm, "embed", timeout, device);
    } else {
      g.embed_ = std::make_shared<SelfComm>("embed", w);
    }
  }
  return g;
}

ProcessGrid ProcessGrid::single(Device device) {
  ProcessGrid g;
  g.device_ = device;
  g.world_ = std::make_shared<SelfComm>("world", 0);
  g.tp_ = std::make_shared<SelfComm>("tp", 0);
  g.dp_ = std::make_shared<SelfComm>("dp", 0);
  g.pp_ = std::make_shared<SelfComm>("pp", 0);
  g.stage_ = std::make_shared<SelfComm>("stage", 0);
  g.ep_ = std::make_shared<SelfComm>("ep", 0);
  g.expert_dp_ = std::make_shared<SelfComm>("expert_dp", 0);
  g.embed_ = std::make_shared<SelfComm>("embed", 0);
  return g;
}

}  // namespace moeforge
