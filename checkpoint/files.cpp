#include "checkpoint/files.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <optional>
#include <vector>

#include <fmt/format.h>

#include "checkpoint/direct_io.h"
#include "data/sha256.h"
#include "runtime/error.h"

namespace moeforge::checkpoint {

namespace fs = std::filesystem;

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MOE_CHECK(fd >= 0, "{}: cannot open to fsync: {}", path, std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  MOE_CHECK(rc == 0, "{}: fsync failed: {}", path, std::strerror(err));
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream os(tmp, std::ios::binary | std::ios::trunc);
    os.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    os.close();
    MOE_CHECK(os.good(), "{}: cannot write: {}", tmp, std::strerror(errno));
  }
  commit_file(tmp, path);
  fsync_path(fs::path(path).parent_path().string());
}

void commit_file(const std::string& tmp, const std::string& path) {
  fsync_path(tmp);
  MOE_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "{}: cannot rename to {}: {}", tmp, path,
            std::strerror(errno));
}

namespace {

// The digest through O_DIRECT reads of kBlock bytes, the next block read on a second thread
// while this one hashes the current one. nullopt when the file system refuses O_DIRECT (the
// caller then hashes through the page cache).
std::optional<FileDigest> digest_direct(const std::string& path) {
  const int fd = open_direct_read(path.c_str());
  if (fd < 0) return std::nullopt;
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return std::nullopt;
  }
  const size_t size = static_cast<size_t>(st.st_size);
  static constexpr size_t kBlock = size_t{8} << 20;  // a multiple of kDirectAlign
  AlignedBuffer bufs[2];
  bufs[0].resize(kBlock);
  bufs[1].resize(kBlock);
  // Reads the block at `at` into `buf`; the byte count, or -errno (EINVAL: O_DIRECT refused).
  const auto read_block = [fd, size](uint8_t* buf, size_t at) -> ssize_t {
    const size_t want = std::min(kBlock, size - at);
    size_t done = 0;
    while (done < want) {
      // Whole aligned blocks; the last one may be short of the file's end.
      const size_t ask = (want - done + kDirectAlign - 1) & ~(kDirectAlign - 1);
      const ssize_t n = ::pread(fd, buf + done, ask, static_cast<off_t>(at + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return -errno;
      if (n == 0) return -EIO;  // the file shrank while being hashed
      done += static_cast<size_t>(n);
    }
    return static_cast<ssize_t>(want);
  };
  data::Sha256 h;
  std::future<ssize_t> next;
  if (size > 0) next = std::async(std::launch::async, read_block, bufs[0].data(), size_t{0});
  for (size_t at = 0, i = 0; at < size; at += kBlock, ++i) {
    const ssize_t n = next.get();
    if (n == -EINVAL && at == 0) {
      ::close(fd);
      return std::nullopt;
    }
    if (n < 0) {
      ::close(fd);
      MOE_THROW("{}: read error while hashing: {}", path, std::strerror(static_cast<int>(-n)));
    }
    if (at + kBlock < size) next = std::async(std::launch::async, read_block, bufs[(i + 1) % 2].data(), at + kBlock);
    h.update({bufs[i % 2].data(), static_cast<size_t>(n)});
    count_direct_read(n);
  }
  ::close(fd);
  return FileDigest{static_cast<int64_t>(size), h.hex()};
}

}  // namespace

FileDigest digest_file(const std::string& path) {
  // Files written with O_DIRECT are not in the page cache: read them back the same way.
  if (direct_io_enabled())
    if (std::optional<FileDigest> d = digest_direct(path)) return *d;
  // Hashed straight from a read-only mapping of the file (no copy out of the page cache, which
  // the kernel reads ahead of the hash); read() in pieces where mapping is not possible.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MOE_CHECK(fd >= 0, "{}: cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    MOE_THROW("{}: cannot stat: {}", path, std::strerror(err));
  }
  data::Sha256 h;
  FileDigest d;
  const size_t size = static_cast<size_t>(st.st_size);
  void* map = size > 0 ? ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
  if (map != MAP_FAILED) {
    ::madvise(map, size, MADV_SEQUENTIAL);
    constexpr size_t kPiece = size_t{8} << 20;
    for (size_t at = 0; at < size; at += kPiece)
      h.update({static_cast<const uint8_t*>(map) + at, std::min(kPiece, size - at)});
    ::munmap(map, size);
    d.size = static_cast<int64_t>(size);
  } else {
    std::vector<uint8_t> buf(4 << 20);
    for (;;) {
      const ssize_t n = ::read(fd, buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        const int err = errno;
        ::close(fd);
        MOE_THROW("{}: read error while hashing: {}", path, std::strerror(err));
      }
      if (n == 0) break;
      h.update({buf.data(), static_cast<size_t>(n)});
      d.size += n;
    }
  }
  ::close(fd);
  d.sha256 = h.hex();
  return d;
}

std::string latest_step_dir(const std::string& root) {
  const fs::path latest = fs::path(root) / kLatestName;
  if (!fs::exists(latest)) return {};
  std::ifstream is(latest);
  std::string name;
  std::getline(is, name);
  MOE_CHECK(!name.empty() && name.find('/') == std::string::npos, "{}: expected a step directory name, found '{}'",
            latest.string(), name);
  const fs::path dir = fs::path(root) / name;
  MOE_CHECK(fs::exists(dir / kManifestName), "{} names {}, which holds no {}", latest.string(), dir.string(),
            kManifestName);
  return dir.string();
}

std::string resolve_checkpoint(const std::string& path) {
  MOE_CHECK(fs::exists(path), "{}: no such checkpoint (expected a step directory or a checkpoint directory with '{}')",
            path, kLatestName);
  if (fs::exists(fs::path(path) / kManifestName)) return path;
  const std::string latest = latest_step_dir(path);
  MOE_CHECK(!latest.empty(), "{}: not a checkpoint: neither {} nor {} is there", path, kManifestName, kLatestName);
  return latest;
}

Manifest read_manifest(const std::string& step_dir) {
  const std::string path = (fs::path(step_dir) / kManifestName).string();
  std::ifstream is(path, std::ios::binary);
  MOE_CHECK(is.good(), "{}: cannot read the manifest: {}", path, std::strerror(errno));
  Manifest m;
  MOE_CHECK(m.ParseFromIstream(&is), "{}: not a valid checkpoint manifest (protobuf parse failed)", path);
  MOE_CHECK(m.format_version() == kFormatVersion, "{}: format version {}, this moeforge reads version {}", path,
            m.format_version(), kFormatVersion);
  MOE_CHECK(m.tensors_size() > 0 && m.files_size() > 0, "{}: the manifest lists no tensors or no files", path);
  return m;
}

}  // namespace moeforge::checkpoint
