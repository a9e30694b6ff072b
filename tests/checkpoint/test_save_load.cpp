// Tests checkpoint/save.cpp and checkpoint/load.cpp on one process with the real trainer:
//  - exact resume: 10 straight steps against 5, save, a fresh trainer loading it, 5 more —
//    steps 6-10 have bitwise-identical losses and grad norms; the manifest records the state;
//  - an async save holds the same numbers as a synchronous one;
//  - keep_last, `latest`, stale temporary directories, and a save interrupted before its commit
//    leaving the previous checkpoint as `latest` and loadable;
//  - faults: a flipped byte names file and dataset, a missing shard, another model shape, a
//    tensor the model lacks and a wrong dtype each give their message.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "checkpoint/files.h"
#include "checkpoint/load.h"
#include "checkpoint/save.h"
#include "launch/trainer.h"
#include "runtime/ops.h"
#include "tests/checkpoint/checkpoint_testing.h"
#include "tests/data/temp_dir.h"

namespace moeforge::checkpoint {
namespace {

namespace fs = std::filesystem;

RunState state_of(Trainer& t, const config::RunConfig& run) {
  return {.step = t.steps_done(), .data_position = t.data_position(), .config = run};
}

SaveOutcome save_now(Saver& saver, Trainer& t, const config::RunConfig& run) {
  std::optional<SaveOutcome> out = saver.save(state_of(t, run), t.model().registry(), t.optimizer());
  if (!out) out = saver.finish();
  EXPECT_TRUE(out.has_value());
  EXPECT_TRUE(out->ok) << out->error;
  return *out;
}

class SaveLoad : public ::testing::Test {
 protected:
  void SetUp() override { testing::prepare_corpus(dir_.str()); }
  config::RunConfig run(const std::vector<std::string>& extra = {}) { return testing::tiny_run(dir_.str(), extra); }
  std::string ckpt() const { return dir_ / "ckpt"; }

  testing::TempDir dir_;
};

// bf16 mixed precision: the checkpoint holds the f32 masters and moments; the bf16 compute
// copies are rebuilt from them after the load, so the resumed run is bitwise the straight one.
TEST_F(SaveLoad, ExactResumeIsBitwiseInBf16) {
  const config::RunConfig cfg = run({"train.precision=BF16"});
  Trainer straight(cfg, ProcessGrid::single());
  ASSERT_EQ(straight.model().compute_dtype(), DType::kBF16);
  std::vector<StepMetrics> want;
  for (int s = 0; s < 6; ++s) want.push_back(straight.step());
  {
    Trainer first(cfg, ProcessGrid::single());
    for (int s = 0; s < 3; ++s) first.step();
    Saver saver(ckpt(), 3, /*async=*/false, ProcessGrid::single());
    save_now(saver, first, cfg);
  }
  Trainer resumed(cfg, ProcessGrid::single());
  const LoadedState s = load(resolve_checkpoint(ckpt()), resumed.model().registry(), &resumed.optimizer());
  resumed.model().registry().refresh_compute();
  resumed.restore_position(s.manifest.step());
  for (int i = 3; i < 6; ++i) {
    const StepMetrics m = resumed.step();
    EXPECT_EQ(m.loss.loss, want[i].loss.loss) << "step " << i + 1;
    EXPECT_EQ(m.grad_norm, want[i].grad_norm) << "step " << i + 1;
  }
  for (const TensorEntry& t : s.manifest.tensors()) EXPECT_EQ(t.dtype(), "f32") << t.name();
}

TEST_F(SaveLoad, ExactResumeIsBitwise) {
  const config::RunConfig cfg = run();
  Trainer straight(cfg, ProcessGrid::single());
  std::vector<StepMetrics> want;
  for (int s = 0; s < 10; ++s) want.push_back(straight.step());

  {
    Trainer first(cfg, ProcessGrid::single());
    for (int s = 0; s < 5; ++s) first.step();
    Saver saver(ckpt(), 3, /*async=*/false, ProcessGrid::single());
    const SaveOutcome out = save_now(saver, first, cfg);
    EXPECT_EQ(out.path, ckpt() + "/step_00000005");
  }
  Trainer resumed(cfg, ProcessGrid::single());
  const LoadedState s = load(resolve_checkpoint(ckpt()), resumed.model().registry(), &resumed.optimizer());
  resumed.restore_position(s.manifest.step());
  for (int i = 5; i < 10; ++i) {
    const StepMetrics m = resumed.step();
    EXPECT_EQ(m.loss.loss, want[i].loss.loss) << "step " << i + 1;
    EXPECT_EQ(m.grad_norm, want[i].grad_norm) << "step " << i + 1;
  }
  const Manifest& mf = s.manifest;
  EXPECT_EQ(mf.step(), 5);
  EXPECT_EQ(mf.data_position(), 40u);
  EXPECT_EQ(mf.optimizer_steps(), 5);
  EXPECT_EQ(mf.rng_seed(), cfg.train().seed());
  EXPECT_EQ(mf.layout().world_size(), 1);
  EXPECT_EQ(mf.config().model().dim(), 64);
  ASSERT_EQ(mf.files_size(), 1);
  EXPECT_EQ(mf.files(0).name(), "rank_00000.h5");
  EXPECT_EQ(mf.files(0).sha256(), digest_file(ckpt() + "/step_00000005/rank_00000.h5").sha256);
  // Every parameter and, for trainable ones, both moments; vocabulary rows without padding.
  int params = 0, moments = 0;
  for (const TensorEntry& t : mf.tensors()) {
    (t.kind() == PARAM ? params : moments) += 1;
    if (t.name() == "embed.weight") {
      EXPECT_EQ(t.shape(0), 259);
    }
  }
  int trainable = 0;
  for (const Param& p : resumed.model().registry().params()) trainable += p.spec.trainable;
  EXPECT_EQ(params, static_cast<int>(resumed.model().registry().params().size()));
  EXPECT_EQ(moments, 2 * trainable);
  EXPECT_TRUE(verify(s.path).empty());
}

TEST_F(SaveLoad, AsyncSaveHoldsTheSameNumbers) {
  const config::RunConfig cfg = run();
  Trainer t(cfg, ProcessGrid::single());
  for (int s = 0; s < 3; ++s) t.step();
  Saver sync(ckpt() + "_sync", 3, false, ProcessGrid::single());
  save_now(sync, t, cfg);
  Saver async(ckpt(), 3, true, ProcessGrid::single());
  EXPECT_FALSE(async.save(state_of(t, cfg), t.model().registry(), t.optimizer()).has_value());
  EXPECT_TRUE(async.pending());
  // Training goes on while the background write runs; the commit comes at a later poll/finish.
  t.step();
  std::optional<SaveOutcome> out = async.poll();
  if (!out) out = async.finish();
  ASSERT_TRUE(out && out->ok) << (out ? out->error : "none");
  EXPECT_EQ(out->step, 3);
  Trainer a(cfg, ProcessGrid::single()), b(cfg, ProcessGrid::single());
  load(ckpt() + "_sync/step_00000003", a.model().registry(), &a.optimizer());
  load(ckpt() + "/step_00000003", b.model().registry(), &b.optimizer());
  for (const Param& p : a.model().registry().params()) {
    EXPECT_EQ(p.value.to_floats(), b.model().registry().get(p.spec.name).value.to_floats()) << p.spec.name;
    if (p.spec.trainable) {
      EXPECT_EQ(a.optimizer().adamw().exp_avg_sq(p.spec.name).to_floats(),
                b.optimizer().adamw().exp_avg_sq(p.spec.name).to_floats())
          << p.spec.name;
    }
  }
}

TEST_F(SaveLoad, KeepLastLatestAndInterruptedSave) {
  const config::RunConfig cfg = run();
  Trainer t(cfg, ProcessGrid::single());
  Saver saver(ckpt(), 2, false, ProcessGrid::single());
  fs::create_directories(ckpt() + "/.tmp_step_00000009");  // left by a crashed save
  for (int s = 0; s < 4; ++s) {
    t.step();
    save_now(saver, t, cfg);
  }
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(ckpt())) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"latest", "step_00000003", "step_00000004"}));
  EXPECT_EQ(testing::read_file(ckpt() + "/latest"), "step_00000004\n");
  // A save killed before its commit leaves only its temporary directory: `latest` still names
  // step 4, which loads.
  fs::create_directories(ckpt() + "/.tmp_step_00000005");
  fs::copy_file(ckpt() + "/step_00000004/rank_00000.h5", ckpt() + "/.tmp_step_00000005/rank_00000.h5");
  EXPECT_EQ(resolve_checkpoint(ckpt()), ckpt() + "/step_00000004");
  Trainer u(cfg, ProcessGrid::single());
  EXPECT_EQ(load(resolve_checkpoint(ckpt()), u.model().registry(), &u.optimizer()).manifest.step(), 4);
  EXPECT_EQ(testing::error_of([&] { resolve_checkpoint(dir_ / "nowhere"); }),
            dir_ / "nowhere" + ": no such checkpoint (expected a step directory or a checkpoint directory with 'latest')");
}

TEST_F(SaveLoad, FaultsGiveClearErrors) {
  const config::RunConfig cfg = run();
  Trainer t(cfg, ProcessGrid::single());
  t.step();
  Saver saver(ckpt(), 3, false, ProcessGrid::single());
  const std::string step = save_now(saver, t, cfg).path;
  const std::string shard = step + "/rank_00000.h5";

  // Another model shape: dim 32 against the stored 64.
  {
    Trainer other(run({"model.dim=32", "model.head_dim=8"}), ProcessGrid::single());
    EXPECT_EQ(testing::error_of([&] { load(step, other.model().registry(), &other.optimizer()); }),
              "checkpoint " + step +
                  ": parameter embed.weight has global shape (259, 64) in the checkpoint, the model has (259, 32) "
                  "(another model shape?)");
  }
  // A tensor the model does not have: a one-layer model.
  {
    Trainer other(run({"model.n_layers=1"}), ProcessGrid::single());
    EXPECT_NE(testing::error_of([&] { load(step, other.model().registry(), &other.optimizer()); })
                  .find(": tensor layers.1."),
              std::string::npos);
  }
  // Wrong dtype in the index.
  {
    const std::string copy = dir_ / "dtype";
    fs::copy(step, copy);
    Manifest m = read_manifest(copy);
    m.mutable_tensors(0)->set_dtype("bf16");
    std::ofstream(copy + "/manifest.pb", std::ios::binary) << m.SerializeAsString();
    Trainer u(cfg, ProcessGrid::single());
    EXPECT_EQ(testing::error_of([&] { load(copy, u.model().registry(), &u.optimizer()); }),
              "checkpoint " + copy + ": parameter " + m.tensors(0).name() + " is stored as bf16, expected f32");
  }
  // A flipped byte inside the data of embed.weight.
  {
    const std::vector<float> embed = t.model().registry().get("embed.weight").value.to_floats();
    std::string bytes = testing::read_file(shard);
    const size_t at = bytes.find(std::string(reinterpret_cast<const char*>(embed.data() + 1000), 32));
    ASSERT_NE(at, std::string::npos);
    bytes[at + 7] = static_cast<char>(bytes[at + 7] ^ 0x01);
    testing::write_file(shard, bytes);
    Trainer u(cfg, ProcessGrid::single());
    // The chunk's Fletcher-32 fails its read.
    std::string msg = testing::error_of([&] { load(step, u.model().registry(), &u.optimizer()); });
    EXPECT_NE(msg.find(shard + ": dataset param/embed.weight: the chunk at (0, 0) fails its Fletcher-32 checksum"),
              std::string::npos)
        << msg;
    // With the SHA-256 check on, the file is reported as corrupt, naming the damaged dataset.
    msg = testing::error_of([&] { load(step, u.model().registry(), &u.optimizer(), nullptr, /*verify_sha256=*/true); });
    EXPECT_NE(msg.find("shard file rank_00000.h5 is corrupt"), std::string::npos) << msg;
    EXPECT_NE(msg.find("dataset param/embed.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("checksum"), std::string::npos) << msg;
    const std::vector<std::string> problems = verify(step);
    ASSERT_EQ(problems.size(), 2u);  // the digest and the dataset
    EXPECT_NE(problems[1].find("dataset param/embed.weight"), std::string::npos) << problems[1];
  }
  // A missing shard.
  {
    fs::remove(shard);
    Trainer u(cfg, ProcessGrid::single());
    EXPECT_EQ(testing::error_of([&] { load(step, u.model().registry(), &u.optimizer()); }),
              "checkpoint " + step + ": shard file rank_00000.h5 is missing");
  }
}


// Every byte a load reads is covered by a checksum (Fletcher-32 on the chunks, HDF5's own on the
// superblock, object headers and chunk indexes): a flipped byte anywhere in a shard either fails
// the load with an error naming the file, or lies in bytes the load never uses, and then the
// loaded parameters and moments are bitwise the saved ones. Checked for every byte of the first
// 4 KiB (superblock, root group, the first object headers) and 400 bytes spread over the file.
TEST_F(SaveLoad, EveryFlippedByteFailsTheLoadOrIsUnused) {
  const config::RunConfig cfg = run();
  Trainer t(cfg, ProcessGrid::single());
  t.step();
  Saver saver(ckpt(), 3, false, ProcessGrid::single());
  const std::string step = save_now(saver, t, cfg).path;
  const std::string shard = step + "/rank_00000.h5";
  const std::string original = testing::read_file(shard);

  Trainer u(cfg, ProcessGrid::single());
  const auto state = [&] {
    std::vector<float> all;
    for (const Param& p : u.model().registry().params()) {
      for (const float x : p.value.to_floats()) all.push_back(x);
      if (!p.spec.trainable) continue;
      for (const float x : u.optimizer().adamw().exp_avg(p.spec.name).to_floats()) all.push_back(x);
      for (const float x : u.optimizer().adamw().exp_avg_sq(p.spec.name).to_floats()) all.push_back(x);
    }
    return all;
  };
  load(step, u.model().registry(), &u.optimizer());
  const std::vector<float> want = state();

  std::vector<size_t> positions;
  for (size_t i = 0; i < std::min<size_t>(4096, original.size()); ++i) positions.push_back(i);
  for (size_t k = 0; k < 400; ++k) positions.push_back(4096 + k * (original.size() - 4096) / 400);
  int failed = 0, unused = 0;
  for (const size_t at : positions) {
    std::string bytes = original;
    bytes[at] = static_cast<char>(bytes[at] ^ 0x20);
    testing::write_file(shard, bytes);
    // Poison the state so that a load that silently skipped something would show.
    for (const Param& p : u.model().registry().params()) ops::fill(p.value, -99.0f);
    std::string msg;
    try {
      load(step, u.model().registry(), &u.optimizer());
    } catch (const Error& e) {
      msg = e.what();
    }
    if (!msg.empty()) {
      ++failed;
      EXPECT_NE(msg.find("rank_00000.h5"), std::string::npos) << "byte " << at << ": " << msg;
    } else {
      ++unused;
      ASSERT_TRUE(state() == want) << "byte " << at << " flipped: the load succeeded with different values";
    }
  }
  testing::write_file(shard, original);
  EXPECT_GT(failed, 0);
  RecordProperty("failed_loads", failed);
  RecordProperty("unused_bytes", unused);
}

}  // namespace
}  // namespace moeforge::checkpoint
