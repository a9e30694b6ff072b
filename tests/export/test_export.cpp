// Tests checkpoint/hf_export.cpp, gguf_export.cpp and hf_import.cpp end to end on a trained
// checkpoint, against independent readers (tests/export/hf_check.py, gguf_check.py):
//  - HF f32, sharded: safetensors' safe_open reads every tensor bit-exactly; a PyTorch Mixtral
//    forward built only from the exported folder reproduces moeforge's logits to 1e-4; the
//    `tokenizers` library encodes a UTF-8 text to moeforge's ids;
//  - HF bf16: bit-exact against torch's rounding of the checkpoint's values;
//  - round trip: export -> import -> export is byte-identical (weights, index, config, tokenizer);
//  - GGUF f32/f16/bf16/q8_0/q4_0: gguf-py's GGUFReader reads the metadata and every tensor, exact
//    or within the block quantisation bound; our own reader agrees;
//  - import -> one training step on a 4-rank layout (tp 2 x dp 2, ep 2) through `moeforge train`;
//  - `moeforge generate` is reproducible, `moeforge eval` gives the same loss on 1 and 4 ranks;
//  - models Mixtral / GGUF llama cannot express are refused with the reason.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>

#include "checkpoint/files.h"
#include "checkpoint/gguf.h"
#include "checkpoint/hf_export.h"
#include "checkpoint/hf_import.h"
#include "checkpoint/load.h"
#include "checkpoint/mixtral_layout.h"
#include "checkpoint/tensor_reader.h"
#include "data/byte_tokenizer.h"
#include "launch/config.h"
#include "models/transformer.h"
#include "tests/data/temp_dir.h"
#include "tests/export/export_testing.h"

namespace moeforge::checkpoint {
namespace {

namespace fs = std::filesystem;
using testing::run_command;

class Export : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new std::string(fs::temp_directory_path() / ("moeforge_export_" + std::to_string(::getpid())));
    fs::remove_all(*root_);
    step_ = new std::string(testing::train_checkpoint(*root_));
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
    delete step_;
  }
  void SetUp() override {
    ASSERT_TRUE(fs::exists(*step_ + "/manifest.pb")) << "training the test checkpoint failed";
    python_ = testing::python_interpreter();
    if (!fs::exists(python_)) {
      GTEST_SKIP() << "no Python interpreter at " << python_
                   << " (scripts/test.sh creates <build>/pyenv with safetensors, gguf, tokenizers; or set MOEFORGE_PYTHON)";
    }
  }

  static ReleaseInfo info() {
    const Manifest m = read_manifest(*step_);
    ReleaseInfo r;
    r.model = model_config_from(m.config());
    r.max_seq_len = m.config().model().max_seq_len();
    r.license = "Apache-2.0";
    r.steps = m.step();
    return r;
  }
  std::string run_python(const std::string& script, const std::string& args) {
    const std::string cmd = fmt::format("'{}' '{}' {} 2>&1", python_, testing::source_path("tests/export/" + script), args);
    const testing::CommandResult r = run_command(cmd);
    EXPECT_EQ(r.exit_code, 0) << cmd << "\n" << r.output;
    std::printf("%s", r.output.c_str());
    return r.output;
  }

  static std::string* root_;
  static std::string* step_;
  std::string python_;
  testing::TempDir dir_;
};

std::string* Export::root_ = nullptr;
std::string* Export::step_ = nullptr;

// Every exported tensor's values from the checkpoint, as <hf name>.npy.
void write_reference(const std::string& step, const ModelConfig& cfg, const std::string& dir) {
  fs::create_directories(dir);
  CheckpointReader reader(step);
  for (const HfTensor& t : mixtral_tensors(cfg)) {
    const std::vector<float> v =
        t.expert < 0 ? reader.read(t.param) : reader.read(t.param, Box{{t.expert, 0, 0}, {1, t.shape[0], t.shape[1]}});
    testing::write_npy(dir + "/" + t.hf_name + ".npy", Tensor::from_floats(Shape(std::span(t.shape)), v));
  }
}

TEST_F(Export, HfF32ReadBySafetensorsTorchAndTokenizers) {
  const ReleaseInfo r = info();
  // Through the CLI, which gathers the model card's facts from the run (data manifest, metrics).
  const testing::CommandResult ex = run_command(
      fmt::format("'{}' export '{}' --format hf --out '{}' --dtype f32 --max-shard-size 100KB --license Apache-2.0 2>&1",
                  testing::moeforge_bin(), *root_ + "/ckpt", dir_ / "hf"));
  ASSERT_EQ(ex.exit_code, 0) << ex.output;
  EXPECT_TRUE(fs::exists(dir_ / "hf/model.safetensors.index.json"));
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir_ / "hf")) files.push_back(e.path().filename().string());
  int shards = 0;
  for (const std::string& f : files) shards += f.ends_with(".safetensors") ? 1 : 0;
  EXPECT_GE(shards, 3) << "shards of <= 100 kB";
  EXPECT_TRUE(fs::exists(dir_ / fmt::format("hf/model-00001-of-{:05}.safetensors", shards)));
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "README.md", "SHA256SUMS"})
    EXPECT_TRUE(fs::exists(dir_ / ("hf/" + std::string(f)))) << f;
  const std::string card = testing::read_file(dir_ / "hf/README.md");
  for (const char* fact : {"## Weights", "## Architecture and code", "## Training data", "## License",
                           "## Provenance", "`Apache-2.0` (an OSI-approved", "\"sha256\"", "after 4 optimizer steps",
                           "\"val/loss\"", "1 rank(s): tp 1 x pp 1 x dp 1"})
    EXPECT_NE(card.find(fact), std::string::npos) << fact;
  // sha256sum's format: every other file, with its digest.
  const std::string sums = testing::read_file(dir_ / "hf/SHA256SUMS");
  EXPECT_EQ(static_cast<size_t>(std::count(sums.begin(), sums.end(), '\n')), files.size() - 1);

  write_reference(*step_, r.model, dir_ / "ref");
  MoeTransformer model(r.model);
  load(*step_, model.registry(), nullptr);
  const std::string text = "The king speaks: \"caf\xc3\xa9, na\xc3\xafve \xe2\x80\x94 \xf0\x9f\x91\x91\"\n\tend.";
  std::vector<int32_t> ids{data::kBos};
  for (const int32_t id : data::encode(text)) ids.push_back(id);
  const Tensor tokens = Tensor::from_ints({1, static_cast<int64_t>(ids.size())}, ids);
  testing::write_npy(dir_ / "tokens.npy", tokens);
  testing::write_npy(dir_ / "logits.npy", model.logits(tokens));
  testing::write_file(dir_ / "text.txt", text);
  const std::vector<int32_t> text_ids = data::encode(text);
  testing::write_npy(dir_ / "ids.npy", Tensor::from_ints({static_cast<int64_t>(text_ids.size())}, text_ids));
  const std::string out = run_python(
      "hf_check.py", fmt::format("--hf '{}' --ref '{}' --tokens '{}' --logits '{}' --text '{}' --ids '{}'", dir_ / "hf",
                                 dir_ / "ref", dir_ / "tokens.npy", dir_ / "logits.npy", dir_ / "text.txt",
                                 dir_ / "ids.npy"));
  EXPECT_NE(out.find("hf_check: OK"), std::string::npos);
  EXPECT_NE(out.find("bit-exact"), std::string::npos);
}

TEST_F(Export, HfBf16IsTorchRoundingOfTheCheckpoint) {
  const ReleaseInfo r = info();
  export_hf(*step_, r, {.out_dir = dir_ / "hf", .dtype = "bf16"});
  EXPECT_TRUE(fs::exists(dir_ / "hf/model.safetensors"));
  EXPECT_FALSE(fs::exists(dir_ / "hf/model.safetensors.index.json")) << "one shard: no index, as transformers writes";
  EXPECT_NE(testing::read_file(dir_ / "hf/config.json").find("\"torch_dtype\": \"bfloat16\""), std::string::npos);
  write_reference(*step_, r.model, dir_ / "ref");
  const std::string out = run_python("hf_check.py", fmt::format("--hf '{}' --ref '{}'", dir_ / "hf", dir_ / "ref"));
  EXPECT_NE(out.find("bit-exact"), std::string::npos);
}

TEST_F(Export, RoundTripIsByteIdentical) {
  const ReleaseInfo r = info();
  export_hf(*step_, r, {.out_dir = dir_ / "a", .dtype = "f32", .max_shard_bytes = 200'000});
  const ImportResult imp = import_hf(dir_ / "a", dir_ / "ckpt", config::RunConfig());
  EXPECT_EQ(imp.step_dir, dir_ / "ckpt/step_00000000");
  EXPECT_EQ(resolve_checkpoint(dir_ / "ckpt"), imp.step_dir);
  EXPECT_TRUE(verify(imp.step_dir).empty());
  ReleaseInfo r2 = r;
  r2.model = model_config_from(read_manifest(imp.step_dir).config());
  EXPECT_EQ(r2.model.aux_loss_coef, r.model.aux_loss_coef) << "router_aux_loss_coef must convert back exactly";
  EXPECT_EQ(r2.model.norm_eps, r.model.norm_eps);
  export_hf(imp.step_dir, r2, {.out_dir = dir_ / "b", .dtype = "f32", .max_shard_bytes = 200'000});
  int compared = 0;
  for (const auto& e : fs::directory_iterator(dir_ / "a")) {
    const std::string name = e.path().filename().string();
    if (name == "README.md" || name == "SHA256SUMS") continue;  // provenance differs: a new checkpoint
    EXPECT_EQ(testing::read_file(e.path().string()), testing::read_file(dir_ / ("b/" + name))) << name;
    ++compared;
  }
  EXPECT_GE(compared, 8);
}

TEST_F(Export, ImportRefusesBadFolders) {
  export_hf(*step_, info(), {.out_dir = dir_ / "hf", .dtype = "f16", .max_shard_bytes = 200'000});
  const auto import_error = [&] {
    return testing::error_of([&] { import_hf(dir_ / "hf", dir_ / "ck", config::RunConfig()); });
  };
  // A shard the index maps a tensor to, without that tensor.
  const std::string index = testing::read_file(dir_ / "hf/model.safetensors.index.json");
  std::string edited = std::regex_replace(index, std::regex("\"model.norm.weight\": \"[^\"]+\""),
                                          "\"model.norm.weight\": \"model-00001-of-00002.safetensors\"");
  ASSERT_NE(edited, index);
  testing::write_file(dir_ / "hf/model.safetensors.index.json", edited);
  EXPECT_NE(import_error().find("which the index maps to"), std::string::npos) << import_error();
  testing::write_file(dir_ / "hf/model.safetensors.index.json", index);
  // A config the weights do not match, and one moeforge cannot run.
  const std::string config = testing::read_file(dir_ / "hf/config.json");
  testing::write_file(dir_ / "hf/config.json", std::regex_replace(config, std::regex("\"intermediate_size\": 64"),
                                                                  "\"intermediate_size\": 32"));
  EXPECT_NE(import_error().find("block_sparse_moe.experts.0.w1.weight has shape (64, 64), config.json implies (32, 64)"),
            std::string::npos)
      << import_error();
  testing::write_file(dir_ / "hf/config.json", std::regex_replace(config, std::regex("\"sliding_window\": null"),
                                                                  "\"sliding_window\": -5"));
  EXPECT_NE(import_error().find("config.json 'sliding_window' must be a positive integer, got -5"),
            std::string::npos)
      << import_error();
  testing::write_file(dir_ / "hf/config.json", config);
  // A truncated shard: the strict reader names it.
  fs::resize_file(dir_ / "hf/model-00002-of-00002.safetensors", 1000);
  EXPECT_NE(import_error().find("model-00002-of-00002.safetensors: "), std::string::npos) << import_error();
  EXPECT_FALSE(fs::exists(dir_ / "ck/latest"));
}

TEST_F(Export, GgufEveryTypeReadByGgufPy) {
  const ReleaseInfo r = info();
  export_hf(*step_, r, {.out_dir = dir_ / "hf", .dtype = "f32"});
  for (const char* type : {"f32", "f16", "bf16", "q8_0", "q4_0"}) {
    const std::string path = dir_ / (std::string(type) + ".gguf");
    EXPECT_TRUE(export_gguf(*step_, r, {.out_path = path, .type = parse_ggml_type(type)}).empty());
    const GgufReader reader(path);
    EXPECT_EQ(reader.tensors().size(), 2u + 10u * static_cast<size_t>(r.model.n_layers) + 1u);
    EXPECT_EQ(reader.get("tokenizer.ggml.tokens").array.size(), 259u);
    const std::string out = run_python("gguf_check.py", fmt::format("--gguf '{}' --hf '{}' --type {}", path, dir_ / "hf", type));
    EXPECT_NE(out.find("gguf_check: OK"), std::string::npos) << type;
  }
}

TEST_F(Export, ImportThenTrainOnFourRanks) {
  export_hf(*step_, info(), {.out_dir = dir_ / "hf", .dtype = "bf16"});
  import_hf(dir_ / "hf", dir_ / "ckpt", config::RunConfig());
  std::vector<std::string> o = testing::tiny_overrides(*root_, testing::export_model_overrides());
  for (const char* x : {"train.steps=1", "optim.warmup_steps=0", "parallel.tp=2", "parallel.ep=2", "train.log_every=1"})
    o.push_back(x);
  const std::string cmd = fmt::format(
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 mpirun -np 4 --oversubscribe "
      "'{}' train --config '{}'{} --resume '{}' 2>&1",
      testing::moeforge_bin(), testing::source_path("configs/tiny.pbtxt"), testing::overrides_flags(o), dir_ / "ckpt");
  const testing::CommandResult res = run_command(cmd);
  ASSERT_EQ(res.exit_code, 0) << cmd << "\n" << res.output;
  EXPECT_NE(res.output.find("resumed from"), std::string::npos) << res.output;
  EXPECT_TRUE(std::regex_search(res.output, std::regex("step 1/1 \\| loss [0-9.]+"))) << res.output;
}

TEST_F(Export, GenerateIsReproducibleAndEvalIsLayoutFree) {
  const std::string gen = fmt::format("'{}' generate '{}' --prompt 'the king' --max-new-tokens 24 --seed 7 "
                                      "--temperature 0.9 --top-k 40 --top-p 0.95 2>&1",
                                      testing::moeforge_bin(), *step_);
  const testing::CommandResult a = run_command(gen), b = run_command(gen);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  EXPECT_EQ(a.output, b.output);
  EXPECT_TRUE(a.output.starts_with("the king")) << a.output;

  const std::string val = *root_ + "/data/val";
  const testing::CommandResult one =
      run_command(fmt::format("'{}' eval '{}' --data '{}' --seq-len 32 2>&1", testing::moeforge_bin(), *step_, val));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  const testing::CommandResult four = run_command(fmt::format(
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 mpirun -np 4 --oversubscribe "
      "'{}' eval '{}' --data '{}' --seq-len 32 --tp 2 --ep 2 2>&1",
      testing::moeforge_bin(), *step_, val));
  ASSERT_EQ(four.exit_code, 0) << four.output;
  const std::regex loss("loss ([0-9.]+) nats/token \\| perplexity ([0-9.]+)");
  std::smatch m1, m4;
  ASSERT_TRUE(std::regex_search(one.output, m1, loss)) << one.output;
  ASSERT_TRUE(std::regex_search(four.output, m4, loss)) << four.output;
  EXPECT_NEAR(std::stod(m1[1]), std::stod(m4[1]), 2e-4);
  EXPECT_NEAR(std::stod(m1[2]), std::exp(std::stod(m1[1])), 1e-2);
  EXPECT_GT(std::stod(m1[1]), 0.5);
  EXPECT_LT(std::stod(m1[1]), std::log(259.0));  // trained: better than uniform
}

TEST(ExportRefusal, WhatMixtralCannotExpress) {
  ModelConfig c;
  c.gating = ops::Gating::kSigmoidTopK;
  EXPECT_EQ(testing::error_of([&] { check_mixtral_expressible(c, "GGUF llama"); }),
            "cannot export to GGUF llama: the model uses sigmoid_topk gating; Mixtral's router is a softmax over all "
            "experts, top-k, renormalised, and another gating would change the model's outputs");
  c = ModelConfig{};
  c.n_shared_experts = 1;
  EXPECT_NE(testing::error_of([&] { check_mixtral_expressible(c, "HF Mixtral"); }).find("shared (always-on) expert"),
            std::string::npos);
  c = ModelConfig{};
  c.expert_bias_update_rate = 1e-3f;
  EXPECT_NE(testing::error_of([&] { check_mixtral_expressible(c, "HF Mixtral"); }).find("aux-loss-free balancing bias"),
            std::string::npos);
  c = ModelConfig{};
  c.n_dense_layers = 1;
  EXPECT_NE(testing::error_of([&] { check_mixtral_expressible(c, "HF Mixtral"); }).find("dense FFN"),
            std::string::npos);
  EXPECT_EQ(testing::error_of([&] { check_mixtral_expressible(ModelConfig{}, "HF Mixtral"); }), "<no error>");
}

// A sliding window goes to config.json and comes back from it (HF Mixtral/Mistral: a query sees
// the sliding_window most recent tokens, itself included, as moeforge's model.sliding_window);
// GGUF's llama architecture has no window, so that export is refused.
TEST(ExportLayout, SlidingWindowRoundTripsThroughConfigJsonAndGgufRefusesIt) {
  ModelConfig c;
  const HfModel plain = model_from_mixtral_config(mixtral_config_json(c, 256, "bfloat16"), "plain");
  EXPECT_EQ(plain.model.sliding_window, 0);
  c.sliding_window = 96;
  const nlohmann::ordered_json j = mixtral_config_json(c, 256, "bfloat16");
  EXPECT_EQ(j["sliding_window"], 96);
  EXPECT_EQ(model_from_mixtral_config(j, "windowed").model.sliding_window, 96);
}

// A model trained with a window: the HF export's logits from the independent PyTorch forward of
// hf_check.py (which masks as transformers does, from config.json's sliding_window) equal
// moeforge's over a sequence 4x the window; the GGUF export is refused.
TEST_F(Export, WindowedModelMatchesTheIndependentForwardAndGgufRefusesIt) {
  const std::string step = testing::train_checkpoint(dir_ / "windowed", {"model.sliding_window=16"});
  ReleaseInfo r;
  r.model = model_config_from(read_manifest(step).config());
  ASSERT_EQ(r.model.sliding_window, 16);
  r.max_seq_len = 128;
  EXPECT_EQ(testing::error_of([&] { export_gguf(step, r, {.out_path = dir_ / "m.gguf"}); }),
            "cannot export to GGUF llama: the model attends through a sliding window of 16 tokens "
            "(model.sliding_window), which llama.cpp's llama architecture does not apply; export to HF safetensors "
            "instead (config.json carries sliding_window)");
  EXPECT_FALSE(fs::exists(dir_ / "m.gguf"));
  export_hf(step, r, {.out_dir = dir_ / "hf", .dtype = "f32"});
  MoeTransformer model(r.model);
  load(step, model.registry(), nullptr);
  std::vector<int32_t> ids{data::kBos};
  for (const int32_t id : data::encode("To be, or not to be, that is the question: whether 'tis nobler in the mind"))
    ids.push_back(id);
  const Tensor tokens = Tensor::from_ints({1, static_cast<int64_t>(ids.size())}, ids);
  testing::write_npy(dir_ / "tokens.npy", tokens);
  testing::write_npy(dir_ / "logits.npy", model.logits(tokens));
  const std::string out = run_python("hf_check.py", fmt::format("--hf '{}' --tokens '{}' --logits '{}'", dir_ / "hf",
                                                                dir_ / "tokens.npy", dir_ / "logits.npy"));
  EXPECT_NE(out.find("hf_check: OK"), std::string::npos);
  // Imported back, the run config carries the window.
  const ImportResult imp = import_hf(dir_ / "hf", dir_ / "imported", config::RunConfig());
  EXPECT_EQ(read_manifest(imp.step_dir).config().model().sliding_window(), 16);
  // The window matters for these logits: the same weights without it give others.
  r.model.sliding_window = 0;
  MoeTransformer full(r.model);
  load(step, full.registry(), nullptr);
  const std::vector<float> a = model.logits(tokens).to_floats(), b = full.logits(tokens).to_floats();
  double diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff = std::max(diff, static_cast<double>(std::abs(a[i] - b[i])));
  EXPECT_GT(diff, 1e-3);
}

TEST(ExportLayout, QkPermutationMatchesLlamaCpp) {
  // hd = 8: within a head the rows go 0,4,1,5,2,6,3,7 (shared/formats.md §3.8).
  std::vector<float> w(16);
  for (int i = 0; i < 16; ++i) w[i] = static_cast<float>(i);
  const std::vector<float> p = permute_qk_rows(w, 2, 8, 1);
  EXPECT_EQ(p, (std::vector<float>{0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15}));
}

TEST(ExportLayout, SizesParse) {
  EXPECT_EQ(parse_size("5GB"), 5'000'000'000);
  EXPECT_EQ(parse_size("2GiB"), int64_t{2} << 30);
  EXPECT_EQ(parse_size("1000"), 1000);
  EXPECT_NE(testing::error_of([] { parse_size("5 parsecs"); }).find("is not a size"), std::string::npos);
}

}  // namespace
}  // namespace moeforge::checkpoint
