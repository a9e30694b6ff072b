#include "runtime/op_checks.h"

#include "runtime/ops.h"

namespace moeforge::ops::detail {

void check_dtype(std::string_view op, NamedTensor t, DType dtype) {
  MOE_CHECK(t.t.defined(), "{}: {} is undefined", op, t.name);
  MOE_CHECK(t.t.dtype() == dtype, "{}: {} must be {}, got {} with shape {}", op, t.name, dtype_name(dtype),
            dtype_name(t.t.dtype()), t.t.shape().str());
}

void check_float(std::string_view op, NamedTensor t) {
  MOE_CHECK(t.t.defined(), "{}: {} is undefined", op, t.name);
  MOE_CHECK(t.t.dtype() == DType::kF32 || t.t.dtype() == DType::kBF16, "{}: {} must be f32 or bf16, got {} with shape {}",
            op, t.name, dtype_name(t.t.dtype()), t.t.shape().str());
}

void check_same_dtype(std::string_view op, NamedTensor t, NamedTensor ref) {
  MOE_CHECK(t.t.defined(), "{}: {} is undefined", op, t.name);
  MOE_CHECK(t.t.dtype() == ref.t.dtype(), "{}: {} is {} but {} is {}; they must have the same dtype", op, t.name,
            dtype_name(t.t.dtype()), ref.name, dtype_name(ref.t.dtype()));
}

Widened::Widened(const Tensor& t, Use use) : orig_(t), use_(use) {
  // CUDA kernels take bf16 themselves (runtime/cuda: loads widen, stores round once).
  if (!t.defined() || t.dtype() != DType::kBF16 || t.device().is_cuda()) {
    wide_ = t;
    return;
  }
  wide_ = Tensor::empty(t.shape(), DType::kF32, t.device());
  if (use != kOut) ops::cast(t, wide_);
}

void Widened::finish() const {
  if (use_ != kIn && orig_.defined() && !orig_.shares_storage(wide_)) ops::cast(wide_, orig_);
}

Device check_same_device(std::string_view op, std::initializer_list<NamedTensor> ts) {
  const NamedTensor* first = nullptr;
  for (const NamedTensor& nt : ts) {
    MOE_CHECK(nt.t.defined(), "{}: {} is undefined", op, nt.name);
    if (!first) {
      first = &nt;
      continue;
    }
    MOE_CHECK(nt.t.device() == first->t.device(), "{}: {} is on {} but {} is on {}", op, nt.name,
              nt.t.device().str(), first->name, first->t.device().str());
  }
  return first ? first->t.device() : Device::cpu();
}

void check_shape(std::string_view op, NamedTensor t, const Shape& expected, NamedTensor ref) {
  MOE_CHECK(t.t.shape() == expected, "{}: {} has shape {} but {} has shape {}; expected {} of shape {}", op, t.name,
            t.t.shape().str(), ref.name, ref.t.shape().str(), t.name, expected.str());
}

void check_ndim(std::string_view op, NamedTensor t, int ndim) {
  MOE_CHECK(t.t.ndim() == ndim, "{}: {} must have {} dims, got shape {}", op, t.name, ndim, t.t.shape().str());
}

void check_same_shape(std::string_view op, NamedTensor t, NamedTensor ref) {
  check_shape(op, t, ref.t.shape(), ref);
}

void no_backend(std::string_view op, Device device) {
  MOE_THROW("{}: the tensors are on {}, and this build has no kernel of this op for that device", op, device.str());
}

}  // namespace moeforge::ops::detail
