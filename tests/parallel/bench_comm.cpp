// All-reduce bus bandwidth of MpiComm::all_reduce against raw MPI_Allreduce on the same
// communicator, f32 sum in place, 1 KiB .. 64 MiB in powers of 4 (scripts/bench-comm.sh runs it
// on 2 ranks). A benchmark, not a test: nothing is asserted.
//
// Bus bandwidth = 2 (n - 1) / n * bytes / time (the NCCL-tests convention: what each link carries
// in a bandwidth-optimal all-reduce). The two sides alternate call by call (raw, Comm, Comm, raw,
// ...) after a warm-up, and each side's time is the median of its calls (the slowest rank's), so
// load from other processes on the machine falls on both sides alike instead of on whichever ran
// during a busy moment.
//
//   mpirun -np 2 bench_comm [min_pairs]    (min_pairs: at least this many calls per side, default 30)
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "parallel/mpi_comm.h"
#include "parallel/mpi_runtime.h"

using namespace moeforge;

namespace {

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  MpiRuntime mpi;
  try {
    const int min_pairs = argc > 1 ? std::stoi(argv[1]) : 30;
    MPI_Comm dup = MPI_COMM_NULL;
    MOE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
    MpiComm comm(dup, "world", mpi.watchdog(), 300.0);
    const int n = comm.size();
    if (mpi.world_rank() == 0) {
      std::printf(
          "all_reduce f32 sum, %d ranks, median per call over alternating calls; busbw = 2(n-1)/n * bytes / time\n", n);
      std::printf("%10s %7s  %12s %10s  %12s %10s  %9s\n", "bytes", "calls", "raw us", "raw GB/s", "Comm us",
                  "Comm GB/s", "overhead");
    }
    for (int64_t bytes = 1024; bytes <= (int64_t{64} << 20); bytes *= 4) {
      const int64_t count = bytes / 4;
      Tensor t = Tensor::zeros({count}, DType::kF32);
      float* p = t.data<float>();
      // About 0.4 GB through each side per size, within [min_pairs, 4000] calls.
      const int pairs = static_cast<int>(std::clamp<int64_t>(400'000'000 / bytes, min_pairs, 4000));
      auto raw = [&] {
        MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, p, static_cast<int>(count), MPI_FLOAT, MPI_SUM, dup));
      };
      auto wrapped = [&] { comm.all_reduce(t); };
      for (int i = 0; i < 3; ++i) {
        raw();
        wrapped();
      }
      std::vector<double> raw_s(pairs), comm_s(pairs);
      MOE_MPI_CHECK(MPI_Barrier(dup));
      for (int i = 0; i < pairs; ++i) {
        // Alternate which side goes first, so neither always follows the other.
        const double t0 = MPI_Wtime();
        i % 2 ? wrapped() : raw();
        const double t1 = MPI_Wtime();
        i % 2 ? raw() : wrapped();
        const double t2 = MPI_Wtime();
        (i % 2 ? comm_s : raw_s)[i] = t1 - t0;
        (i % 2 ? raw_s : comm_s)[i] = t2 - t1;
      }
      double med[2] = {median(raw_s), median(comm_s)};
      MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, med, 2, MPI_DOUBLE, MPI_MAX, dup));
      const double bus = 2.0 * (n - 1) / n * static_cast<double>(bytes);
      if (mpi.world_rank() == 0) {
        std::printf("%10lld %7d  %12.1f %10.3f  %12.1f %10.3f  %+8.1f%%\n", static_cast<long long>(bytes), pairs,
                    med[0] * 1e6, bus / med[0] / 1e9, med[1] * 1e6, bus / med[1] / 1e9, (med[1] / med[0] - 1) * 100);
        std::fflush(stdout);
      }
    }
  } catch (const Error& e) {
    mpi.abort(1, e.what());
  }
  return 0;
}
