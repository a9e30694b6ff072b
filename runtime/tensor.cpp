#include "runtime/tensor.h"

#include <cstdlib>
#include <cstring>

#include "runtime/half.h"

#ifdef MOEFORGE_WITH_CUDA
#include "runtime/cuda/device_alloc.h"
#endif

namespace moeforge {

Shape::Shape(std::initializer_list<int64_t> dims) : Shape(std::span<const int64_t>(dims.begin(), dims.size())) {}

Shape::Shape(std::span<const int64_t> dims) {
  MOE_CHECK(dims.size() <= static_cast<size_t>(kMaxDims), "Shape: at most {} dims, got {}", kMaxDims, dims.size());
  for (size_t i = 0; i < dims.size(); ++i) {
    MOE_CHECK(dims[i] >= 0, "Shape: dimension {} is negative ({})", i, dims[i]);
    dims_[i] = dims[i];
  }
  ndim_ = static_cast<int>(dims.size());
}

int64_t Shape::operator[](int i) const {
  const int j = i < 0 ? i + ndim_ : i;
  MOE_CHECK(j >= 0 && j < ndim_, "Shape{}: dim {} out of range", str(), i);
  return dims_[j];
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= dims_[i];
  return n;
}

std::string Shape::str() const {
  std::string s = "(";
  for (int i = 0; i < ndim_; ++i) s += (i ? ", " : "") + std::to_string(dims_[i]);
  return s + ")";
}

bool Shape::operator==(const Shape& o) const {
  if (ndim_ != o.ndim_) return false;
  for (int i = 0; i < ndim_; ++i)
    if (dims_[i] != o.dims_[i]) return false;
  return true;
}

Storage::Storage(size_t bytes, Device device) : bytes_(bytes), device_(device) {
  if (device.is_cpu()) {
    // 64-byte alignment for vector loads; aligned_alloc needs a multiple of the alignment.
    const size_t padded = (bytes + 63) / 64 * 64;
    data_ = padded ? std::aligned_alloc(64, padded) : nullptr;
    MOE_CHECK(padded == 0 || data_ != nullptr, "out of host memory allocating {} bytes", bytes);
    return;
  }
#ifdef MOEFORGE_WITH_CUDA
  data_ = cuda::device_alloc(bytes, device.index);
#else
  MOE_THROW("cannot allocate on {}: moeforge was built without CUDA (MOEFORGE_CUDA=OFF or no nvcc)",
            device.str());
#endif
}

Storage::~Storage() {
  if (device_.is_cpu()) {
    std::free(data_);
    return;
  }
#ifdef MOEFORGE_WITH_CUDA
  cuda::device_free(data_, bytes_, device_.index);
#endif
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  // Zero-size tensors still get a (zero-byte) storage so that defined() holds.
  t.storage_ = std::make_shared<Storage>(static_cast<size_t>(shape.numel()) * dtype_size(dtype), device);
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  MOE_CHECK(device.is_cpu(), "Tensor::zeros on {}: use ops::fill for device tensors", device.str());
  if (t.nbytes()) std::memset(t.raw_data(), 0, t.nbytes());
  return t;
}

Tensor Tensor::from_floats(const Shape& shape, std::span<const float> values) {
  MOE_CHECK(static_cast<int64_t>(values.size()) == shape.numel(),
            "Tensor::from_floats: shape {} needs {} values, got {}", shape.str(), shape.numel(), values.size());
  Tensor t = empty(shape, DType::kF32);
  if (!values.empty()) std::memcpy(t.raw_data(), values.data(), values.size_bytes());
  return t;
}

Tensor Tensor::from_ints(const Shape& shape, std::span<const int32_t> values) {
  MOE_CHECK(static_cast<int64_t>(values.size()) == shape.numel(),
            "Tensor::from_ints: shape {} needs {} values, got {}", shape.str(), shape.numel(), values.size());
  Tensor t = empty(shape, DType::kI32);
  if (!values.empty()) std::memcpy(t.raw_data(), values.data(), values.size_bytes());
  return t;
}

Device Tensor::device() const { return storage_ ? storage_->device() : Device::cpu(); }

std::string Tensor::str() const {
  if (!defined()) return "undefined";
  return fmt::format("{}{} {}", dtype_name(dtype_), shape_.str(), device().str());
}

void* Tensor::raw_data() const {
  MOE_CHECK(defined(), "Tensor::raw_data: tensor is undefined");
  return static_cast<char*>(storage_->data()) + offset_ * dtype_size(dtype_);
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  MOE_CHECK(defined() && ndim() >= 1, "Tensor::rows: need a defined tensor with at least 1 dim, got {}", str());
  MOE_CHECK(0 <= begin && begin <= end && end <= dim(0), "Tensor::rows: [{}, {}) out of range for {}", begin,
            end, str());
  Tensor v = *this;
  const int64_t row = dim(0) ? numel() / dim(0) : 0;
  v.offset_ = offset_ + static_cast<size_t>(begin * row);
  std::array<int64_t, Shape::kMaxDims> d{};
  for (int i = 0; i < ndim(); ++i) d[i] = dim(i);
  d[0] = end - begin;
  v.shape_ = Shape(std::span<const int64_t>(d.data(), static_cast<size_t>(ndim())));
  return v;
}

Tensor Tensor::reshape(const Shape& shape) const {
  MOE_CHECK(shape.numel() == numel(), "Tensor::reshape: cannot view {} as {} ({} vs {} elements)", str(),
            shape.str(), numel(), shape.numel());
  Tensor v = *this;
  v.shape_ = shape;
  return v;
}

Tensor Tensor::clone() const {
  MOE_CHECK(device().is_cpu(), "Tensor::clone on {}: use ops::copy for device tensors", device().str());
  Tensor t = empty(shape_, dtype_, device());
  if (nbytes()) std::memcpy(t.raw_data(), raw_data(), nbytes());
  return t;
}

namespace {

float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kBF16: return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kF16: return f16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kI32: return static_cast<float>(static_cast<const int32_t*>(p)[i]);
    case DType::kI64: return static_cast<float>(static_cast<const int64_t*>(p)[i]);
  }
  return 0.0f;
}

}  // namespace

Tensor Tensor::to(DType dtype) const {
  MOE_CHECK(device().is_cpu(), "Tensor::to({}) on {}: device casts go through ops::cast", dtype_name(dtype),
            device().str());
  if (dtype == dtype_) return clone();
  const bool int_src = dtype_ == DType::kI32 || dtype_ == DType::kI64;
  const bool int_dst = dtype == DType::kI32 || dtype == DType::kI64;
  MOE_CHECK(int_src == int_dst, "Tensor::to: no conversion between integer and float tensors ({} -> {})",
            dtype_name(dtype_), dtype_name(dtype));
  Tensor t = empty(shape_, dtype, device());
  const int64_t n = numel();
  const void* src = raw_data();
  if (int_src) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = dtype_ == DType::kI32 ? static_cast<const int32_t*>(src)[i] : static_cast<const int64_t*>(src)[i];
      if (dtype == DType::kI32) {
        MOE_CHECK(v >= INT32_MIN && v <= INT32_MAX, "Tensor::to(i32): value {} at {} does not fit", v, i);
        t.data<int32_t>()[i] = static_cast<int32_t>(v);
      } else {
        t.data<int64_t>()[i] = v;
      }
    }
    return t;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float v = load_as_float(src, dtype_, i);
    switch (dtype) {
      case DType::kF32: t.data<float>()[i] = v; break;
      case DType::kBF16: t.data<bf16>()[i] = to_bf16(v); break;
      case DType::kF16: t.data<f16>()[i] = to_f16(v); break;
      default: break;
    }
  }
  return t;
}

Tensor Tensor::to_device(Device device) const {
  MOE_CHECK(defined(), "Tensor::to_device: tensor is undefined");
  if (device.is_cpu() && this->device().is_cpu()) return clone();
#ifdef MOEFORGE_WITH_CUDA
  Tensor t = empty(shape_, dtype_, device);
  if (device.is_cpu()) {
    cuda::copy_device_to_host(t.raw_data(), raw_data(), nbytes(), this->device().index);
  } else if (this->device().is_cpu()) {
    cuda::copy_host_to_device(t.raw_data(), raw_data(), nbytes(), device.index);
  } else {
    MOE_CHECK(device == this->device(), "Tensor::to_device: {} -> {}: copies between two GPUs are not supported",
              this->device().str(), device.str());
    cuda::copy_device_to_device(t.raw_data(), raw_data(), nbytes(), device.index);
  }
  return t;
#else
  MOE_THROW("Tensor::to_device: cannot copy {} to {}: moeforge was built without CUDA", str(), device.str());
#endif
}

std::vector<float> Tensor::to_floats() const {
  MOE_CHECK(device().is_cpu(), "Tensor::to_floats on {}: copy to the host first", device().str());
  std::vector<float> out(static_cast<size_t>(numel()));
  const void* src = raw_data();
  for (int64_t i = 0; i < numel(); ++i) out[static_cast<size_t>(i)] = load_as_float(src, dtype_, i);
  return out;
}

}  // namespace moeforge
