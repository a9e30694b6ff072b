// CPU kernels of the dense per-token ops: embedding, RMSNorm, rotary position embedding, SwiGLU
// and the fused softmax cross-entropy (see runtime/ops.h for the contracts; arguments arrive
// validated by runtime/ops_dense.cpp, except the index values, which only the kernel reads).
//
// One file per op family: embedding.cpp, rmsnorm.cpp, rope.cpp, swiglu.cpp, cross_entropy.cpp.
//
// Threads: OpenMP over rows (or over vocabulary rows / column blocks where a gradient is
// reduced), with `if` clauses so small inputs stay serial. Every reduction runs in an order fixed
// by the shapes alone, so results are bitwise identical for any thread count.
#pragma once

#include "runtime/tensor.h"

namespace moeforge::cpu {

void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out);
void embedding_bwd(const Tensor& ids, const Tensor& dout, const Tensor& dtable);

void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, const Tensor& out, const Tensor& rstd);
void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dout, const Tensor& dx,
                 const Tensor& dw);

void rope_fwd(const Tensor& x, float theta, const Tensor& out);
void rope_bwd(const Tensor& dout, float theta, const Tensor& dx);

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out);
void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dout, const Tensor& dgate, const Tensor& dup);

void cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& losses, const Tensor& lse);
void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits);

}  // namespace moeforge::cpu
