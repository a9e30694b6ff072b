#include "launch/evaluate.h"

#include <cmath>

#include <fmt/format.h>

#include "checkpoint/files.h"
#include "checkpoint/load.h"
#include "data/token_shard.h"
#include "launch/config.h"
#include "models/transformer.h"
#include "parallel/mpi_runtime.h"

namespace moeforge {

EvalResult run_eval(const EvalCommand& c) {
  MpiRuntime mpi;
  const std::string step_dir = checkpoint::resolve_checkpoint(c.checkpoint);
  const checkpoint::Manifest m = checkpoint::read_manifest(step_dir);
  const ModelConfig cfg = model_config_from(m.config());
  const int world = mpi.world_size();
  MOE_CHECK(c.tp >= 1 && world % c.tp == 0, "--tp {} does not divide the {} ranks", c.tp, world);
  const ProcessGrid grid = ProcessGrid::create(
      mpi, {.tp = c.tp, .pp = 1, .dp = world / c.tp, .ep = c.ep}, m.config().parallel().collective_timeout_s());
  const int64_t L = c.seq_len > 0 ? c.seq_len : m.config().train().seq_len();
  MOE_CHECK(L > 0 && c.micro_batch > 0, "eval: --seq-len and --micro-batch must be positive");
  const data::TokenDataset data(c.data, cfg.vocab_size);
  int64_t windows = (data.size() - 1) / L;
  if (c.max_tokens > 0) windows = std::min(windows, std::max<int64_t>(1, c.max_tokens / L));
  MOE_CHECK(windows > 0, "{}: {} tokens do not make one window of {} + 1", c.data, data.size(), L);

  MoeTransformer model(cfg, grid);
  checkpoint::load(step_dir, model.registry(), nullptr);
  const int64_t B = c.micro_batch, batches = (windows + B - 1) / B;
  const int dp = grid.dp().size(), me = grid.dp().rank();
  const int64_t per_rank = (batches + dp - 1) / dp;
  const Tensor tokens = Tensor::empty({B, L}, DType::kI32), targets = Tensor::empty({B, L}, DType::kI32);
  std::vector<int32_t> window(static_cast<size_t>(L + 1));
  double sum = 0.0;
  for (int64_t k = 0; k < per_rank; ++k) {
    const int64_t b = me + k * dp;  // batches dp_rank, dp_rank + dp, ...
    for (int64_t r = 0; r < B; ++r) {
      const int64_t w = b * B + r;
      int32_t* tk = tokens.data<int32_t>() + r * L;
      int32_t* tg = targets.data<int32_t>() + r * L;
      if (w < windows) {
        data.copy(w * L, L + 1, window.data());
        std::copy_n(window.begin(), L, tk);
        std::copy_n(window.begin() + 1, L, tg);
      } else {  // padding: scored by nobody
        std::fill_n(tk, L, 0);
        std::fill_n(tg, L, -1);
      }
    }
    const LossReport rep = model.forward(tokens, targets);
    sum += rep.ce * static_cast<double>(rep.targets);
  }
  // Every target of a real window is scored (token ids are never negative), so the count is
  // windows * L; only the loss sums travel.
  const Tensor parts = Tensor::from_floats({1}, std::vector<float>{static_cast<float>(sum)});
  if (dp > 1) grid.dp().all_reduce(parts);
  EvalResult r;
  r.tokens = windows * L;
  r.windows = windows;
  r.loss = static_cast<double>(parts.data<float>()[0]) / static_cast<double>(r.tokens);
  r.perplexity = std::exp(r.loss);
  if (grid.world_rank() == 0) {
    fmt::print("eval {} on {}: {} windows of {} tokens ({} targets) | loss {:.4f} nats/token | perplexity {:.3f} | "
               "{:.4f} bits/token\n",
               step_dir, c.data, r.windows, L, r.tokens, r.loss, r.perplexity, r.loss / std::log(2.0));
    std::fflush(stdout);
  }
  return r;
}

}  // namespace moeforge
