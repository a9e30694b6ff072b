// CPU kernels of the dense per-token ops: embedding, RMSNorm, rotary position embedding, SwiGLU
// and the softmax cross-entropy, fused or vocab-parallel (see runtime/ops.h for the contracts;
// arguments arrive validated by runtime/ops_dense.cpp, except the index values, which only the
// kernel reads).
//
// One file per op family: embedding.cpp, rmsnorm.cpp, rope.cpp, swiglu.cpp, cross_entropy.cpp.
//
// Threads: OpenMP over rows (or over vocabulary rows / column blocks where a gradient is
// reduced), with `if` clauses so small inputs stay serial. Every reduction runs in an order fixed
// by the shapes alone, so results are bitwise identical for any thread count.
#pragma once

#include "runtime/tensor.h"

namespace moeforge::cpu {

// vocab_size is resolved (>= 1) by the op; the kernels check the id values against it.
void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out, int64_t vocab_start,
                   int64_t vocab_size);
void embedding_bwd(const Tensor& ids, const Tensor& dout, const Tensor& dtable, int64_t vocab_start,
                   int64_t vocab_size);

void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, const Tensor& out, const Tensor& rstd);
void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dout, const Tensor& dx,
                 const Tensor& dw);

void rope_fwd(const Tensor& x, float theta, const Tensor& out);
void rope_bwd(const Tensor& dout, float theta, const Tensor& dx);

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out);
void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dout, const Tensor& dgate, const Tensor& dup);

void cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& losses, const Tensor& lse);
void cross_entropy_partial_fwd(const Tensor& logits, const Tensor& targets, int64_t vocab_start, int64_t valid_cols,
                               const Tensor& partial);
void cross_entropy_combine(const Tensor& partials, const Tensor& targets, int64_t vocab_size, const Tensor& losses,
                           const Tensor& lse);
// valid_cols = -1: the whole vocabulary, and the targets are checked against it.
void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits, int64_t vocab_start, int64_t valid_cols);

}  // namespace moeforge::cpu
