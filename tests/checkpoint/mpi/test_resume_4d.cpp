// Exact resume on the full 4-D layout (mpirun -np 8): tp=2 x pp=2 x dp=2 with ep=2 and ZeRO-1.
// 10 straight steps against 5 steps, a save, a new trainer loading it, 5 more: steps 6-10 have
// bitwise-identical losses and grad norms. The checkpoint is checked too: each pipeline stage
// writes its own layers (dp rank 0 of each stage: world ranks 0, 1, 4, 5), and the manifest holds
// every tensor of the whole model, each tiled exactly by its pieces, every file sound.
#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include "checkpoint/files.h"
#include "checkpoint/load.h"
#include "checkpoint/save.h"
#include "launch/trainer.h"
#include "tests/checkpoint/checkpoint_testing.h"
#include "tests/parallel/mpi/mpi_testing.h"

namespace moeforge::checkpoint {
namespace {

namespace fs = std::filesystem;

TEST(Resume4d, Tp2Pp2Dp2Ep2Zero1IsBitwise) {
  const ProcessGrid grid = ProcessGrid::create(testing::mpi(), ParallelSizes{.tp = 2, .pp = 2, .dp = 2, .ep = 2},
                                               testing::kTestTimeoutS);
  ASSERT_EQ(grid.world_size(), 8) << "run with mpirun -np 8";
  const std::string dir = (fs::temp_directory_path() / "moeforge_checkpoint_resume_4d").string();
  const std::string ckpt = dir + "/ckpt";
  if (grid.world_rank() == 0) {
    fs::remove_all(dir);
    testing::prepare_corpus(dir);
  }
  grid.world().barrier();
  const config::RunConfig cfg = testing::tiny_run(
      dir, {"parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=1"}, 8);

  std::vector<StepMetrics> want;
  {
    Trainer straight(cfg, grid);
    for (int s = 0; s < 10; ++s) want.push_back(straight.step());
  }
  {
    Trainer first(cfg, grid);
    for (int s = 0; s < 5; ++s) first.step();
    Saver saver(ckpt, 3, /*async=*/false, grid);
    const std::optional<SaveOutcome> out = saver.save(
        {.step = 5, .data_position = first.data_position(), .config = cfg}, first.model().registry(), first.optimizer());
    ASSERT_TRUE(out && out->ok) << (out ? out->error : "no outcome");
  }
  if (grid.world_rank() == 0) {
    const std::string step = ckpt + "/step_00000005";
    const Manifest m = read_manifest(step);
    EXPECT_EQ(m.layout().pp(), 2);
    std::set<std::string> files;
    for (const File& f : m.files()) files.insert(f.name());
    EXPECT_EQ(files, (std::set<std::string>{"rank_00000.h5", "rank_00001.h5", "rank_00004.h5", "rank_00005.h5"}));
    // Stage 0 (world ranks 0-3) holds layer 0 and the embedding, stage 1 (4-7) layer 1 and the head.
    for (const TensorEntry& t : m.tensors()) {
      const bool stage0 = t.name() == "embed.weight" || t.name().starts_with("layers.0.");
      for (const Piece& p : t.pieces()) {
        EXPECT_TRUE(stage0 ? p.file() <= "rank_00001.h5" : p.file() >= "rank_00004.h5")
            << t.name() << " in " << p.file();
      }
    }
    // Every tensor of the whole model (the single-rank registry), with both moments when trainable.
    Trainer whole(testing::tiny_run(dir), ProcessGrid::single());
    std::set<std::pair<std::string, int>> want_tensors, have;
    for (const Param& p : whole.model().registry().params()) {
      want_tensors.insert({p.spec.name, PARAM});
      if (!p.spec.trainable) continue;
      want_tensors.insert({p.spec.name, EXP_AVG});
      want_tensors.insert({p.spec.name, EXP_AVG_SQ});
    }
    for (const TensorEntry& t : m.tensors()) have.insert({t.name(), static_cast<int>(t.kind())});
    EXPECT_EQ(have, want_tensors);
    const std::vector<std::string> problems = verify(step);
    EXPECT_TRUE(problems.empty()) << problems.front();
  }

  Trainer resumed(cfg, grid);
  const LoadedState s = load(resolve_checkpoint(ckpt), resumed.model().registry(), &resumed.optimizer(), &grid.pp());
  resumed.restore_position(s.manifest.step());
  for (int i = 5; i < 10; ++i) {
    const StepMetrics m = resumed.step();
    EXPECT_EQ(m.loss.loss, want[i].loss.loss) << "step " << i + 1;
    EXPECT_EQ(m.grad_norm, want[i].grad_norm) << "step " << i + 1;
  }
  grid.world().barrier();
  if (grid.world_rank() == 0) fs::remove_all(dir);
}

}  // namespace
}  // namespace moeforge::checkpoint
