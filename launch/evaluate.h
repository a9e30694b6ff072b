// `moeforge eval CKPT --data DIR`: the loss and perplexity of a checkpoint on held-out token
// shards, on any layout.
//
// The shards of DIR are one token stream (data/token_shard.h); it is cut into consecutive,
// non-overlapping windows of seq_len + 1 tokens (each window's last token is the next one's
// first), and every target of every window is scored once: loss = mean cross-entropy over all
// of them (nats/token), perplexity = exp(loss). The checkpoint is loaded, whatever layout wrote
// it, into the job's layout (tp, ep, dp = world / tp; pp 1) and each DP rank runs
// MoeTransformer::forward on its share of the micro-batches; the sums are all-reduced over DP.
// Every rank runs the same number of micro-batches (a short last share is padded with ignored
// targets), since expert parallelism makes forward a collective across DP ranks.
#pragma once

#include <cstdint>
#include <string>

namespace moeforge {

struct EvalCommand {
  std::string checkpoint;
  std::string data;
  int tp = 1, ep = 1;
  int64_t seq_len = 0;      // 0: the checkpoint's train.seq_len
  int64_t micro_batch = 8;  // windows per forward
  int64_t max_tokens = 0;   // 0: all; else the first windows covering at most this many targets
};

struct EvalResult {
  double loss = 0.0;        // nats per target token
  double perplexity = 0.0;
  int64_t tokens = 0;       // targets scored
  int64_t windows = 0;
};

// Collective over the world when run under MPI. Prints the result on rank 0.
EvalResult run_eval(const EvalCommand& c);

}  // namespace moeforge
