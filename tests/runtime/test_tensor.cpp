// Tests runtime/tensor.cpp: Shape, allocation (zero-size, 64-byte alignment, device tag), row
// and reshape views sharing storage, deep clone, dtype conversion with its refusals, and the
// exact error messages users see.
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/tensor.h"

#ifdef MOEFORGE_WITH_CUDA
#include "runtime/cuda/device_alloc.h"
#endif

namespace moeforge {
namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

std::vector<float> iota(int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(i);
  return v;
}

// ---- Shape -----------------------------------------------------------------------------------

TEST(Shape, StrNumelAndIndexing) {
  const Shape s{2, 3, 4};
  EXPECT_EQ(s.ndim(), 3);
  EXPECT_EQ(s.numel(), 24);
  EXPECT_EQ(s.str(), "(2, 3, 4)");
  EXPECT_EQ(s[0], 2);
  EXPECT_EQ(s[2], 4);
  EXPECT_EQ(s[-1], 4);
  EXPECT_EQ(s[-3], 2);
  EXPECT_EQ(Shape{7}.str(), "(7)");
  EXPECT_EQ(Shape{}.str(), "()");
  EXPECT_EQ(Shape{}.numel(), 1);  // a scalar has one element
  EXPECT_EQ((Shape{5, 0, 3}.numel()), 0);
  EXPECT_EQ((Shape{1, 2, 3, 4, 5}.numel()), 120);
  EXPECT_EQ((Shape{2, 3}), (Shape{2, 3}));
  EXPECT_FALSE((Shape{2, 3}) == (Shape{3, 2}));
  EXPECT_FALSE((Shape{2, 3}) == (Shape{2, 3, 1}));
  const std::vector<int64_t> dims = {4, 1, 6};
  EXPECT_EQ(Shape(std::span<const int64_t>(dims)), (Shape{4, 1, 6}));
}

TEST(Shape, Errors) {
  EXPECT_EQ(error_of([] { Shape s{1, 2, 3, 4, 5, 6}; }), "Shape: at most 5 dims, got 6");
  EXPECT_EQ(error_of([] { Shape s{3, -2}; }), "Shape: dimension 1 is negative (-2)");
  const Shape s{2, 3};
  EXPECT_EQ(error_of([&] { (void)s[2]; }), "Shape(2, 3): dim 2 out of range");
  EXPECT_EQ(error_of([&] { (void)s[-3]; }), "Shape(2, 3): dim -3 out of range");
}

// ---- allocation ------------------------------------------------------------------------------

TEST(Tensor, EmptyZerosAndFromValues) {
  const Tensor e = Tensor::empty({2, 3}, DType::kBF16);
  EXPECT_TRUE(e.defined());
  EXPECT_EQ(e.dtype(), DType::kBF16);
  EXPECT_EQ(e.nbytes(), 12u);
  EXPECT_EQ(e.device(), Device::cpu());
  EXPECT_EQ(e.str(), "bf16(2, 3) cpu");
  EXPECT_EQ(e.dim(-1), 3);

  const Tensor z = Tensor::zeros({3, 5, 7}, DType::kI64);
  EXPECT_EQ(z.nbytes(), 3u * 5 * 7 * 8);
  for (int64_t i = 0; i < z.numel(); ++i) ASSERT_EQ(z.data<int64_t>()[i], 0) << i;

  const Tensor f = Tensor::from_floats({2, 3}, std::vector<float>{1, 2, 3, 4, 5, -6.5f});
  EXPECT_EQ(f.to_floats(), (std::vector<float>{1, 2, 3, 4, 5, -6.5f}));
  EXPECT_EQ(f.str(), "f32(2, 3) cpu");
  const Tensor n = Tensor::from_ints({4}, std::vector<int32_t>{7, -1, 0, 2147483647});
  EXPECT_EQ(n.dtype(), DType::kI32);
  EXPECT_EQ(n.data<int32_t>()[3], 2147483647);
  EXPECT_EQ(n.to_floats(), (std::vector<float>{7, -1, 0, 2147483648.0f}));

  EXPECT_EQ(error_of([] { Tensor::from_floats({2, 3}, std::vector<float>(5)); }),
            "Tensor::from_floats: shape (2, 3) needs 6 values, got 5");
  EXPECT_EQ(error_of([] { Tensor::from_ints({2}, std::vector<int32_t>(3)); }),
            "Tensor::from_ints: shape (2) needs 2 values, got 3");
}

TEST(Tensor, UndefinedTensor) {
  const Tensor t;
  EXPECT_FALSE(t.defined());
  EXPECT_EQ(t.str(), "undefined");
  EXPECT_EQ(error_of([&] { (void)t.data<float>(); }), "Tensor::raw_data: tensor is undefined");
  EXPECT_THROW((void)t.rows(0, 0), Error);
}

TEST(Tensor, StorageIs64ByteAligned) {
  for (int64_t n : {1, 3, 15, 16, 17, 100, 4097}) {
    for (DType dt : {DType::kF32, DType::kBF16, DType::kI64}) {
      const Tensor t = Tensor::empty({n}, dt);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % 64, 0u) << n << " " << dtype_name(dt);
    }
  }
}

TEST(Tensor, ZeroSizedTensors) {
  for (const Shape& s : {Shape{0}, Shape{3, 0}, Shape{0, 4, 5}}) {
    const Tensor t = Tensor::zeros(s, DType::kF32);
    EXPECT_TRUE(t.defined()) << s.str();
    EXPECT_EQ(t.numel(), 0);
    EXPECT_EQ(t.nbytes(), 0u);
    EXPECT_TRUE(t.to_floats().empty());
    const Tensor c = t.clone();
    EXPECT_EQ(c.shape(), s);
    EXPECT_EQ(t.to(DType::kBF16).shape(), s);
    EXPECT_EQ(t.reshape({0}).numel(), 0);
  }
  const Tensor t = Tensor::empty({0, 4}, DType::kF32);
  EXPECT_EQ(t.rows(0, 0).shape(), (Shape{0, 4}));
  const Tensor u = Tensor::empty({3, 0}, DType::kF32);
  EXPECT_EQ(u.rows(1, 3).shape(), (Shape{2, 0}));
  EXPECT_EQ(Tensor::from_floats({0, 2}, std::vector<float>{}).numel(), 0);
}

// ---- views -----------------------------------------------------------------------------------

TEST(Tensor, RowsViewSharesStorageAndWritesThrough) {
  const Tensor t = Tensor::from_floats({5, 3}, iota(15));
  const Tensor v = t.rows(1, 4);
  EXPECT_EQ(v.shape(), (Shape{3, 3}));
  EXPECT_TRUE(v.shares_storage(t));
  EXPECT_EQ(v.to_floats(), (std::vector<float>{3, 4, 5, 6, 7, 8, 9, 10, 11}));
  EXPECT_EQ(v.data<float>(), t.data<float>() + 3);
  v.data<float>()[0] = -1.0f;  // row 1 of t
  v.data<float>()[8] = -2.0f;  // row 3 of t
  EXPECT_EQ(t.data<float>()[3], -1.0f);
  EXPECT_EQ(t.data<float>()[11], -2.0f);
  EXPECT_EQ(t.data<float>()[12], 12.0f);  // row 4 untouched
  // An empty view at the end is legal.
  EXPECT_EQ(t.rows(5, 5).numel(), 0);
}

TEST(Tensor, NestedRowsViewsOfA3DTensor) {
  const Tensor t = Tensor::from_floats({6, 2, 2}, iota(24));
  const Tensor a = t.rows(1, 6);  // rows 1..5
  const Tensor b = a.rows(2, 4);  // rows 3..4 of t
  EXPECT_EQ(b.shape(), (Shape{2, 2, 2}));
  EXPECT_TRUE(b.shares_storage(t));
  EXPECT_EQ(b.to_floats(), (std::vector<float>{12, 13, 14, 15, 16, 17, 18, 19}));
  const Tensor c = b.rows(1, 2);  // row 4 of t
  c.data<float>()[3] = 100.0f;
  EXPECT_EQ(t.data<float>()[19], 100.0f);
  EXPECT_EQ(a.data<float>()[4 * 3 + 3], 100.0f);
}

TEST(Tensor, ReshapeViews) {
  const Tensor t = Tensor::from_floats({2, 3, 4}, iota(24));
  const Tensor r = t.reshape({6, 4});
  EXPECT_TRUE(r.shares_storage(t));
  EXPECT_EQ(r.shape(), (Shape{6, 4}));
  r.data<float>()[23] = -5.0f;
  EXPECT_EQ(t.data<float>()[23], -5.0f);
  // Reshape of a rows view keeps the view's offset; rows of a reshape index the new dim 0.
  const Tensor rr = t.rows(1, 2).reshape({3, 4}).rows(1, 2);
  EXPECT_EQ(rr.to_floats(), (std::vector<float>{16, 17, 18, 19}));
  rr.data<float>()[0] = 0.5f;
  EXPECT_EQ(t.data<float>()[16], 0.5f);
  EXPECT_EQ(t.reshape({24}).reshape({1, 2, 3, 4}).to_floats(), t.to_floats());
}

TEST(Tensor, ViewErrors) {
  const Tensor t = Tensor::empty({2, 3}, DType::kF32);
  EXPECT_EQ(error_of([&] { (void)t.reshape({4, 2}); }),
            "Tensor::reshape: cannot view f32(2, 3) cpu as (4, 2) (6 vs 8 elements)");
  const Tensor u = Tensor::empty({4, 3}, DType::kF32);
  EXPECT_EQ(error_of([&] { (void)u.rows(2, 5); }), "Tensor::rows: [2, 5) out of range for f32(4, 3) cpu");
  EXPECT_EQ(error_of([&] { (void)u.rows(3, 2); }), "Tensor::rows: [3, 2) out of range for f32(4, 3) cpu");
  EXPECT_EQ(error_of([&] { (void)u.rows(-1, 2); }), "Tensor::rows: [-1, 2) out of range for f32(4, 3) cpu");
  // Bounds are those of the view, not of the storage behind it.
  EXPECT_EQ(error_of([&] { (void)u.rows(1, 3).rows(0, 3); }),
            "Tensor::rows: [0, 3) out of range for f32(2, 3) cpu");
  const Tensor scalar = Tensor::empty({}, DType::kF32);
  EXPECT_THROW((void)scalar.rows(0, 1), Error);
}

TEST(Tensor, DataDtypeMismatch) {
  const Tensor t = Tensor::empty({2}, DType::kF32);
  EXPECT_EQ(error_of([&] { (void)t.data<int32_t>(); }), "Tensor::data: tensor is f32, accessed as i32");
  const Tensor h = Tensor::empty({2}, DType::kF16);
  EXPECT_EQ(error_of([&] { (void)h.data<bf16>(); }), "Tensor::data: tensor is f16, accessed as bf16");
  EXPECT_NO_THROW((void)h.data<f16>());
}

// ---- copies and conversion -----------------------------------------------------------------

TEST(Tensor, CloneIsDeep) {
  const Tensor t = Tensor::from_floats({4, 2}, iota(8));
  const Tensor c = t.clone();
  EXPECT_FALSE(c.shares_storage(t));
  EXPECT_EQ(c.to_floats(), t.to_floats());
  c.data<float>()[0] = 42.0f;
  EXPECT_EQ(t.data<float>()[0], 0.0f);
  // A clone of a view holds just the view's elements.
  const Tensor cv = t.rows(2, 4).clone();
  EXPECT_EQ(cv.to_floats(), (std::vector<float>{4, 5, 6, 7}));
  cv.data<float>()[0] = -1.0f;
  EXPECT_EQ(t.data<float>()[4], 4.0f);
  // to() the same dtype also copies.
  const Tensor same = t.to(DType::kF32);
  EXPECT_FALSE(same.shares_storage(t));
  EXPECT_EQ(same.to_floats(), t.to_floats());
}

TEST(Tensor, IntegerConversions) {
  const Tensor a = Tensor::from_ints({3}, std::vector<int32_t>{-7, 0, 2147483647});
  const Tensor b = a.to(DType::kI64);
  EXPECT_EQ(b.dtype(), DType::kI64);
  EXPECT_EQ(b.data<int64_t>()[0], -7);
  EXPECT_EQ(b.data<int64_t>()[2], 2147483647);
  const Tensor c = b.to(DType::kI32);
  EXPECT_EQ(c.data<int32_t>()[0], -7);
  EXPECT_EQ(c.data<int32_t>()[2], 2147483647);

  Tensor big = Tensor::empty({3}, DType::kI64);
  big.data<int64_t>()[0] = -2147483648LL;  // fits
  big.data<int64_t>()[1] = 2147483648LL;   // does not
  big.data<int64_t>()[2] = 0;
  EXPECT_EQ(error_of([&] { (void)big.to(DType::kI32); }), "Tensor::to(i32): value 2147483648 at 1 does not fit");
  big.data<int64_t>()[1] = -2147483649LL;
  EXPECT_EQ(error_of([&] { (void)big.to(DType::kI32); }), "Tensor::to(i32): value -2147483649 at 1 does not fit");
}

TEST(Tensor, IntegerFloatConversionIsRefused) {
  const Tensor i = Tensor::from_ints({2}, std::vector<int32_t>{1, 2});
  const Tensor f = Tensor::from_floats({2}, std::vector<float>{1, 2});
  EXPECT_EQ(error_of([&] { (void)i.to(DType::kF32); }),
            "Tensor::to: no conversion between integer and float tensors (i32 -> f32)");
  EXPECT_EQ(error_of([&] { (void)f.to(DType::kI64); }),
            "Tensor::to: no conversion between integer and float tensors (f32 -> i64)");
  EXPECT_THROW((void)f.to(DType::kBF16).to(DType::kI32), Error);
}

TEST(Tensor, FloatConversionOfAView) {
  const Tensor t = Tensor::from_floats({3, 2}, std::vector<float>{1.0f, 2.0f, 3.0f, 1.0f + 0x1p-12f, 5.0f, 6.0f});
  const Tensor h = t.rows(1, 2).to(DType::kBF16);
  EXPECT_EQ(h.shape(), (Shape{1, 2}));
  EXPECT_EQ(h.to_floats(), (std::vector<float>{3.0f, 1.0f}));
  EXPECT_EQ(h.to(DType::kF16).to(DType::kF32).to_floats(), (std::vector<float>{3.0f, 1.0f}));
}

// ---- device tag ------------------------------------------------------------------------------

TEST(Tensor, CudaAllocationWithoutADeviceIsAnError) {
#ifdef MOEFORGE_WITH_CUDA
  if (cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  // CUDA compiled in but no device (or no driver): a clear Error naming CUDA, never a crash.
  const std::string msg = error_of([] { (void)Tensor::empty({2, 3}, DType::kF32, Device::cuda(0)); });
  EXPECT_NE(msg.find("CUDA"), std::string::npos) << msg;
  EXPECT_THROW((void)Tensor::zeros({2, 3}, DType::kF32, Device::cuda(0)), Error);
#else
  EXPECT_EQ(error_of([] { (void)Tensor::empty({2, 3}, DType::kF32, Device::cuda(0)); }),
            "cannot allocate on cuda:0: moeforge was built without CUDA (MOEFORGE_CUDA=OFF or no nvcc)");
#endif
}

TEST(Tensor, GpuTensorCarriesItsDeviceTag) {
#ifdef MOEFORGE_WITH_CUDA
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Tensor t = Tensor::empty({2, 3}, DType::kF32, Device::cuda(0));
  EXPECT_EQ(t.device(), Device::cuda(0));
  EXPECT_EQ(t.str(), "f32(2, 3) cuda:0");
  EXPECT_TRUE(t.rows(1, 2).device().is_cuda());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % 64, 0u);
  EXPECT_EQ(error_of([&] { (void)t.to_floats(); }), "Tensor::to_floats on cuda:0: copy to the host first");
  EXPECT_THROW((void)t.clone(), Error);
  EXPECT_THROW((void)t.to(DType::kBF16), Error);
  EXPECT_THROW((void)Tensor::zeros({2}, DType::kF32, Device::cuda(0)), Error);
#else
  GTEST_SKIP() << "built without CUDA";
#endif
}

}  // namespace
}  // namespace moeforge
