// Tests checkpoint/hdf5_io.cpp: blocks round-trip exactly with their attributes, hyperslab reads
// land at the requested place of a larger buffer, a flipped byte in a chunk fails the read with
// an error naming the file, the dataset and the Fletcher-32 check, a non-f32 dataset and a
// missing file are named clearly.
#include <gtest/gtest.h>

#include <fstream>

#include "checkpoint/hdf5_io.h"
#include "tests/data/temp_dir.h"
#include "tests/testing.h"

namespace moeforge::checkpoint {
namespace {

std::vector<float> iota(int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = 0.5f * static_cast<float>(i) - 3.25f;
  return v;
}

TEST(Hdf5Io, RoundTripWithAttributesAndHyperslabs) {
  testing::TempDir dir;
  const std::vector<float> a = iota(5 * 7 * 3);
  {
    H5File f = H5File::create(dir / "f.h5");
    f.write("param/layers.0.moe.experts.w1", a.data(), std::vector<int64_t>{5, 7, 3},
            {"layers.0.moe.experts.w1", "param", {10, 7, 3}, {5, 0, 0}});
    f.close();
  }
  const H5File f = H5File::open(dir / "f.h5");
  EXPECT_EQ(f.datasets(), (std::vector<std::string>{"param/layers.0.moe.experts.w1"}));
  EXPECT_EQ(f.f32_shape("param/layers.0.moe.experts.w1"), (std::vector<int64_t>{5, 7, 3}));
  const BlockAttrs at = f.attrs("param/layers.0.moe.experts.w1");
  EXPECT_EQ(at.name, "layers.0.moe.experts.w1");
  EXPECT_EQ(at.kind, "param");
  EXPECT_EQ(at.global_shape, (std::vector<int64_t>{10, 7, 3}));
  EXPECT_EQ(at.offset, (std::vector<int64_t>{5, 0, 0}));
  // Whole dataset: bitwise equal.
  std::vector<float> whole(a.size());
  const std::vector<int64_t> zero{0, 0, 0}, shape{5, 7, 3};
  f.read("param/layers.0.moe.experts.w1", zero, shape, whole.data(), shape, zero);
  EXPECT_EQ(whole, a);
  // Box [1:3, 2:6, 1:3) placed at (0, 1, 0) of a (2, 5, 2) buffer.
  std::vector<float> dst(2 * 5 * 2, -1.0f);
  f.read("param/layers.0.moe.experts.w1", std::vector<int64_t>{1, 2, 1}, std::vector<int64_t>{2, 4, 2}, dst.data(),
         std::vector<int64_t>{2, 5, 2}, std::vector<int64_t>{0, 1, 0});
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 5; ++j)
      for (int k = 0; k < 2; ++k) {
        const float want = j == 0 ? -1.0f : a[static_cast<size_t>(((1 + i) * 7 + (2 + j - 1)) * 3 + (1 + k))];
        EXPECT_EQ(dst[static_cast<size_t>((i * 5 + j) * 2 + k)], want) << i << " " << j << " " << k;
      }
}

TEST(Hdf5Io, FlippedByteFailsFletcher32NamingFileAndDataset) {
  testing::TempDir dir;
  const std::vector<float> a = iota(4096);
  {
    H5File f = H5File::create(dir / "f.h5");
    f.write("exp_avg/w", a.data(), std::vector<int64_t>{64, 64}, {"w", "exp_avg", {64, 64}, {0, 0}});
    f.close();
  }
  // Find the data (the float pattern) in the file and flip one byte of it.
  std::string bytes = testing::read_file(dir / "f.h5");
  const std::string needle(reinterpret_cast<const char*>(a.data() + 100), 16);
  const size_t at = bytes.find(needle);
  ASSERT_NE(at, std::string::npos);
  bytes[at + 5] = static_cast<char>(bytes[at + 5] ^ 0x10);
  testing::write_file(dir / "f.h5", bytes);
  const H5File f = H5File::open(dir / "f.h5");
  std::vector<float> out(a.size());
  const std::vector<int64_t> zero{0, 0}, shape{64, 64};
  const std::string msg = testing::error_of([&] { f.read("exp_avg/w", zero, shape, out.data(), shape, zero); });
  EXPECT_NE(msg.find(dir / "f.h5"), std::string::npos) << msg;
  EXPECT_NE(msg.find("dataset exp_avg/w"), std::string::npos) << msg;
  EXPECT_NE(msg.find("checksum"), std::string::npos) << msg;
}

TEST(Hdf5Io, WrongDtypeAndMissingFileAreNamed) {
  testing::TempDir dir;
  {
    // A f64 dataset written with the plain HDF5 API.
    const hid_t file = H5Fcreate((dir / "d.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    const hsize_t n = 4;
    const hid_t space = H5Screate_simple(1, &n, nullptr);
    const hid_t ds = H5Dcreate2(file, "x", H5T_IEEE_F64LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    const double v[4] = {1, 2, 3, 4};
    H5Dwrite(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
    H5Dclose(ds);
    H5Sclose(space);
    H5Fclose(file);
  }
  const H5File f = H5File::open(dir / "d.h5");
  EXPECT_EQ(testing::error_of([&] { f.f32_shape("x"); }),
            fmt::format("{}: dataset x: holds float of 8 bytes elements, expected f32", dir / "d.h5"));
  EXPECT_EQ(testing::error_of([&] { f.f32_shape("nope"); }),
            fmt::format("{}: dataset nope: no such dataset in the shard file", dir / "d.h5"));
  EXPECT_EQ(testing::error_of([&] { H5File::open(dir / "missing.h5"); }),
            fmt::format("{}: shard file is missing", dir / "missing.h5"));
}

}  // namespace
}  // namespace moeforge::checkpoint
