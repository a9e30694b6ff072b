// Tests checkpoint/chunks.cpp and the chunk paths of checkpoint/hdf5_io.cpp built on it:
//  - fletcher32 equals HDF5's own H5_checksum_fletcher32 (the library's exported symbol) on
//    random and worst-case (all 0xff) data of every length class, odd lengths included, and so
//    does Fletcher32 fed in random pieces;
//  - the chunks H5File::write stores are what HDF5's Fletcher-32 filter accepts: HDF5's own
//    H5Dread (the filter pipeline, which verifies every checksum) reads them back exactly,
//    partial edge chunks along leading and inner dims included;
//  - H5File::read of any sub-box crossing chunk boundaries, through the parallel chunk path,
//    equals the source, for files written by our writer and by plain H5Dwrite with the filter
//    (checkpoints of earlier versions), and a dataset of another layout falls back to H5Dread;
//  - ChunkGrid::touching and copy_box against naive loops; ordered_parallel consumes in order,
//    never runs more than `window` ahead, and passes on the first exception.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <random>

#include <unistd.h>

#include "checkpoint/chunks.h"
#include "checkpoint/direct_io.h"
#include "checkpoint/hdf5_io.h"
#include "tests/data/temp_dir.h"
#include "tests/testing.h"

// HDF5's checksum, exported by libhdf5 (H5private.h): the independent reference.
extern "C" uint32_t H5_checksum_fletcher32(const void* data, size_t len);

namespace moeforge::checkpoint {
namespace {

std::vector<float> random_floats(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = u(rng);
  return v;
}

TEST(Chunks, Fletcher32MatchesHdf5) {
  std::mt19937 rng(7);
  for (const size_t len : {0ul, 1ul, 2ul, 3ul, 719ul, 720ul, 721ul, 722ul, 1441ul, 4096ul, 100003ul, (4ul << 20) + 4}) {
    std::vector<uint8_t> bytes(len);
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
    EXPECT_EQ(fletcher32(bytes), H5_checksum_fletcher32(bytes.data(), len)) << "random, " << len << " bytes";
    std::fill(bytes.begin(), bytes.end(), 0xff);  // the largest sums: wrap-around must match too
    EXPECT_EQ(fletcher32(bytes), H5_checksum_fletcher32(bytes.data(), len)) << "0xff, " << len << " bytes";
  }
}

TEST(Chunks, Fletcher32InPiecesEqualsOneShot) {
  std::mt19937 rng(9);
  for (int trial = 0; trial < 200; ++trial) {
    const size_t len = rng() % 5000;
    std::vector<uint8_t> bytes(len);
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
    Fletcher32 f;
    size_t at = 0;
    while (at < len) {
      size_t piece = std::min<size_t>(len - at, 2 * (rng() % 900));  // even pieces ...
      if (piece == 0) piece = len - at < 2 ? len - at : 2;
      if (at + piece + 1 == len) ++piece;  // ... and an odd last one
      f.update({bytes.data() + at, piece});
      at += piece;
    }
    ASSERT_EQ(f.value(), H5_checksum_fletcher32(bytes.data(), len)) << len << " bytes, trial " << trial;
  }
  Fletcher32 f;
  const uint8_t three[3] = {1, 2, 3};
  f.update(three);
  EXPECT_EQ(testing::error_of([&] { f.update(three); }), "Fletcher32::update: only the last piece may have an odd length");
}

TEST(Chunks, ContiguousBox) {
  const std::vector<int64_t> shape{4, 5, 6};
  EXPECT_TRUE(contiguous_box(shape, std::vector<int64_t>{2, 5, 6}));
  EXPECT_TRUE(contiguous_box(shape, std::vector<int64_t>{1, 3, 6}));
  EXPECT_TRUE(contiguous_box(shape, std::vector<int64_t>{1, 1, 4}));
  EXPECT_FALSE(contiguous_box(shape, std::vector<int64_t>{2, 3, 6}));
  EXPECT_FALSE(contiguous_box(shape, std::vector<int64_t>{1, 2, 5}));
  EXPECT_FALSE(contiguous_box(shape, std::vector<int64_t>{4, 5, 5}));
}

TEST(Chunks, GridTouchingAndCopyBoxMatchNaiveLoops) {
  const ChunkGrid grid({7, 5, 9}, {3, 2, 4});
  EXPECT_EQ(grid.all().size(), 3u * 3u * 3u);
  const std::vector<int64_t> off{2, 1, 3}, cnt{4, 3, 5};
  std::vector<std::vector<int64_t>> naive;
  for (int64_t a = 0; a < 7; a += 3)
    for (int64_t b = 0; b < 5; b += 2)
      for (int64_t c = 0; c < 9; c += 4) {
        const bool hit = a < off[0] + cnt[0] && a + 3 > off[0] && b < off[1] + cnt[1] && b + 2 > off[1] &&
                         c < off[2] + cnt[2] && c + 4 > off[2];
        if (hit) naive.push_back({a, b, c});
      }
  EXPECT_EQ(grid.touching(off, cnt), naive);
  EXPECT_TRUE(grid.touching(off, std::vector<int64_t>{4, 0, 5}).empty());

  const std::vector<float> src = random_floats(7 * 5 * 9, 3);
  std::vector<float> dst(6 * 4 * 8, -1.0f);
  const std::vector<int64_t> sshape{7, 5, 9}, dshape{6, 4, 8}, at{1, 0, 2};
  copy_box(src.data(), sshape, off, dst.data(), dshape, at, std::vector<int64_t>{4, 3, 5});
  for (int64_t i = 0; i < 6; ++i)
    for (int64_t j = 0; j < 4; ++j)
      for (int64_t k = 0; k < 8; ++k) {
        const bool in = i >= 1 && i < 5 && j < 3 && k >= 2 && k < 7;
        const float want = in ? src[static_cast<size_t>(((off[0] + i - 1) * 5 + off[1] + j) * 9 + off[2] + k - 2)] : -1.0f;
        ASSERT_EQ(dst[static_cast<size_t>((i * 4 + j) * 8 + k)], want) << i << " " << j << " " << k;
      }
}

TEST(Chunks, OrderedParallelConsumesInOrderWithinTheWindow) {
  for (const int threads : {1, 2, 4}) {
    const int64_t n = 200, window = 3;
    std::mutex mu;
    int64_t consumed = 0, max_ahead = 0;
    std::vector<int64_t> order;
    std::vector<int64_t> produced(static_cast<size_t>(window), -1);
    ordered_parallel(
        n, threads, window,
        [&](int64_t i) {
          {
            std::lock_guard lock(mu);
            max_ahead = std::max(max_ahead, i - consumed);
          }
          produced[static_cast<size_t>(i % window)] = i * i;
        },
        [&](int64_t i) {
          EXPECT_EQ(produced[static_cast<size_t>(i % window)], i * i);  // the slot still holds item i
          order.push_back(i);
          std::lock_guard lock(mu);
          consumed = i + 1;
        });
    ASSERT_EQ(order.size(), static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(order[static_cast<size_t>(i)], i);
    EXPECT_LT(max_ahead, window) << threads << " threads";
  }
  // The first exception wins and stops the rest, from a producer and from the consumer.
  std::atomic<int64_t> calls{0};
  EXPECT_EQ(testing::error_of([&] {
              ordered_parallel(
                  1000, 4, 8,
                  [&](int64_t i) {
                    ++calls;
                    MOE_CHECK(i != 10, "item {} failed", i);
                  },
                  [](int64_t) {});
            }),
            "item 10 failed");
  EXPECT_LT(calls.load(), 1000);
  EXPECT_EQ(testing::error_of([&] {
              ordered_parallel(
                  100, 3, 4, [](int64_t) {}, [](int64_t i) { MOE_CHECK(i != 5, "consume {} failed", i); });
            }),
            "consume 5 failed");
}

// Reads the whole dataset with HDF5's own H5Dread (its Fletcher-32 filter checks every chunk).
std::vector<float> hdf5_read_all(const std::string& path, const std::string& name, size_t n) {
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const hid_t ds = H5Dopen2(f, name.c_str(), H5P_DEFAULT);
  std::vector<float> out(n, -7.0f);
  const herr_t rc = H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data());
  H5Dclose(ds);
  H5Fclose(f);
  EXPECT_GE(rc, 0) << "HDF5 rejected " << name;
  return out;
}

// Several chunks per dataset (4 MiB chunks): partial edge chunks along dim 0 of a matrix, and
// along the innermost dim of a tensor whose single rows exceed a chunk.
struct Case {
  std::string name;
  std::vector<int64_t> shape;
};
const std::vector<Case> kCases = {{"matrix", {1500, 1000}}, {"wide", {2, 3, 1100000}}};

TEST(Chunks, WrittenChunksAreWhatHdf5sFilterAccepts) {
  testing::TempDir dir;
  const std::string path = dir / "w.h5";
  std::vector<std::vector<float>> data;
  {
    H5File f = H5File::create(path);
    for (size_t c = 0; c < kCases.size(); ++c) {
      int64_t n = 1;
      for (const int64_t s : kCases[c].shape) n *= s;
      data.push_back(random_floats(n, 11 + static_cast<uint32_t>(c)));
      f.write("param/" + kCases[c].name, data.back().data(), kCases[c].shape, {kCases[c].name, "param", kCases[c].shape, std::vector<int64_t>(kCases[c].shape.size(), 0)});
    }
    f.close();
  }
  for (size_t c = 0; c < kCases.size(); ++c)
    EXPECT_TRUE(hdf5_read_all(path, "param/" + kCases[c].name, data[c].size()) == data[c]) << kCases[c].name;
}

TEST(Chunks, SubBoxReadsOfOurAndOfPlainHdf5FilesAndFallback) {
  testing::TempDir dir;
  const std::vector<int64_t> shape{1500, 1000};
  const std::vector<float> a = random_floats(1500 * 1000, 5);
  {
    H5File f = H5File::create(dir / "ours.h5");
    f.write("param/m", a.data(), shape, {"m", "param", shape, {0, 0}});
    f.close();
  }
  {
    // An earlier version's writer: H5Dwrite through the Fletcher-32 filter, 4 MiB chunks; and a
    // contiguous dataset without a filter.
    const hid_t f = H5Fcreate((dir / "plain.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    const hsize_t dims[2] = {1500, 1000}, chunk[2] = {1048, 1000};
    const hid_t space = H5Screate_simple(2, dims, nullptr);
    const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 2, chunk);
    H5Pset_fletcher32(dcpl);
    const hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t ds = H5Dcreate2(f, "param/m", H5T_IEEE_F32LE, space, lcpl, dcpl, H5P_DEFAULT);
    H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, a.data());
    H5Dclose(ds);
    ds = H5Dcreate2(f, "param/contiguous", H5T_IEEE_F32LE, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, a.data());
    H5Dclose(ds);
    H5Pclose(lcpl);
    H5Pclose(dcpl);
    H5Sclose(space);
    H5Fclose(f);
  }
  // Whole rows into a taller destination: each chunk (the partial last one too) is read straight
  // into place.
  for (const std::string file : {"ours.h5", "plain.h5"}) {
    const H5File f = H5File::open(dir / file);
    std::vector<float> out(1600 * 1000, -1.0f);
    const std::vector<int64_t> zero{0, 0}, tall{1600, 1000}, at{50, 0};
    f.read("param/m", zero, shape, out.data(), tall, at);
    for (int64_t i = 0; i < 1600; ++i)
      for (int64_t j = 0; j < 1000; j += 37) {
        const float want = i >= 50 && i < 1550 ? a[static_cast<size_t>((i - 50) * 1000 + j)] : -1.0f;
        ASSERT_EQ(out[static_cast<size_t>(i * 1000 + j)], want) << file << " " << i << " " << j;
      }
  }
  const std::vector<int64_t> off{1000, 123}, cnt{300, 700};  // crosses the chunk boundary at row 1048
  const std::vector<int64_t> dshape{310, 710}, at{4, 9};
  for (const auto& [file, ds] : std::vector<std::pair<std::string, std::string>>{
           {"ours.h5", "param/m"}, {"plain.h5", "param/m"}, {"plain.h5", "param/contiguous"}}) {
    const H5File f = H5File::open(dir / file);
    std::vector<float> out(310 * 710, -1.0f);
    f.read(ds, off, cnt, out.data(), dshape, at);
    for (int64_t i = 0; i < 310; ++i)
      for (int64_t j = 0; j < 710; ++j) {
        const bool in = i >= 4 && i < 304 && j >= 9 && j < 709;
        const float want = in ? a[static_cast<size_t>((off[0] + i - 4) * 1000 + off[1] + j - 9)] : -1.0f;
        ASSERT_EQ(out[static_cast<size_t>(i * 710 + j)], want) << file << " " << ds << " " << i << " " << j;
      }
  }
}

TEST(Chunks, DamagedChunkIsNamedWithItsOrigin) {
  testing::TempDir dir;
  const std::vector<int64_t> shape{1500, 1000};
  const std::vector<float> a = random_floats(1500 * 1000, 9);
  {
    H5File f = H5File::create(dir / "d.h5");
    f.write("exp_avg/m", a.data(), shape, {"m", "exp_avg", shape, {0, 0}});
    f.close();
  }
  std::string bytes = testing::read_file(dir / "d.h5");
  const size_t at = bytes.find(std::string(reinterpret_cast<const char*>(a.data() + 1200 * 1000), 64));
  ASSERT_NE(at, std::string::npos);
  bytes[at + 3] = static_cast<char>(bytes[at + 3] ^ 0x40);
  testing::write_file(dir / "d.h5", bytes);
  const H5File f = H5File::open(dir / "d.h5");
  std::vector<float> out(static_cast<size_t>(1500 * 1000));
  const std::vector<int64_t> zero{0, 0};
  const std::string msg = testing::error_of([&] { f.read("exp_avg/m", zero, shape, out.data(), shape, zero); });
  EXPECT_NE(msg.find(dir / "d.h5"), std::string::npos) << msg;
  EXPECT_NE(msg.find("dataset exp_avg/m: the chunk at (1048, 0) fails its Fletcher-32 checksum"), std::string::npos)
      << msg;
  // A read of rows in the first chunk only does not touch the damaged one.
  const std::vector<int64_t> top{1000, 1000};
  EXPECT_NO_THROW(f.read("exp_avg/m", zero, top, out.data(), top, zero));
}

// checkpoint/direct_io.h: files written with O_DIRECT chunk data are byte-for-byte those written
// through the page cache; every chunk of at least kDirectMinBytes starts at a kDirectAlign-aligned
// address (so the writes could go direct); reads give the same values both ways, and both paths
// actually ran where the file system takes O_DIRECT (the temp dir's does on these machines).
TEST(Chunks, DirectAndBufferedIoWriteTheSameFilesAndReadTheSameValues) {
  testing::TempDir dir;
  const std::vector<int64_t> big{1500, 1000}, small{7, 33};
  const std::vector<float> a = random_floats(1500 * 1000, 21), b = random_floats(7 * 33, 22);
  const bool was = direct_io_enabled();
  const auto write = [&](const std::string& path, bool direct) {
    set_direct_io(direct);
    H5File f = H5File::create(path);
    f.write("param/small", b.data(), small, {"small", "param", small, {0, 0}});
    f.write("param/big", a.data(), big, {"big", "param", big, {0, 0}});
    f.write("exp_avg/big", a.data(), big, {"big", "exp_avg", big, {0, 0}});
    f.close();
  };
  const int64_t written0 = direct_bytes_written();
  write(dir / "direct.h5", true);
  const int64_t written = direct_bytes_written() - written0;
  write(dir / "buffered.h5", false);
  EXPECT_EQ(direct_bytes_written() - written0, written) << "buffered mode wrote with O_DIRECT";
  const int probe = open_direct_read((dir / "direct.h5").c_str());
  const bool fs_takes_direct = probe >= 0;
  if (probe >= 0) ::close(probe);
  set_direct_io(true);
  if (fs_takes_direct) {
    // Both 6 MB datasets: 2 chunks each, all but the 4-byte checksums and the sub-page tails direct.
    EXPECT_GE(written, 2 * 1500 * 1000 * 4 - 4 * int64_t{kDirectAlign});
  }
  EXPECT_TRUE(testing::read_file(dir / "direct.h5") == testing::read_file(dir / "buffered.h5"));

  // Chunk addresses from HDF5 itself.
  {
    const hid_t f = H5Fopen((dir / "direct.h5").c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    for (const char* name : {"param/big", "exp_avg/big"}) {
      const hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
      hsize_t n = 0;
      const hid_t space = H5Dget_space(ds);
      H5Dget_num_chunks(ds, space, &n);
      EXPECT_EQ(n, 2u);
      for (hsize_t i = 0; i < n; ++i) {
        hsize_t offset[2];
        unsigned mask = 0;
        haddr_t addr = 0;
        hsize_t size = 0;
        H5Dget_chunk_info(ds, space, i, offset, &mask, &addr, &size);
        EXPECT_EQ(addr % kDirectAlign, 0u) << name << " chunk " << i << " at " << addr;
      }
      H5Sclose(space);
      H5Dclose(ds);
    }
    H5Fclose(f);
  }
  EXPECT_TRUE(hdf5_read_all(dir / "direct.h5", "param/big", a.size()) == a);

  for (const bool direct : {true, false}) {
    set_direct_io(direct);
    const int64_t read0 = direct_bytes_read();
    const H5File f = H5File::open(dir / "direct.h5");
    std::vector<float> out(a.size(), -1.0f), part(300 * 700, -1.0f), tiny(b.size(), -1.0f);
    const std::vector<int64_t> zero{0, 0};
    f.read("param/big", zero, big, out.data(), big, zero);
    EXPECT_TRUE(out == a) << "direct " << direct;
    f.read("exp_avg/big", std::vector<int64_t>{1000, 123}, std::vector<int64_t>{300, 700}, part.data(),
           std::vector<int64_t>{300, 700}, zero);
    for (int64_t i = 0; i < 300; ++i)
      for (int64_t j = 0; j < 700; ++j)
        ASSERT_EQ(part[static_cast<size_t>(i * 700 + j)], a[static_cast<size_t>((1000 + i) * 1000 + 123 + j)]);
    f.read("param/small", zero, small, tiny.data(), small, zero);
    EXPECT_TRUE(tiny == b);
    if (direct && fs_takes_direct) {
      EXPECT_GE(direct_bytes_read() - read0, 2 * 1500 * 1000 * 4);
    } else if (!direct) {
      EXPECT_EQ(direct_bytes_read(), read0);
    }
  }
  set_direct_io(was);
}

}  // namespace
}  // namespace moeforge::checkpoint
