// Tensor-level CUDA elementwise ops and casts (kernels in elementwise.cu).
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/kernels.h"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda {

void fill(const Tensor& t, float value) {
  if (t.numel() == 0) return;
  MOE_CUDA_CHECK(launch::fill(t.raw_data(), t.dtype(), t.numel(), value, stream(t.device().index)));
}

void copy(const Tensor& src, const Tensor& dst) {
  if (src.nbytes() == 0) return;
  MOE_CUDA_CHECK(cudaMemcpyAsync(dst.raw_data(), src.raw_data(), src.nbytes(), cudaMemcpyDeviceToDevice,
                                 stream(dst.device().index)));
}

void add(const Tensor& a, const Tensor& b, const Tensor& out) {
  MOE_CUDA_CHECK_COMPUTE_DTYPE("add", "a", a);
  MOE_CUDA_CHECK_SAME_DTYPE("add", "b", b, "a", a);
  MOE_CUDA_CHECK_SAME_DTYPE("add", "out", out, "a", a);
  if (a.numel() == 0) return;
  MOE_CUDA_CHECK(
      launch::add(a.raw_data(), b.raw_data(), out.raw_data(), a.dtype(), a.numel(), stream(a.device().index)));
}

void add_(const Tensor& dst, const Tensor& src, float alpha) {
  MOE_CUDA_CHECK_COMPUTE_DTYPE("add_", "dst", dst);
  MOE_CUDA_CHECK_COMPUTE_DTYPE("add_", "src", src);
  if (dst.numel() == 0) return;
  MOE_CUDA_CHECK(launch::axpy(dst.raw_data(), dst.dtype(), src.raw_data(), src.dtype(), alpha, dst.numel(),
                              stream(dst.device().index)));
}

void scale_(const Tensor& t, float alpha) {
  MOE_CUDA_CHECK_COMPUTE_DTYPE("scale_", "t", t);
  if (t.numel() == 0) return;
  MOE_CUDA_CHECK(launch::scale(t.raw_data(), t.dtype(), alpha, t.numel(), stream(t.device().index)));
}

double sum_squares(const Tensor& t) {
  MOE_CUDA_CHECK_COMPUTE_DTYPE("sum_squares", "t", t);
  if (t.numel() == 0) return 0.0;
  const cudaStream_t s = stream(t.device().index);
  // Tensor has no f64 dtype: the partial sums live in an i64 tensor, 8 bytes per double.
  const Tensor scratch = Tensor::empty({launch::kSumSquaresScratch}, DType::kI64, t.device());
  auto* p = static_cast<double*>(scratch.raw_data());
  MOE_CUDA_CHECK(launch::sum_squares(t.raw_data(), t.dtype(), t.numel(), p, s));
  double result = 0.0;
  MOE_CUDA_CHECK(cudaMemcpyAsync(&result, p + launch::kSumSquaresScratch - 1, sizeof(double), cudaMemcpyDeviceToHost, s));
  MOE_CUDA_CHECK(cudaStreamSynchronize(s));
  return result;
}

void cast(const Tensor& src, const Tensor& dst) {
  MOE_CHECK(src.device() == dst.device() && src.device().is_cuda() && src.shape() == dst.shape(),
            "cast: src {} and dst {} must have the same shape and the same CUDA device", src.str(), dst.str());
  const auto is_float = [](DType t) { return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16; };
  MOE_CHECK(is_float(src.dtype()) && is_float(dst.dtype()), "cast: CUDA casts convert between f32, bf16 and f16, got {} -> {}",
            src.str(), dst.str());
  if (src.numel() == 0) return;
  if (src.dtype() == dst.dtype()) {  // a copy: exact, NaN payloads included
    if (src.raw_data() != dst.raw_data())
      MOE_CUDA_CHECK(cudaMemcpyAsync(dst.raw_data(), src.raw_data(), src.nbytes(), cudaMemcpyDeviceToDevice,
                                     stream(dst.device().index)));
    return;
  }
  MOE_CUDA_CHECK(launch::cast(src.raw_data(), src.dtype(), dst.raw_data(), dst.dtype(), src.numel(),
                              stream(dst.device().index)));
}

}  // namespace moeforge::cuda
