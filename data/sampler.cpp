#include "data/sampler.h"

#include <algorithm>
#include <bit>
#include <vector>

#include "runtime/error.h"

namespace moeforge::data {

namespace {

constexpr int kFeistelRounds = 6;

// A pseudo-random permutation of [0, n) for one epoch, evaluated one index at a time.
//
// A balanced Feistel network on 2h bits (2^(2h) >= n, h >= 1) is a bijection of [0, 2^(2h))
// whatever its round function; here round r maps the right half R to the low h bits of
// Philox(counter = (R, r, epoch), key). Cycle walking (re-applying the network until the value
// lands in [0, n)) restricts a bijection of a superset to a bijection of [0, n): the walk from
// x < n follows x's cycle and stops at the next member below n. Since 2^(2h) < 4n (for n > 1),
// a walk takes fewer than 4 steps on average.
class EpochPermutation {
 public:
  EpochPermutation(uint64_t n, PhiloxKey key, uint64_t epoch) : n_(n), key_(key), epoch_(epoch) {
    const int bits = std::bit_width(n - 1);  // bits of the largest index
    half_ = std::max(1, (bits + 1) / 2);
    mask_ = (uint64_t{1} << half_) - 1;
  }

  uint64_t operator()(uint64_t j) const {
    uint64_t x = j;
    do {
      x = feistel(x);
    } while (x >= n_);
    return x;
  }

 private:
  uint64_t feistel(uint64_t x) const {
    uint64_t left = x >> half_, right = x & mask_;
    for (uint32_t r = 0; r < kFeistelRounds; ++r) {
      const PhiloxBlock b = philox4x32(
          {static_cast<uint32_t>(right), r, static_cast<uint32_t>(epoch_), static_cast<uint32_t>(epoch_ >> 32)}, key_);
      const uint64_t f = (static_cast<uint64_t>(b[1]) << 32 | b[0]) & mask_;
      const uint64_t next_right = left ^ f;
      left = right;
      right = next_right;
    }
    return left << half_ | right;
  }

  uint64_t n_;
  PhiloxKey key_;
  uint64_t epoch_;
  int half_ = 1;
  uint64_t mask_ = 1;
};

}  // namespace

Sampler::Sampler(const TokenDataset& dataset, int64_t seq_len, uint64_t seed)
    : dataset_(dataset), seq_len_(seq_len), seed_(seed), key_(philox_key(seed, "data.sampler")) {
  MOE_CHECK(seq_len >= 1, "Sampler: seq_len must be >= 1, got {}", seq_len);
  const int64_t total = dataset.size();
  samples_per_epoch_ = total >= 1 ? static_cast<uint64_t>((total - 1) / seq_len) : 0;
  MOE_CHECK(samples_per_epoch_ > 0, "dataset of {} tokens is too small for seq_len {}", total, seq_len);
}

int64_t Sampler::window_start(uint64_t global_index) const {
  const uint64_t epoch = global_index / samples_per_epoch_;
  const uint64_t j = global_index % samples_per_epoch_;
  const EpochPermutation perm(samples_per_epoch_, key_, epoch);
  return static_cast<int64_t>(perm(j)) * seq_len_;
}

void Sampler::fill(uint64_t global_index, int32_t* tokens, int32_t* targets) const {
  const int64_t start = window_start(global_index);
  dataset_.copy(start, seq_len_, tokens);
  dataset_.copy(start + 1, seq_len_, targets);
}

void Sampler::fill_batch(uint64_t first_global_index, int64_t count, const Tensor& tokens,
                         const Tensor& targets) const {
  const Shape want{count, seq_len_};
  for (const Tensor* t : {&tokens, &targets}) {
    MOE_CHECK(t->defined() && t->device().is_cpu() && t->dtype() == DType::kI32 && t->shape() == want,
              "Sampler::fill_batch: {} must be a CPU i32 tensor of shape {}, got {}",
              t == &tokens ? "tokens" : "targets", want.str(), t->defined() ? t->str() : "undefined");
  }
  int32_t* tok = tokens.data<int32_t>();
  int32_t* tgt = targets.data<int32_t>();
  for (int64_t b = 0; b < count; ++b) {
    fill(first_global_index + static_cast<uint64_t>(b), tok + b * seq_len_, tgt + b * seq_len_);
  }
}

SampleRange dp_slice(int64_t step, int64_t global_batch, int dp, int rank) {
  MOE_CHECK(step >= 0, "dp_slice: step must be >= 0, got {}", step);
  MOE_CHECK(global_batch >= 1, "dp_slice: global batch must be >= 1, got {}", global_batch);
  MOE_CHECK(dp >= 1 && rank >= 0 && rank < dp, "dp_slice: rank {} is outside the data-parallel group of size {}", rank,
            dp);
  MOE_CHECK(global_batch % dp == 0, "global batch {} is not divisible by the data-parallel size {}", global_batch, dp);
  const int64_t per_rank = global_batch / dp;
  return {static_cast<uint64_t>(step) * static_cast<uint64_t>(global_batch) + static_cast<uint64_t>(rank * per_rank),
          per_rank};
}

}  // namespace moeforge::data
