// The real model on two GPUs over NCCL (mpirun -np 2): data parallelism dp 2 with expert
// parallelism ep 2 and ZeRO-1, every group an NcclComm, against one CPU rank training the same
// global batch. Each rank trains its micro-batch on its GPU (world rank % GPUs); the reference,
// computed on every rank, runs both micro-batches on the CPU with loss scale 1/2 (the DP mean).
// Three steps: each rank's losses match the reference's forward of the same micro-batch, the
// grad norms match, and after the last step every parameter shard matches the reference's
// parameter (1e-5, normwise). Skips, visibly, on every rank unless two GPUs are visible.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "models/transformer.h"
#include "optim/distributed_optimizer.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/parallel/mpi/mpi_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;

constexpr int64_t kBatch = 2, kSeq = 16;

ModelConfig config() {
  ModelConfig c;
  c.vocab_size = 61;
  c.dim = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.n_experts = 4;  // 2 per EP rank
  c.top_k = 2;
  c.expert_hidden = 24;
  c.aux_loss_coef = 0.01f;
  c.z_loss_coef = 0.001f;
  c.init_std = 0.2f;  // well-separated router scores: both devices route alike
  return c;
}

double rel(double got, double want) { return std::abs(got - want) / std::max(std::abs(want), 1e-30); }

Tensor batch(int step, int rank, uint64_t salt) {
  return testing::random_ints({kBatch, kSeq}, 5000 + 100 * static_cast<uint64_t>(step) + 10 * rank + salt, 0, 61);
}

TEST(GpuModelStepNccl, Dp2Ep2Zero1MatchesOneCpuRank) {
  const MpiRuntime& mpi = testing::mpi();
  ASSERT_EQ(mpi.world_size(), 2) << "run with mpirun -np 2";
  if (cuda::device_count() < 2)
    GTEST_SKIP() << "fewer than 2 CUDA devices visible: this gpu-labelled test trains over NCCL on two GPUs and "
                    "runs only where they are present (scripts/gpu-check.sh)";
  const Device dev = Device::cuda(mpi.world_rank() % cuda::device_count());
  const ProcessGrid grid =
      ProcessGrid::create(mpi, ParallelSizes{.tp = 1, .pp = 1, .dp = 2, .ep = 2}, testing::kTestTimeoutS, dev);
  const ModelConfig cfg = config();
  MoeTransformer model(cfg, grid);
  DistributedOptimizer opt(model.registry(), grid, AdamWOptions{}, /*zero_stage=*/1);
  MoeTransformer ref(cfg);
  DistributedOptimizer ref_opt(ref.registry(), ProcessGrid::single(), AdamWOptions{}, /*zero_stage=*/0);
  model.registry().init(3);
  ref.registry().init(3);
  const int me = grid.world_rank();

  for (int step = 1; step <= 3; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    model.registry().zero_grad();
    const LossReport mine = model.forward(batch(step, me, 0), batch(step, me, 1));
    model.backward(1.0f);
    opt.reduce_gradients();
    const double norm = opt.clip_grad_norm(1.0);
    opt.step(1e-3f);

    ref.registry().zero_grad();
    LossReport want;
    for (int r = 0; r < 2; ++r) {
      const LossReport l = ref.forward(batch(step, r, 0), batch(step, r, 1));
      ref.backward(0.5f);
      if (r == me) want = l;
    }
    ref_opt.reduce_gradients();
    const double want_norm = ref_opt.clip_grad_norm(1.0);
    ref_opt.step(1e-3f);

    EXPECT_LE(rel(mine.loss, want.loss), 1e-5) << "loss " << mine.loss << " vs " << want.loss;
    EXPECT_LE(rel(mine.aux, want.aux), 1e-5) << "aux " << mine.aux << " vs " << want.aux;
    EXPECT_LE(rel(norm, want_norm), 1e-5) << "grad norm " << norm << " vs " << want_norm;
  }
  // Every local parameter is the block at its slice of the reference's (experts split over EP).
  for (const Param& p : model.registry().params()) {
    ASSERT_TRUE(p.value.device().is_cuda()) << p.spec.name;
    const Tensor& full = ref.registry().get(p.spec.name).value;
    Tensor want = full;
    if (p.spec.shard_dim == 0) want = full.rows(p.slice.offset[0], p.slice.offset[0] + p.value.dim(0));
    ASSERT_EQ(want.shape(), p.value.shape()) << p.spec.name << " is split along a dimension this test cannot slice";
    EXPECT_GPU_CLOSE(p.value, want, kF32Tol) << " parameter " << p.spec.name << " on rank " << me;
  }
}

}  // namespace
}  // namespace moeforge
