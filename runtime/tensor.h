// Tensor: a handle to a contiguous row-major array of up to 5 dims on one device.
//
// Invariants:
//  - Always contiguous. Views are only slices along dim 0 (rows) and reshapes; both share the
//    storage and differ only in offset and shape. Ops that need a transpose take a flag.
//  - A Tensor is a handle (like a shared_ptr): copying it copies the handle, not the data, and
//    constness is of the handle. Ops therefore take outputs as `const Tensor&` too, which lets
//    callers pass views such as `y.rows(a, b)` directly.
//  - data<T>() checks that T matches the dtype; on a CUDA tensor it returns a device pointer.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/dtype.h"
#include "runtime/error.h"

namespace moeforge {

class Shape {
 public:
  static constexpr int kMaxDims = 5;

  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  explicit Shape(std::span<const int64_t> dims);

  int ndim() const { return ndim_; }
  // Negative indices count from the end, as in Python.
  int64_t operator[](int i) const;
  int64_t numel() const;
  std::span<const int64_t> dims() const { return {dims_.data(), static_cast<size_t>(ndim_)}; }
  std::string str() const;  // "(2, 3, 4)"

  bool operator==(const Shape& o) const;

 private:
  std::array<int64_t, kMaxDims> dims_{};
  int ndim_ = 0;
};

// A device allocation shared by every view of it.
class Storage {
 public:
  Storage(size_t bytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
};

class Tensor {
 public:
  Tensor() = default;  // undefined: no storage; defined() is false

  static Tensor empty(const Shape& shape, DType dtype, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype, Device device = Device::cpu());
  // CPU tensors filled from host values (tests, small tables). The value count must match.
  static Tensor from_floats(const Shape& shape, std::span<const float> values);
  static Tensor from_ints(const Shape& shape, std::span<const int32_t> values);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return shape_.ndim(); }
  int64_t dim(int i) const { return shape_[i]; }
  int64_t numel() const { return shape_.numel(); }
  DType dtype() const { return dtype_; }
  Device device() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  // "f32(2, 3) cpu" — used in error messages.
  std::string str() const;

  void* raw_data() const;
  template <class T>
  T* data() const {
    MOE_CHECK(dtype_of<T> == dtype_, "Tensor::data: tensor is {}, accessed as {}",
              dtype_name(dtype_), dtype_name(dtype_of<T>));
    return static_cast<T*>(raw_data());
  }

  // View of rows [begin, end) along dim 0.
  Tensor rows(int64_t begin, int64_t end) const;
  // View with a new shape of the same element count.
  Tensor reshape(const Shape& shape) const;
  bool shares_storage(const Tensor& other) const { return storage_ && storage_ == other.storage_; }

  // Deep copy (same device, same dtype).
  Tensor clone() const;
  // CPU only: values converted to fp32 / to another dtype (round-to-nearest-even for 16-bit).
  Tensor to(DType dtype) const;
  std::vector<float> to_floats() const;
  // Copy on another device (CPU <-> CUDA, or the same device), same dtype and shape. A copy to
  // the host waits for the device; a copy to a device is ordered on its compute stream.
  Tensor to_device(Device device) const;

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // elements from the start of the storage
  Shape shape_;
  DType dtype_ = DType::kF32;
};

}  // namespace moeforge
