// GEMM on cuBLASLt: c = alpha * op(a) · op(b) (+ c), with fp32 accumulation.
//
// Layout. Our tensors are row-major and cuBLASLt is column-major: a row-major (r, c) buffer is the
// column-major (c, r) matrix, its transpose. So the row-major product C = op(A) op(B) is computed
// as the column-major Cᵀ = op(B)ᵀ op(A)ᵀ: cuBLAS's first operand is b's buffer (transposed iff
// trans_b), its second a's (transposed iff trans_a), and the result lands in c's buffer as the
// column-major (N, M) matrix, i.e. the row-major (M, N) one. No copy or transpose is made.
//
// Precision. f32 x f32 -> f32 uses CUBLAS_COMPUTE_32F (true fp32: the fp32 test mode compares
// against the CPU to 1e-5, which TF32's 10-bit mantissa cannot meet). bf16 x bf16 -> bf16 or f32
// uses CUBLAS_COMPUTE_32F too: bf16 products accumulated in fp32 on the tensor cores.
#include <cublasLt.h>

#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/kernels.h"
#include "runtime/op_checks.h"

namespace moeforge::cuda {
namespace {

cudaDataType_t cuda_type(const Tensor& t) {
  switch (t.dtype()) {
    case DType::kF32: return CUDA_R_32F;
    case DType::kBF16: return CUDA_R_16BF;
    case DType::kF16: return CUDA_R_16F;
    default: break;
  }
  MOE_THROW("gemm: no cuBLAS type for {}", t.str());
}

// Owns the cuBLASLt descriptors of one call.
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, bool accumulate,
          float alpha) {
  using ops::detail::matrix_cols;
  using ops::detail::matrix_rows;
  const bool f32 = a.dtype() == DType::kF32 && b.dtype() == DType::kF32 && c.dtype() == DType::kF32;
  const bool bf16 = a.dtype() == DType::kBF16 && b.dtype() == DType::kBF16 &&
                    (c.dtype() == DType::kBF16 || c.dtype() == DType::kF32);
  MOE_CHECK(f32 || bf16, "gemm: CUDA supports f32 x f32 -> f32 and bf16 x bf16 -> bf16 or f32, got a {} b {} c {}",
            a.str(), b.str(), c.str());
  const int64_t m = matrix_rows(c);
  const int64_t n = matrix_cols(c);
  const int64_t k = trans_a ? matrix_rows(a) : matrix_cols(a);
  MOE_CHECK((trans_b ? matrix_cols(b) : matrix_rows(b)) == k && (trans_a ? matrix_cols(a) : matrix_rows(a)) == m &&
                (trans_b ? matrix_rows(b) : matrix_cols(b)) == n,
            "gemm: shapes do not chain: op(a) of {} (trans_a={}), op(b) of {} (trans_b={}), c {}", a.str(), trans_a,
            b.str(), trans_b, c.str());
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) fill(c, 0.0f);
    return;
  }
  DeviceContext& ctx = context(c.device().index);

  LtDescriptors d;
  MOE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // cuBLAS operand 1 is b's buffer, operand 2 is a's (see the layout note above).
  const cublasOperation_t op1 = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op2 = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  MOE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op1, sizeof(op1)));
  MOE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op2, sizeof(op2)));
  // Column-major views: b's buffer is (cols(b), rows(b)), a's is (cols(a), rows(a)), c's is (N, M).
  MOE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, cuda_type(b), static_cast<uint64_t>(matrix_cols(b)),
                                              static_cast<uint64_t>(matrix_rows(b)), matrix_cols(b)));
  MOE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, cuda_type(a), static_cast<uint64_t>(matrix_cols(a)),
                                              static_cast<uint64_t>(matrix_rows(a)), matrix_cols(a)));
  MOE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, cuda_type(c), static_cast<uint64_t>(n),
                                              static_cast<uint64_t>(m), n));
  MOE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
  MOE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                        &ctx.workspace_bytes, sizeof(ctx.workspace_bytes)));
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  MOE_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(ctx.lt, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &heuristic, &found));
  MOE_CHECK(found > 0, "gemm: cuBLASLt has no algorithm for a {} (trans {}) x b {} (trans {}) -> c {}", a.str(),
            trans_a, b.str(), trans_b, c.str());
  const float beta = accumulate ? 1.0f : 0.0f;
  MOE_CUBLAS_CHECK(cublasLtMatmul(ctx.lt, d.op, &alpha, b.raw_data(), d.a, a.raw_data(), d.b, &beta, c.raw_data(),
                                  d.c, c.raw_data(), d.c, &heuristic.algo, ctx.workspace, ctx.workspace_bytes,
                                  ctx.stream));
}

}  // namespace moeforge::cuda
