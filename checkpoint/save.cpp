#include "checkpoint/save.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <thread>

#include <fmt/format.h>

#include "checkpoint/files.h"
#include "checkpoint/hdf5_io.h"

namespace moeforge::checkpoint {

namespace fs = std::filesystem;

namespace {

const char* kind_name(TensorKind k) {
  switch (k) {
    case PARAM: return "param";
    case EXP_AVG: return "exp_avg";
    case EXP_AVG_SQ: return "exp_avg_sq";
    default: return "unknown";
  }
}

// The box `box` of a row-major local block starts at the block's origin and differs from it
// only in dim 0 (padding rows cut off): a prefix of the block's data, viewed or copied.
void add_block(Snapshot& s, const Param& p, TensorKind kind, const Box& box, const float* local, bool copy,
               std::vector<std::vector<float>>* recycle) {
  Snapshot::Block& b = s.blocks.emplace_back();
  b.name = p.spec.name;
  b.kind = kind;
  b.global_shape = stored_shape(p.spec);
  b.box = box;
  if (copy) {
    const size_t i = s.blocks.size() - 1;
    if (recycle && i < recycle->size()) b.copy = std::move((*recycle)[i]);  // assign keeps its capacity
    b.copy.assign(local, local + box.numel());
  } else {
    b.view = local;
  }
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

void pause_if_testing(int64_t step) {
  const char* env = std::getenv("MOEFORGE_TEST_PAUSE_IN_SAVE");
  if (!env || std::strtoll(env, nullptr, 10) != step) return;
  std::fprintf(stderr, "moeforge: test pause in save of step %lld (pid %d)\n", static_cast<long long>(step),
               static_cast<int>(::getpid()));
  std::fflush(stderr);
  for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
}

// The records of every rank, on every rank (two all-gathers over the world: lengths, then the
// serialized records padded to the longest).
std::vector<ShardRecord> gather_records(const ShardRecord& mine, Comm& world) {
  const std::string bytes = mine.SerializeAsString();
  const int n = world.size();
  const Tensor len = Tensor::empty({1}, DType::kI64);
  len.data<int64_t>()[0] = static_cast<int64_t>(bytes.size());
  const Tensor lens = Tensor::empty({n}, DType::kI64);
  world.all_gather(len, lens);
  int64_t longest = 0;
  for (int r = 0; r < n; ++r) longest = std::max(longest, lens.data<int64_t>()[r]);
  const int64_t words = (longest + 3) / 4;
  const Tensor buf = Tensor::zeros({std::max<int64_t>(words, 1)}, DType::kI32);
  std::memcpy(buf.raw_data(), bytes.data(), bytes.size());
  const Tensor all = Tensor::empty({n * std::max<int64_t>(words, 1)}, DType::kI32);
  world.all_gather(buf, all);
  std::vector<ShardRecord> records(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) {
    const char* p = static_cast<const char*>(all.raw_data()) + static_cast<size_t>(r) * std::max<int64_t>(words, 1) * 4;
    MOE_CHECK(records[r].ParseFromArray(p, static_cast<int>(lens.data<int64_t>()[r])),
              "checkpoint: the shard record of rank {} does not parse", r);
  }
  return records;
}

// Rank 0: the tensor index of all records, each tensor's pieces checked to tile it exactly.
void merge_tensors(const std::vector<ShardRecord>& records, Manifest& m) {
  std::map<std::pair<std::string, int>, int> index;
  for (const ShardRecord& r : records) {
    for (const TensorEntry& t : r.tensors()) {
      const auto key = std::pair{t.name(), static_cast<int>(t.kind())};
      auto it = index.find(key);
      if (it == index.end()) {
        it = index.emplace(key, m.tensors_size()).first;
        TensorEntry* entry = m.add_tensors();
        *entry = t;
        entry->clear_pieces();
      }
      TensorEntry* entry = m.mutable_tensors(it->second);
      MOE_CHECK(std::equal(entry->shape().begin(), entry->shape().end(), t.shape().begin(), t.shape().end()),
                "checkpoint: ranks disagree on the shape of {} ({})", t.name(), kind_name(t.kind()));
      for (const Piece& piece : t.pieces()) *entry->add_pieces() = piece;
    }
  }
  for (const TensorEntry& t : m.tensors()) {
    int64_t want = 1, have = 0;
    for (const int64_t s : t.shape()) want *= s;
    for (const Piece& piece : t.pieces()) {
      int64_t n = 1;
      for (const int64_t s : piece.shape()) n *= s;
      have += n;
    }
    MOE_CHECK(have == want, "checkpoint: the pieces of {} ({}) hold {} elements, its shape {} has {}", t.name(),
              kind_name(t.kind()), have, box_shape_str({t.shape().begin(), t.shape().end()}), want);
  }
}

bool is_step_dir(const std::string& name, int64_t& step) {
  if (name.size() != 13 || !name.starts_with("step_")) return false;
  if (!std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; })) return false;
  step = std::stoll(name.substr(5));
  return true;
}

// Rank 0, after a commit: keeps the newest keep_last step directories and removes stale
// temporary ones (no other save is in flight when a commit runs).
void prune(const std::string& dir, int keep_last) {
  std::vector<std::pair<int64_t, fs::path>> steps;
  for (const fs::directory_entry& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    int64_t step = 0;
    if (is_step_dir(name, step)) steps.emplace_back(step, e.path());
    if (name.starts_with(".tmp_step_") || name.starts_with(".old_step_")) fs::remove_all(e.path());
  }
  std::sort(steps.begin(), steps.end());
  for (size_t i = 0; i + static_cast<size_t>(keep_last) < steps.size(); ++i) fs::remove_all(steps[i].second);
}

}  // namespace

std::string step_dir_name(int64_t step) { return fmt::format("step_{:08}", step); }

Snapshot snapshot(ParamRegistry& registry, DistributedOptimizer& optimizer, const ProcessGrid& grid, bool copy,
                  std::vector<std::vector<float>>* recycle) {
  Snapshot s;
  s.world_rank = grid.world_rank();
  const ParallelSizes& sizes = grid.sizes();
  AdamW& adamw = optimizer.adamw();
  // ZeRO-1: the moments of each state group, gathered in one all-reduce per group: a buffer of
  // the local blocks (m then v of each parameter, registry order), zero except this rank's range.
  // Only groups whose rank 0 writes the parameter take part; every member decides alike.
  struct Gather {
    Comm* group = nullptr;
    std::vector<const Param*> params;
    std::vector<int64_t> offset;
    int64_t size = 0;
    Tensor buf;
  };
  std::vector<Gather> gathers;
  const bool sharded_state = optimizer.zero_stage() == 1;
  auto gather_of = [&](const Param& p) -> Gather* {
    if (!p.spec.trainable || !sharded_state) return nullptr;
    Comm& g = optimizer.state_group(p);
    if (g.size() == 1 || !writes(p.spec, sizes, g.world_ranks()[0])) return nullptr;
    for (Gather& ga : gathers)
      if (ga.group == &g) return &ga;
    Gather fresh;
    fresh.group = &g;
    return &gathers.emplace_back(std::move(fresh));
  };
  for (const Param& p : registry.params()) {
    if (Gather* ga = gather_of(p)) {
      ga->params.push_back(&p);
      ga->offset.push_back(ga->size);
      ga->size += 2 * p.value.numel();
    }
  }
  // A rank belongs to one group of each name ("dp", "expert_dp"): all-reducing in name order is
  // one global order, so no two ranks wait on each other's groups.
  std::sort(gathers.begin(), gathers.end(), [](const Gather& a, const Gather& b) { return a.group->name() < b.group->name(); });
  for (Gather& ga : gathers) {
    ga.buf = Tensor::zeros({ga.size}, DType::kF32);
    for (size_t i = 0; i < ga.params.size(); ++i) {
      const Param& p = *ga.params[i];
      const ElementRange r = adamw.owned_range(p.spec.name);
      float* m = ga.buf.data<float>() + ga.offset[i];
      float* v = m + p.value.numel();
      if (r.size() > 0) {
        std::memcpy(m + r.begin, adamw.exp_avg(p.spec.name).data<float>(), r.size() * sizeof(float));
        std::memcpy(v + r.begin, adamw.exp_avg_sq(p.spec.name).data<float>(), r.size() * sizeof(float));
      }
    }
    ga.group->all_reduce(ga.buf);
  }

  for (Param& p : registry.params()) {
    if (!writes(p.spec, sizes, s.world_rank)) continue;
    const Box box = stored_block(p);
    if (box.numel() == 0) continue;
    add_block(s, p, PARAM, box, p.value.data<float>(), copy, recycle);
    if (!p.spec.trainable) continue;
    const float *m = nullptr, *v = nullptr;
    if (const Gather* ga = gather_of(p)) {
      const size_t i = static_cast<size_t>(std::find(ga->params.begin(), ga->params.end(), &p) - ga->params.begin());
      m = ga->buf.data<float>() + ga->offset[i];
      v = m + p.value.numel();
    } else {
      m = adamw.exp_avg(p.spec.name).data<float>();
      v = adamw.exp_avg_sq(p.spec.name).data<float>();
    }
    add_block(s, p, EXP_AVG, box, m, copy, recycle);
    add_block(s, p, EXP_AVG_SQ, box, v, copy, recycle);
  }
  if (!copy)
    for (Gather& ga : gathers) s.gathered.push_back(std::move(ga.buf));
  return s;
}

ShardRecord write_shard(const Snapshot& snapshot, const std::string& tmp_dir, int64_t step) {
  ShardRecord record;
  record.set_world_rank(snapshot.world_rank);
  if (snapshot.blocks.empty()) return record;
  const std::string name = fmt::format("rank_{:05}.h5", snapshot.world_rank);
  const std::string path = (fs::path(tmp_dir) / name).string();
  try {
    H5File file = H5File::create(path);
    for (const Snapshot::Block& b : snapshot.blocks) {
      const std::string dataset = fmt::format("{}/{}", kind_name(b.kind), b.name);
      file.write(dataset, b.values(), b.box.shape,
                 BlockAttrs{b.name, kind_name(b.kind), b.global_shape, b.box.offset});
      file.start_writeback();
      TensorEntry* t = record.add_tensors();
      t->set_name(b.name);
      t->set_kind(b.kind);
      for (const int64_t d : b.global_shape) t->add_shape(d);
      t->set_dtype("f32");
      Piece* piece = t->add_pieces();
      piece->set_file(name);
      piece->set_dataset(dataset);
      for (const int64_t d : b.box.offset) piece->add_offset(d);
      for (const int64_t d : b.box.shape) piece->add_shape(d);
    }
    file.close();
    // The digest reads the file back from the page cache while fsync waits for the disk.
    std::future<FileDigest> hashed = std::async(std::launch::async, [&path] { return digest_file(path); });
    std::string fsync_error;
    try {
      fsync_path(path);
    } catch (const std::exception& e) {
      fsync_error = e.what();
    }
    const FileDigest digest = hashed.get();
    MOE_CHECK(fsync_error.empty(), "{}", fsync_error);
    record.mutable_file()->set_name(name);
    record.mutable_file()->set_size(digest.size);
    record.mutable_file()->set_sha256(digest.sha256);
  } catch (const std::exception& e) {
    record.set_error(fmt::format("rank {}: {}", snapshot.world_rank, e.what()));
  }
  pause_if_testing(step);
  return record;
}

struct Saver::Pending {
  RunState state;
  int zero_stage = 0;
  int64_t optimizer_steps = 0;
  std::string tmp_dir;
  std::string setup_error;  // this rank could not prepare the save
  std::future<ShardRecord> record;
  std::shared_ptr<Snapshot> snapshot;  // held until the commit, whose buffers then go to spare_
  std::chrono::steady_clock::time_point start;
};

Saver::Saver(std::string dir, int keep_last, bool async, const ProcessGrid& grid)
    : dir_(std::move(dir)), keep_last_(keep_last), async_(async), grid_(grid) {
  MOE_CHECK(!dir_.empty(), "checkpoint.dir: empty");
  MOE_CHECK(keep_last_ >= 1, "checkpoint.keep_last must be >= 1, got {}", keep_last_);
}

Saver::~Saver() {
  if (pending_ && pending_->record.valid()) pending_->record.wait();
}

std::optional<SaveOutcome> Saver::save(const RunState& state, ParamRegistry& registry,
                                       DistributedOptimizer& optimizer) {
  std::optional<SaveOutcome> previous = finish();
  auto p = std::make_unique<Pending>();
  p->start = std::chrono::steady_clock::now();
  p->state = state;
  p->zero_stage = optimizer.zero_stage();
  p->optimizer_steps = optimizer.adamw().steps();
  p->tmp_dir = (fs::path(dir_) / (".tmp_" + step_dir_name(state.step))).string();
  // Rank 0 makes a fresh temporary directory; the others wait for it (the barrier) so nobody
  // writes into a directory that is about to be cleared.
  if (grid_.world_rank() == 0) {
    try {
      fs::create_directories(dir_);
      fs::remove_all(p->tmp_dir);
      fs::create_directories(p->tmp_dir);
    } catch (const std::exception& e) {
      p->setup_error = fmt::format("rank 0: cannot create {}: {}", p->tmp_dir, e.what());
    }
  }
  grid_.world().barrier();
  auto shared = std::make_shared<Snapshot>(snapshot(registry, optimizer, grid_, /*copy=*/async_, &spare_));
  spare_.clear();
  p->snapshot = shared;
  const std::string tmp = p->tmp_dir;
  const int64_t step = state.step;
  if (async_) {
    p->record = std::async(std::launch::async, [shared, tmp, step] { return write_shard(*shared, tmp, step); });
  } else {
    std::promise<ShardRecord> done;
    done.set_value(write_shard(*shared, tmp, step));
    p->record = done.get_future();
  }
  pending_ = std::move(p);
  if (async_) return previous;
  return commit();
}

int64_t Saver::reserve(ParamRegistry& registry) {
  if (!async_) return 0;
  // The blocks snapshot() copies, in its order: a parameter's block, then its two moments.
  spare_.clear();
  int64_t bytes = 0;
  for (const Param& p : registry.params()) {
    if (!writes(p.spec, grid_.sizes(), grid_.world_rank())) continue;
    const Box box = stored_block(p);
    if (box.numel() == 0) continue;
    for (int k = 0; k < (p.spec.trainable ? 3 : 1); ++k) {
      spare_.emplace_back(static_cast<size_t>(box.numel()), 0.0f);  // zero-filled: every page touched
      bytes += box.numel() * static_cast<int64_t>(sizeof(float));
    }
  }
  return bytes;
}

std::optional<SaveOutcome> Saver::poll() {
  if (!pending_) return std::nullopt;
  const bool ready = pending_->record.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
  // Every rank must agree to commit now: the maximum of "not ready" over the world is 0 once
  // all have finished.
  const Tensor not_ready = Tensor::from_ints({1}, std::vector<int32_t>{ready ? 0 : 1});
  grid_.world().all_reduce(not_ready, ReduceOp::kMax);
  if (not_ready.data<int32_t>()[0] != 0) return std::nullopt;
  return commit();
}

std::optional<SaveOutcome> Saver::finish() {
  if (!pending_) return std::nullopt;
  pending_->record.wait();
  return commit();
}

SaveOutcome Saver::commit() {
  std::unique_ptr<Pending> p = std::move(pending_);
  ShardRecord mine = p->record.get();
  if (async_ && p->snapshot) {  // the writer is done with the copies: keep them for the next save
    for (Snapshot::Block& b : p->snapshot->blocks) spare_.push_back(std::move(b.copy));
    p->snapshot.reset();
  }
  if (!p->setup_error.empty() && mine.error().empty()) mine.set_error(p->setup_error);
  const std::vector<ShardRecord> records = gather_records(mine, grid_.world());

  SaveOutcome out;
  out.step = p->state.step;
  const std::string final_dir = (fs::path(dir_) / step_dir_name(p->state.step)).string();
  if (grid_.world_rank() == 0) {
    try {
      for (const ShardRecord& r : records) MOE_CHECK(r.error().empty(), "{}", r.error());
      Manifest m;
      m.set_format_version(kFormatVersion);
      m.set_step(p->state.step);
      *m.mutable_config() = p->state.config;
      const ParallelSizes& s = grid_.sizes();
      Layout* layout = m.mutable_layout();
      layout->set_world_size(grid_.world_size());
      layout->set_tp(s.tp);
      layout->set_pp(s.pp);
      layout->set_dp(s.dp);
      layout->set_ep(s.ep);
      layout->set_zero_stage(p->zero_stage);
      m.set_data_position(p->state.data_position);
      m.set_optimizer_steps(p->optimizer_steps);
      m.set_rng_seed(p->state.config.train().seed());
      merge_tensors(records, m);
      for (const ShardRecord& r : records)
        if (r.has_file()) *m.add_files() = r.file();
      const std::string manifest = (fs::path(p->tmp_dir) / kManifestName).string();
      write_file_atomic(manifest, m.SerializeAsString());
      fsync_path(p->tmp_dir);
      // A step directory of the same number (an earlier run's) is moved aside first: rename
      // does not replace a non-empty directory.
      if (fs::exists(final_dir)) fs::rename(final_dir, fs::path(dir_) / (".old_" + step_dir_name(p->state.step)));
      fs::rename(p->tmp_dir, final_dir);
      fsync_path(dir_);
      write_file_atomic((fs::path(dir_) / kLatestName).string(), step_dir_name(p->state.step) + "\n");
      prune(dir_, keep_last_);
      out.ok = true;
      out.path = final_dir;
    } catch (const std::exception& e) {
      out.error = e.what();
      std::error_code ignored;
      fs::remove_all(p->tmp_dir, ignored);
    }
  }
  // Every rank learns whether the save succeeded.
  const Tensor ok = Tensor::from_ints({1}, std::vector<int32_t>{out.ok ? 1 : 0});
  grid_.world().broadcast(ok, 0);
  out.ok = ok.data<int32_t>()[0] == 1;
  if (out.ok) out.path = final_dir;
  if (!out.ok && out.error.empty()) out.error = "the save failed (rank 0 reports why)";
  out.seconds = seconds_since(p->start);
  return out;
}

}  // namespace moeforge::checkpoint
