// The moeforge command line: one binary for every rank and every task.
//
//   moeforge train --config configs/tiny.pbtxt [--set train.steps=100 ...]
//   moeforge data prepare --input a.txt b.txt --output data/ [--val-fraction 0.1]
//   moeforge inspect checkpoints/run[/step_00001000]
//   moeforge export CKPT --format hf|gguf --out PATH [...]    (launch/release.h)
//   moeforge import HF_DIR --out CKPT_DIR
//   moeforge generate CKPT --prompt TEXT [...]
//   moeforge eval CKPT --data DIR [...]                        (launch/evaluate.h)
//   moeforge plan --config X --cluster C [--gpus N] [--json F] (launch/plan_search.h)
//
// Exit codes: 0 success; 1 a runtime error (bad data, I/O, numerical failure); 2 a usage or
// configuration error. Every error is one line on stderr saying what and where.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <malloc.h>

#include <cstdio>
#include <string>
#include <vector>

#include "data/prepare.h"
#include "launch/checkpointing.h"
#include "launch/config.h"
#include "launch/evaluate.h"
#include "launch/plan_search.h"
#include "launch/release.h"
#include "launch/trainer.h"
#include "parallel/mpi_runtime.h"

namespace {

constexpr const char* kVersion = "0.1.0";

// Every rank runs this. Configuration errors are the same on every rank (each parses the same
// file against the same world size), so rank 0 reports and all exit 2 without a collective
// pending. Any later error may hit one rank only: it is reported by that rank and the whole job
// is aborted, so no other rank waits for it in a collective.
int run_train(const std::string& config_path, const std::vector<std::string>& overrides, const std::string& resume) {
  moeforge::MpiRuntime mpi;
  moeforge::config::RunConfig run;
  try {
    run = moeforge::load_run_config(config_path, overrides, mpi.world_size());
  } catch (const moeforge::ConfigError& e) {
    if (mpi.world_rank() == 0) std::fprintf(stderr, "moeforge: config error: %s\n", e.what());
    return 2;
  }
  try {
    const auto& p = run.parallel();
    const moeforge::ProcessGrid grid = moeforge::ProcessGrid::create(
        mpi, moeforge::ParallelSizes{.tp = p.tp(), .pp = p.pp(), .dp = p.dp(), .ep = p.ep()}, p.collective_timeout_s(),
        moeforge::run_device(run, mpi.world_rank()));
    moeforge::Trainer trainer(run, grid);
    moeforge::Checkpointing checkpointing(run, grid);
    checkpointing.resume(trainer, resume);
    checkpointing.prepare(trainer);
    trainer.run([&](const moeforge::StepMetrics& m) { return checkpointing.after_step(trainer, m); });
    // A preempted job exits 0 only with its checkpoint committed.
    if (!checkpointing.finish() && checkpointing.stopped_by_signal()) return 1;
  } catch (const std::exception& e) {
    if (mpi.world_size() == 1) {
      std::fprintf(stderr, "moeforge: error: %s\n", e.what());
      return 1;
    }
    mpi.abort(1, fmt::format("error: {}", e.what()));
  }
  return 0;
}

int run_prepare(const moeforge::data::PrepareOptions& options) {
  const moeforge::data::PrepareSummary s = moeforge::data::prepare(options);
  fmt::print("prepared {} file(s), {} bytes: train {} tokens in {} shard(s), validation {} tokens in {} shard(s); manifest {}\n",
             s.input_files, s.input_bytes, s.train.tokens, s.train.shards, s.val.tokens, s.val.shards,
             s.manifest_path);
  return 0;
}

// CLI11 reports "A subcommand is required" before it looks at an unknown word where a
// subcommand belongs; name that word instead, with the choices.
std::string unknown_subcommand(CLI::App& app, int argc, char** argv) {
  CLI::App* level = &app;
  for (int i = 1; i < argc; ++i) {
    const std::string word = argv[i];
    if (word == "--help" || word == "-h" || word == "--version") return {};
    const std::vector<CLI::App*> choices = level->get_subcommands([](CLI::App*) { return true; });
    if (choices.empty()) return {};  // a leaf: its options are CLI11's to check
    std::string names;
    for (const CLI::App* c : choices) names += (names.empty() ? "" : ", ") + c->get_name();
    CLI::App* next = nullptr;
    for (CLI::App* c : choices)
      if (c->get_name() == word) next = c;
    if (!next) {
      const std::string where = level == &app ? std::string("moeforge") : "moeforge " + level->get_name();
      return fmt::format("{}: unknown {} '{}'; expected one of: {}", where,
                         word.starts_with("-") ? "option" : "subcommand", word, names);
    }
    level = next;
  }
  return {};
}

}  // namespace

int main(int argc, char** argv) {
  // Training allocates and frees the same large activation buffers every step. glibc would serve
  // each from a fresh mmap and return it on free, page-faulting the memory back in every step
  // (measured ~5-8% of a CPU step); keep freed memory in the heap instead.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);

  CLI::App app{"moeforge: pretrain Mixture-of-Experts transformers and release them as open weights"};
  app.set_version_flag("--version", std::string("moeforge ") + kVersion);
  app.require_subcommand(1);

  std::string config_path;
  std::vector<std::string> overrides;
  CLI::App* train = app.add_subcommand("train", "Train a model from a run configuration");
  train->add_option("--config", config_path, "Run configuration (protobuf text format, see configs/)")->required();
  train->add_option("--set", overrides, "Override a field: --set path.to.field=value (repeatable)")
      ->allow_extra_args(false);

  std::string resume;
  train->add_option("--resume", resume,
                    "Continue from a checkpoint: 'auto' (checkpoint.dir's latest, if any) or a checkpoint path");
  CLI::App* data = app.add_subcommand("data", "Prepare training data");
  data->require_subcommand(1);
  moeforge::data::PrepareOptions prepare;
  CLI::App* prep = data->add_subcommand("prepare", "Tokenize text files into token shards (byte-level tokenizer)");
  prep->add_option("--input", prepare.inputs, "Text files")->required()->check(CLI::ExistingFile);
  prep->add_option("--output", prepare.output_dir, "Output directory (train/, val/, manifest.json)")->required();
  prep->add_option("--val-fraction", prepare.val_fraction,
                   "Fraction of each file (its end, cut at a line start) held out for validation")
      ->check(CLI::Range(0.0, 0.999999));
  prep->add_option("--max-tokens-per-shard", prepare.max_tokens_per_shard, "Tokens per shard file")
      ->check(CLI::PositiveNumber);

  std::string inspect_path;
  CLI::App* inspect = app.add_subcommand("inspect", "Print a checkpoint's manifest and tensors and verify its checksums");
  inspect->add_option("checkpoint", inspect_path, "A step directory or a checkpoint directory (its latest)")->required();

  moeforge::ExportCommand export_cmd;
  CLI::App* exp = app.add_subcommand("export", "Export a checkpoint as open weights (Hugging Face safetensors or GGUF)");
  exp->add_option("checkpoint", export_cmd.checkpoint, "A step directory or a checkpoint directory (its latest)")
      ->required();
  exp->add_option("--format", export_cmd.format, "hf (MixtralForCausalLM folder) or gguf (llama.cpp)")
      ->required()->check(CLI::IsMember({"hf", "gguf"}));
  exp->add_option("--out", export_cmd.out, "Output folder (hf) or file (gguf)")->required();
  exp->add_option("--dtype", export_cmd.dtype, "hf: weight dtype")->check(CLI::IsMember({"bf16", "f16", "f32"}));
  exp->add_option("--max-shard-size", export_cmd.max_shard_size, "hf: largest safetensors shard (e.g. 5GB, 500MB)");
  exp->add_option("--type", export_cmd.type, "gguf: tensor type")
      ->check(CLI::IsMember({"f32", "f16", "bf16", "q8_0", "q4_0"}));
  exp->add_option("--license", export_cmd.license, "SPDX license id of the weights (e.g. Apache-2.0)");
  exp->add_option("--name", export_cmd.name, "Model name for the model card / GGUF general.name");

  std::string import_dir, import_out;
  CLI::App* imp = app.add_subcommand("import", "Import a Hugging Face Mixtral-layout model as a checkpoint to train on");
  imp->add_option("hf_dir", import_dir, "Folder with config.json and safetensors weights")->required();
  imp->add_option("--out", import_out, "Checkpoint directory to create")->required();

  moeforge::GenerateCommand gen_cmd;
  bool no_bos = false;
  CLI::App* gen = app.add_subcommand("generate", "Generate text from a checkpoint (KV-cache decoding)");
  gen->add_option("checkpoint", gen_cmd.checkpoint, "A step directory or a checkpoint directory (its latest)")
      ->required();
  gen->add_option("--prompt", gen_cmd.prompt, "Text to continue")->required();
  gen->add_option("--max-new-tokens", gen_cmd.sample.max_new_tokens, "Tokens to generate")->check(CLI::NonNegativeNumber);
  gen->add_option("--temperature", gen_cmd.sample.temperature, "0: greedy")->check(CLI::NonNegativeNumber);
  gen->add_option("--top-k", gen_cmd.sample.top_k, "Sample among the k most likely tokens (0: all)")
      ->check(CLI::NonNegativeNumber);
  gen->add_option("--top-p", gen_cmd.sample.top_p, "Nucleus sampling mass in (0, 1]")->check(CLI::Range(1e-6, 1.0));
  gen->add_option("--seed", gen_cmd.sample.seed, "Sampling seed");
  gen->add_option("--context", gen_cmd.sample.context, "KV cache length (0: the model's max_seq_len)")
      ->check(CLI::NonNegativeNumber);
  gen->add_flag("--no-bos", no_bos, "Do not start the prompt with <bos>");

  moeforge::EvalCommand eval_cmd;
  CLI::App* ev = app.add_subcommand("eval", "Loss and perplexity of a checkpoint on held-out token shards");
  ev->add_option("checkpoint", eval_cmd.checkpoint, "A step directory or a checkpoint directory (its latest)")
      ->required();
  ev->add_option("--data", eval_cmd.data, "A directory of token shards (e.g. the val/ of `data prepare`)")->required();
  ev->add_option("--tp", eval_cmd.tp, "Tensor-parallel size (dp = ranks / tp)")->check(CLI::PositiveNumber);
  ev->add_option("--ep", eval_cmd.ep, "Expert-parallel size")->check(CLI::PositiveNumber);
  ev->add_option("--seq-len", eval_cmd.seq_len, "Window length (0: the checkpoint's train.seq_len)")
      ->check(CLI::NonNegativeNumber);
  ev->add_option("--micro-batch", eval_cmd.micro_batch, "Windows per forward")->check(CLI::PositiveNumber);
  ev->add_option("--max-tokens", eval_cmd.max_tokens, "Score at most this many targets (0: all)")
      ->check(CLI::NonNegativeNumber);

  std::string plan_config, plan_cluster, plan_json;
  int plan_gpus = 0;
  CLI::App* plan = app.add_subcommand("plan", "Rank every TP x PP x EP x DP layout of a run on a cluster by memory and speed");
  plan->add_option("--config", plan_config, "Run configuration (its model and train sections are planned for)")
      ->required();
  plan->add_option("--cluster", plan_cluster, "Cluster description (protobuf text, see cluster/*.pbtxt)")->required();
  plan->add_option("--gpus", plan_gpus, "GPUs to lay the run out on (default: one node)")->check(CLI::PositiveNumber);
  plan->add_option("--json", plan_json, "Also write every layout's estimate to this JSON file");

  if (const std::string unknown = unknown_subcommand(app, argc, argv); !unknown.empty()) {
    std::fprintf(stderr, "%s\nRun with --help for more information.\n", unknown.c_str());
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }

  try {
    if (*train) return run_train(config_path, overrides, resume);
    if (*inspect) return moeforge::inspect_checkpoint(inspect_path);
    if (*prep) return run_prepare(prepare);
    if (*exp) return moeforge::run_export(export_cmd);
    if (*imp) return moeforge::run_import(import_dir, import_out);
    if (*gen) {
      gen_cmd.bos = !no_bos;
      return moeforge::run_generate(gen_cmd);
    }
    if (*plan) return moeforge::run_plan(plan_config, plan_cluster, plan_gpus, plan_json);
    if (*ev) {
      moeforge::run_eval(eval_cmd);
      return 0;
    }
  } catch (const moeforge::ConfigError& e) {
    std::fprintf(stderr, "moeforge: config error: %s\n", e.what());
    return 2;
  } catch (const moeforge::Error& e) {
    std::fprintf(stderr, "moeforge: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moeforge: unexpected error: %s\n", e.what());
    return 1;
  }
  return 0;
}
