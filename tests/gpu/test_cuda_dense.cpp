// Tests the CUDA dense per-token ops (embedding, RMSNorm, RoPE, SwiGLU, cross-entropy fused and
// vocab-parallel; runtime/cuda/{embedding,rmsnorm,rope_swiglu,cross_entropy}.cu) against the CPU
// ops on random inputs of odd sizes, outputs poisoned with NaN, fp32 to 1e-5. Accumulating
// outputs (dtable, dw) start from random values on both sides.
#include <gtest/gtest.h>

#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;
using testing::random_ints;
using testing::random_tensor;

TEST(GpuDense, EmbeddingWholeTableAndShard) {
  MOE_REQUIRE_GPU();
  const int64_t n = 301, v = 97, c = 65;
  const Tensor ids = random_ints({n}, 1, 0, v);
  for (const auto& [start, rows] : {std::pair<int64_t, int64_t>{0, v}, {40, 30}}) {
    const Tensor table = random_tensor({rows, c}, 2);
    const int64_t vocab = start == 0 ? -1 : v;
    Tensor out = Tensor::empty({n, c}, DType::kF32);
    ops::embedding_fwd(ids, table, out, start, vocab);
    const Tensor gout = poisoned({n, c});
    ops::embedding_fwd(to_gpu(ids), to_gpu(table), gout, start, vocab);
    EXPECT_GPU_CLOSE(gout, out, 0.0);

    const Tensor dout = random_tensor({n, c}, 3);
    Tensor dtable = random_tensor({rows, c}, 4);
    const Tensor gdtable = to_gpu(dtable);
    ops::embedding_bwd(ids, dout, dtable, start, vocab);
    ops::embedding_bwd(to_gpu(ids), to_gpu(dout), gdtable, start, vocab);
    EXPECT_GPU_CLOSE(gdtable, dtable, kF32Tol);
  }
}

TEST(GpuDense, RmsnormForwardAndBackward) {
  MOE_REQUIRE_GPU();
  for (const auto& [n, c] : {std::pair<int64_t, int64_t>{1, 1}, {7, 33}, {300, 1000}, {5, 4096}}) {
    const Tensor x = random_tensor({n, c}, 5), w = random_tensor({c}, 6);
    Tensor out = Tensor::empty({n, c}, DType::kF32), rstd = Tensor::empty({n}, DType::kF32);
    ops::rmsnorm_fwd(x, w, 1e-5f, out, rstd);
    const Tensor gx = to_gpu(x), gw = to_gpu(w), gout = poisoned({n, c}), grstd = poisoned({n});
    ops::rmsnorm_fwd(gx, gw, 1e-5f, gout, grstd);
    EXPECT_GPU_CLOSE(gout, out, kF32Tol);
    EXPECT_GPU_CLOSE(grstd, rstd, kF32Tol);

    const Tensor dout = random_tensor({n, c}, 7);
    Tensor dx = Tensor::empty({n, c}, DType::kF32), dw = random_tensor({c}, 8);
    const Tensor gdx = poisoned({n, c}), gdw = to_gpu(dw);
    ops::rmsnorm_bwd(x, w, rstd, dout, dx, dw);
    ops::rmsnorm_bwd(gx, gw, grstd, to_gpu(dout), gdx, gdw);
    EXPECT_GPU_CLOSE(gdx, dx, kF32Tol);
    EXPECT_GPU_CLOSE(gdw, dw, kF32Tol);
  }
}

TEST(GpuDense, RopeForwardBackwardAndInPlace) {
  MOE_REQUIRE_GPU();
  const Tensor x = random_tensor({2, 37, 3, 64}, 9);
  Tensor out = Tensor::empty(x.shape(), DType::kF32);
  ops::rope_fwd(x, 10000.0f, out);
  const Tensor gout = poisoned(x.shape());
  ops::rope_fwd(to_gpu(x), 10000.0f, gout);
  EXPECT_GPU_CLOSE(gout, out, kF32Tol);
  Tensor dx = Tensor::empty(x.shape(), DType::kF32);
  ops::rope_bwd(x, 500000.0f, dx);
  const Tensor g = to_gpu(x);
  ops::rope_bwd(g, 500000.0f, g);  // dx may alias dout
  EXPECT_GPU_CLOSE(g, dx, kF32Tol);
}

TEST(GpuDense, SwigluForwardAndBackward) {
  MOE_REQUIRE_GPU();
  const Shape s{129, 77};
  const Tensor gate = random_tensor(s, 10, 8.0f), up = random_tensor(s, 11), dout = random_tensor(s, 12);
  Tensor out = Tensor::empty(s, DType::kF32), dg = Tensor::empty(s, DType::kF32), du = Tensor::empty(s, DType::kF32);
  ops::swiglu_fwd(gate, up, out);
  ops::swiglu_bwd(gate, up, dout, dg, du);
  const Tensor gout = poisoned(s), gdg = poisoned(s), gdu = poisoned(s);
  ops::swiglu_fwd(to_gpu(gate), to_gpu(up), gout);
  ops::swiglu_bwd(to_gpu(gate), to_gpu(up), to_gpu(dout), gdg, gdu);
  EXPECT_GPU_CLOSE(gout, out, kF32Tol);
  EXPECT_GPU_CLOSE(gdg, dg, kF32Tol);
  EXPECT_GPU_CLOSE(gdu, du, kF32Tol);
}

TEST(GpuDense, CrossEntropyFusedWithIgnoredTargets) {
  MOE_REQUIRE_GPU();
  for (const auto& [n, v] : {std::pair<int64_t, int64_t>{1, 1}, {33, 1000}, {8, 50257}}) {
    const Tensor logits = random_tensor({n, v}, 13, 6.0f);
    Tensor targets = random_ints({n}, 14, 0, static_cast<int32_t>(v));
    if (n > 2) targets.data<int32_t>()[1] = -1;
    Tensor losses = Tensor::empty({n}, DType::kF32), lse = Tensor::empty({n}, DType::kF32);
    ops::cross_entropy_fwd(logits, targets, losses, lse);
    const Tensor gl = to_gpu(logits), gt = to_gpu(targets), glosses = poisoned({n}), glse = poisoned({n});
    ops::cross_entropy_fwd(gl, gt, glosses, glse);
    EXPECT_GPU_CLOSE(glosses, losses, kF32Tol);
    EXPECT_GPU_CLOSE(glse, lse, kF32Tol);

    Tensor dlogits = Tensor::empty({n, v}, DType::kF32);
    ops::cross_entropy_bwd(logits, targets, lse, 0.125f, dlogits);
    ops::cross_entropy_bwd(gl, gt, glse, 0.125f, gl);  // in place over the logits
    EXPECT_GPU_CLOSE(gl, dlogits, kF32Tol);
  }
}

TEST(GpuDense, CrossEntropyVocabParallelPartialsCombineAndShardBackward) {
  MOE_REQUIRE_GPU();
  const int64_t n = 19, vl = 40, vocab = 70;  // two shards of 40 columns, the second 30 valid
  const Tensor targets = random_ints({n}, 15, -1, vocab);
  Tensor partials = Tensor::empty({2, n, 3}, DType::kF32);
  const Tensor gpartials = poisoned({2, n, 3});
  std::vector<Tensor> shards;
  for (int r = 0; r < 2; ++r) {
    shards.push_back(random_tensor({n, vl}, 16 + r, 4.0f));
    const int64_t valid = r == 0 ? vl : vocab - vl;
    ops::cross_entropy_partial_fwd(shards[r], targets, r * vl, valid, partials.rows(r, r + 1).reshape({n, 3}));
    ops::cross_entropy_partial_fwd(to_gpu(shards[r]), to_gpu(targets), r * vl, valid,
                                   gpartials.rows(r, r + 1).reshape({n, 3}));
  }
  EXPECT_GPU_CLOSE(gpartials, partials, kF32Tol);
  Tensor losses = Tensor::empty({n}, DType::kF32), lse = Tensor::empty({n}, DType::kF32);
  ops::cross_entropy_combine(partials, targets, vocab, losses, lse);
  const Tensor glosses = poisoned({n}), glse = poisoned({n});
  ops::cross_entropy_combine(gpartials, to_gpu(targets), vocab, glosses, glse);
  EXPECT_GPU_CLOSE(glosses, losses, kF32Tol);
  EXPECT_GPU_CLOSE(glse, lse, kF32Tol);
  Tensor d = Tensor::empty({n, vl}, DType::kF32);
  ops::cross_entropy_bwd(shards[1], targets, lse, 1.0f, d, vl, vocab - vl);
  const Tensor gd = poisoned({n, vl});
  ops::cross_entropy_bwd(to_gpu(shards[1]), to_gpu(targets), glse, 1.0f, gd, vl, vocab - vl);
  EXPECT_GPU_CLOSE(gd, d, kF32Tol);
}

}  // namespace
}  // namespace moeforge
