#include "launch/checkpointing.h"

#include <signal.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>

#include <fmt/format.h>
#include <google/protobuf/text_format.h>

#include "checkpoint/direct_io.h"
#include "checkpoint/files.h"
#include "checkpoint/load.h"
#include "models/device_tensors.h"

namespace moeforge {

namespace fs = std::filesystem;

namespace {

volatile std::sig_atomic_t g_stop_signal = 0;

void on_stop_signal(int sig) { g_stop_signal = sig; }

void install_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGUSR1, &sa, nullptr);
}

const char* kind_name(checkpoint::TensorKind k) {
  switch (k) {
    case checkpoint::PARAM: return "param";
    case checkpoint::EXP_AVG: return "exp_avg";
    case checkpoint::EXP_AVG_SQ: return "exp_avg_sq";
    default: return "?";
  }
}

// checkpoint/ reads and writes parameter values and AdamW state through host pointers. On a GPU
// run, HostStaging swaps the registry's values and the optimizer state for host copies around a
// save or a load, then puts the device tensors back (after a load, with the loaded values copied
// into them). Layers keep Param pointers, never the tensor handles, so the swap is invisible to
// them. A CPU run stages nothing.
class HostStaging {
 public:
  HostStaging(ParamRegistry& registry, AdamW& adamw) : registry_(registry), adamw_(adamw) {
    if (registry.device().is_cpu()) return;
    for (Param& p : registry_.params()) {
      Saved& s = saved_.emplace_back(Saved{p.value, adamw_.exp_avg(p.spec.name), adamw_.exp_avg_sq(p.spec.name)});
      p.value = host(s.value);
      adamw_.exp_avg(p.spec.name) = host(s.exp_avg);
      adamw_.exp_avg_sq(p.spec.name) = host(s.exp_avg_sq);
    }
  }
  // Puts the device tensors back; with copy_back, first copies the host values (loaded from a
  // checkpoint) into them. State the loader replaced is moved to the device as it is.
  void restore(bool copy_back) {
    size_t i = 0;
    for (Param& p : registry_.params()) {
      if (i == saved_.size()) break;
      Saved& s = saved_[i++];
      const Device dev = s.value.device();
      if (copy_back) copy_across(p.value, s.value);
      p.value = s.value;
      Tensor& m = adamw_.exp_avg(p.spec.name);
      Tensor& v = adamw_.exp_avg_sq(p.spec.name);
      m = copy_back ? on_device(m, dev) : s.exp_avg;
      v = copy_back ? on_device(v, dev) : s.exp_avg_sq;
    }
    saved_.clear();
  }

 private:
  struct Saved {
    Tensor value, exp_avg, exp_avg_sq;
  };
  ParamRegistry& registry_;
  AdamW& adamw_;
  std::vector<Saved> saved_;  // registry order; empty on a CPU run
};

}  // namespace

Checkpointing::Checkpointing(const config::RunConfig& run, const ProcessGrid& grid) : run_(run), grid_(grid) {
  const auto& c = run_.checkpoint();
  if (!c.direct_io()) checkpoint::set_direct_io(false);
  if (!c.dir().empty()) saver_.emplace(c.dir(), c.keep_last(), c.async_save(), grid_);
  install_handlers();
}

void Checkpointing::resume(Trainer& trainer, const std::string& resume) {
  if (resume.empty()) return;
  std::string step_dir;
  if (resume == "auto") {
    MOE_CHECK(!run_.checkpoint().dir().empty(), "--resume auto needs checkpoint.dir");
    step_dir = checkpoint::latest_step_dir(run_.checkpoint().dir());
    if (step_dir.empty()) {
      if (grid_.world_rank() == 0)
        fmt::print("moeforge: no checkpoint in {} yet, starting fresh\n", run_.checkpoint().dir());
      return;
    }
  } else {
    step_dir = checkpoint::resolve_checkpoint(resume);
  }
  const auto start = std::chrono::steady_clock::now();
  HostStaging staging(trainer.model().registry(), trainer.optimizer().adamw());
  const checkpoint::LoadedState s = checkpoint::load(step_dir, trainer.model().registry(), &trainer.optimizer(),
                                                     &grid_.pp(), run_.checkpoint().verify_sha256_on_load());
  staging.restore(/*copy_back=*/true);
  trainer.model().registry().refresh_compute();  // the bf16 copies of the loaded masters
  const checkpoint::Manifest& m = s.manifest;
  const int64_t batch = run_.train().global_batch();
  MOE_CHECK(m.data_position() == static_cast<uint64_t>(m.step() * batch),
            "checkpoint {}: data position {} after {} steps was reached with another train.global_batch than {}; "
            "resuming would change the data order",
            step_dir, m.data_position(), m.step(), batch);
  trainer.restore_position(m.step());
  last_saved_step_ = m.step();
  if (grid_.world_rank() == 0) {
    const auto& l = m.layout();
    fmt::print("moeforge: resumed from {} at step {} (written by {} ranks: tp {} x pp {} x dp {}, ep {}{}) in {:.2f} s\n",
               step_dir, m.step(), l.world_size(), l.tp(), l.pp(), l.dp(), l.ep(),
               l.zero_stage() ? ", ZeRO-1" : "",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    std::fflush(stdout);
  }
}

void Checkpointing::prepare(Trainer& trainer) {
  if (!saver_) return;
  const auto start = std::chrono::steady_clock::now();
  const int64_t bytes = saver_->reserve(trainer.model().registry());
  if (bytes > 0 && grid_.world_rank() == 0) {
    fmt::print("checkpoint: {:.1f} MB of host buffers reserved for async saves in {:.2f} s\n", bytes / 1e6,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    std::fflush(stdout);
  }
}

void Checkpointing::report(const std::optional<checkpoint::SaveOutcome>& outcome) {
  if (!outcome) return;
  last_save_ok_ = outcome->ok;
  if (grid_.world_rank() != 0) return;
  if (outcome->ok) {
    fmt::print("checkpoint: saved step {} to {} ({:.2f} s)\n", outcome->step, outcome->path, outcome->seconds);
  } else {
    std::fprintf(stderr, "moeforge: checkpoint of step %lld failed, training continues: %s\n",
                 static_cast<long long>(outcome->step), outcome->error.c_str());
  }
  std::fflush(stdout);
  std::fflush(stderr);
}

void Checkpointing::save(Trainer& trainer) {
  if (last_saved_step_ == trainer.steps_done()) return;
  last_saved_step_ = trainer.steps_done();
  // A background save still writing is waited for (and committed) first: saves come faster than
  // the disk takes them. Reported apart from the snapshot copy, the stall every async save costs.
  const auto wait_start = std::chrono::steady_clock::now();
  report(saver_->finish());
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - wait_start).count();
  const auto start = std::chrono::steady_clock::now();
  HostStaging staging(trainer.model().registry(), trainer.optimizer().adamw());
  report(saver_->save({.step = trainer.steps_done(), .data_position = trainer.data_position(), .config = run_},
                      trainer.model().registry(), trainer.optimizer()));
  staging.restore(/*copy_back=*/false);  // the saver has copied (async) or written (sync) the values
  if (saver_->pending() && grid_.world_rank() == 0) {
    fmt::print("checkpoint: step {} copied in {:.3f} s, writing in the background{}\n", trainer.steps_done(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
               waited >= 0.001 ? fmt::format(" (first waited {:.3f} s for the previous save)", waited) : std::string());
    std::fflush(stdout);
  }
}

bool Checkpointing::after_step(Trainer& trainer, const StepMetrics& m) {
  if (saver_) report(saver_->poll());
  const Tensor flag = Tensor::from_ints({1}, std::vector<int32_t>{static_cast<int32_t>(g_stop_signal)});
  grid_.world().all_reduce(flag, ReduceOp::kMax);
  stopped_ = flag.data<int32_t>()[0] != 0;
  const auto& c = run_.checkpoint();
  const bool due = (c.every() > 0 && m.step % c.every() == 0) || m.step == run_.train().steps() || stopped_;
  if (saver_ && due) save(trainer);
  if (stopped_ && grid_.world_rank() == 0) {
    fmt::print("moeforge: stopping after step {} on signal {}{}\n", m.step, flag.data<int32_t>()[0],
               saver_ ? "" : " (no checkpoint.dir: nothing saved)");
    std::fflush(stdout);
  }
  return stopped_;
}

bool Checkpointing::finish() {
  if (saver_) report(saver_->finish());
  return last_save_ok_;
}

int inspect_checkpoint(const std::string& path) {
  const std::string dir = checkpoint::resolve_checkpoint(path);
  const checkpoint::Manifest m = checkpoint::read_manifest(dir);
  const auto& l = m.layout();
  fmt::print("checkpoint {}\n", dir);
  fmt::print("step {} | optimizer steps {} | data position {} | rng seed {}\n", m.step(), m.optimizer_steps(),
             m.data_position(), m.rng_seed());
  fmt::print("written by {} ranks: tp {} pp {} dp {} ep {} zero_stage {}\n", l.world_size(), l.tp(), l.pp(), l.dp(),
             l.ep(), l.zero_stage());
  std::string config;
  google::protobuf::TextFormat::PrintToString(m.config(), &config);
  fmt::print("config:\n{}", config);
  fmt::print("{:<36} {:<10} {:<5} {:<18} {:>6} {:>12}\n", "tensor", "kind", "dtype", "shape", "pieces", "bytes");
  int64_t total = 0;
  for (const checkpoint::TensorEntry& t : m.tensors()) {
    int64_t n = 4;
    for (const int64_t s : t.shape()) n *= s;
    total += n;
    fmt::print("{:<36} {:<10} {:<5} {:<18} {:>6} {:>12}\n", t.name(), kind_name(t.kind()), t.dtype(),
               checkpoint::box_shape_str({t.shape().begin(), t.shape().end()}), t.pieces_size(), n);
  }
  fmt::print("{} tensors, {} bytes\n", m.tensors_size(), total);
  for (const checkpoint::File& f : m.files()) fmt::print("file {} {} bytes sha256 {}\n", f.name(), f.size(), f.sha256());
  const std::vector<std::string> problems = checkpoint::verify(dir);
  for (const std::string& p : problems) std::fprintf(stderr, "moeforge: inspect: %s\n", p.c_str());
  if (!problems.empty()) {
    fmt::print("verification FAILED: {} problem(s)\n", problems.size());
    return 1;
  }
  fmt::print("verified {} files: sizes, SHA-256 and every dataset's Fletcher-32 checksums OK\n", m.files_size());
  return 0;
}

}  // namespace moeforge
