// The deterministic training sampler.
//
// A sample is a window of seq_len + 1 consecutive tokens of the dataset's stream: inputs are
// its first seq_len tokens, targets the last seq_len (the next-token shift). The stream is cut
// into S = (total_tokens - 1) / seq_len non-overlapping window starts 0, L, 2L, ... (each
// window borrows one token of the next for its last target). Global sample g belongs to epoch
// e = g / S and is window perm_e(g % S), where perm_e is a pseudo-random permutation of [0, S)
// that depends only on (seed, e). So every epoch visits every window exactly once, in a new
// order, and sample g is a pure function of (dataset, seq_len, seed, g).
//
// Training position. The trainer's whole data state is one integer, the next global sample
// index (checkpoints store it). Step s with global batch G consumes global samples
// [s*G, (s+1)*G); DP rank r of dp takes the contiguous slice dp_slice(s, G, dp, r). The
// concatenation of the rank slices in rank order is the same list of samples for every dp, so
// the DP size never changes what is trained on, only who computes it. Micro-batches split a
// rank's slice further, again without changing the samples.
//
// The permutation is computed per index (a Feistel network keyed by Philox, with cycle
// walking), never stored, so it costs O(1) memory for any dataset size. A Sampler only reads
// its dataset; fill() and fill_batch() are safe to call from several threads.
#pragma once

#include <cstdint>

#include "data/token_shard.h"
#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace moeforge::data {

class Sampler {
 public:
  // The dataset must outlive the sampler.
  Sampler(const TokenDataset& dataset, int64_t seq_len, uint64_t seed);

  int64_t seq_len() const { return seq_len_; }
  uint64_t seed() const { return seed_; }
  uint64_t samples_per_epoch() const { return samples_per_epoch_; }

  // First stream token of global sample g's window (a multiple of seq_len).
  int64_t window_start(uint64_t global_index) const;

  // tokens[0, seq_len) = stream[start, start + L), targets[0, seq_len) = stream[start + 1, start + L + 1).
  void fill(uint64_t global_index, int32_t* tokens, int32_t* targets) const;

  // Samples first_global_index + b for b in [0, count): tokens and targets are CPU i32
  // tensors of shape (count, seq_len).
  void fill_batch(uint64_t first_global_index, int64_t count, const Tensor& tokens, const Tensor& targets) const;

 private:
  const TokenDataset& dataset_;
  int64_t seq_len_;
  uint64_t seed_;
  PhiloxKey key_;  // of the stream "data.sampler" under seed_
  uint64_t samples_per_epoch_;
};

// Global sample indices of one DP rank in one step: [first, first + count).
struct SampleRange {
  uint64_t first = 0;
  int64_t count = 0;
};

// Step `step` with global batch G on DP rank `rank` of `dp`:
// [step*G + rank*G/dp, step*G + (rank+1)*G/dp). G must be divisible by dp.
SampleRange dp_slice(int64_t step, int64_t global_batch, int dp, int rank);

}  // namespace moeforge::data
