#include "checkpoint/direct_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>

#include "runtime/error.h"

namespace moeforge::checkpoint {

namespace {

std::atomic<bool>& direct_flag() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("MOEFORGE_DIRECT_IO");
    return !(env && std::strcmp(env, "0") == 0);
  }()};
  return on;
}

std::atomic<int64_t> g_direct_written{0}, g_direct_read{0};

constexpr size_t align_down(size_t x) { return x & ~(kDirectAlign - 1); }

}  // namespace

bool direct_io_enabled() { return direct_flag().load(); }
int64_t direct_bytes_written() { return g_direct_written.load(); }
int64_t direct_bytes_read() { return g_direct_read.load(); }
void count_direct_read(int64_t bytes) { g_direct_read.fetch_add(bytes); }
void set_direct_io(bool on) { direct_flag().store(on); }

void AlignedBuffer::Free::operator()(uint8_t* p) const { std::free(p); }

void AlignedBuffer::resize(size_t bytes) {
  if (bytes > capacity_) {
    const size_t cap = (bytes + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    void* p = std::aligned_alloc(kDirectAlign, cap);
    if (!p) throw std::bad_alloc();
    data_.reset(static_cast<uint8_t*>(p));
    capacity_ = cap;
  }
  size_ = bytes;
}

int open_direct_read(const char* path) {
  if (!direct_io_enabled()) return -1;
  return ::open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
}

// ---- the "moeforge direct" HDF5 virtual file driver ----------------------------------------------
//
// sec2's semantics (H5FDsec2.c in HDF5): one descriptor, an end-of-address (eoa) HDF5 sets and an
// end-of-file (eof) we track; reads past the eof return zeros; truncate() sets the file's size to
// the eoa. The only difference is the O_DIRECT path for large aligned raw-data writes.

#if H5_VERSION_LE(1, 12, 99)
#define MOEFORGE_DIRECT_VFD 1

namespace {

struct DirectFile {
  H5FD_t pub;  // first member: HDF5 hands us back pointers to it
  int fd = -1;
  int dfd = -1;  // O_DIRECT descriptor for writes, -1 when not available
  haddr_t eoa = 0, eof = 0;
  dev_t device = 0;
  ino_t inode = 0;
  AlignedBuffer* bounce = nullptr;  // for raw data handed to us at an unaligned address
};

DirectFile* as_file(H5FD_t* f) { return reinterpret_cast<DirectFile*>(f); }
const DirectFile* as_file(const H5FD_t* f) { return reinterpret_cast<const DirectFile*>(f); }

constexpr haddr_t kMaxAddr = (haddr_t{1} << (8 * sizeof(off_t) - 1)) - 1;

herr_t push_error(const char* func, hid_t minor, const char* what, int err) {
  H5Epush2(H5E_DEFAULT, __FILE__, func, __LINE__, H5E_ERR_CLS, H5E_VFL, minor, "%s: %s", what, std::strerror(err));
  return -1;
}

bool pwrite_all(int fd, const uint8_t* p, size_t n, haddr_t at, int* err) {
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(at));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      *err = w < 0 ? errno : EIO;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
    at += static_cast<haddr_t>(w);
  }
  return true;
}

H5FD_t* vfd_open(const char* name, unsigned flags, hid_t, haddr_t maxaddr) {
  if (!name || !*name || maxaddr == 0 || maxaddr == HADDR_UNDEF || maxaddr > kMaxAddr) {
    H5Epush2(H5E_DEFAULT, __FILE__, "vfd_open", __LINE__, H5E_ERR_CLS, H5E_VFL, H5E_CANTOPENFILE, "bad arguments");
    return nullptr;
  }
  int o_flags = (flags & H5F_ACC_RDWR) ? O_RDWR : O_RDONLY;
  if (flags & H5F_ACC_TRUNC) o_flags |= O_TRUNC;
  if (flags & H5F_ACC_CREAT) o_flags |= O_CREAT;
  if (flags & H5F_ACC_EXCL) o_flags |= O_EXCL;
  const int fd = ::open(name, o_flags | O_CLOEXEC, 0666);
  if (fd < 0) {
    push_error("vfd_open", H5E_CANTOPENFILE, name, errno);
    return nullptr;
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    push_error("vfd_open", H5E_CANTOPENFILE, name, err);
    return nullptr;
  }
  auto* f = new (std::nothrow) DirectFile{};
  if (!f) {
    ::close(fd);
    return nullptr;
  }
  f->fd = fd;
  f->eof = static_cast<haddr_t>(st.st_size);
  f->device = st.st_dev;
  f->inode = st.st_ino;
  if ((flags & H5F_ACC_RDWR) && direct_io_enabled()) f->dfd = ::open(name, O_WRONLY | O_DIRECT | O_CLOEXEC);
  return &f->pub;
}

herr_t vfd_close(H5FD_t* file) {
  DirectFile* f = as_file(file);
  int rc = 0, err = 0;
  if (f->dfd >= 0) ::close(f->dfd);
  if (::close(f->fd) != 0) {
    rc = -1;
    err = errno;
  }
  delete f->bounce;
  delete f;
  return rc == 0 ? 0 : push_error("vfd_close", H5E_CANTCLOSEFILE, "close", err);
}

int vfd_cmp(const H5FD_t* a, const H5FD_t* b) {
  const DirectFile* x = as_file(a);
  const DirectFile* y = as_file(b);
  if (x->device != y->device) return x->device < y->device ? -1 : 1;
  if (x->inode != y->inode) return x->inode < y->inode ? -1 : 1;
  return 0;
}

herr_t vfd_query(const H5FD_t*, unsigned long* flags) {
  // What sec2 declares, less SWMR (never used by checkpoints).
  *flags = H5FD_FEAT_AGGREGATE_METADATA | H5FD_FEAT_ACCUMULATE_METADATA | H5FD_FEAT_DATA_SIEVE |
           H5FD_FEAT_AGGREGATE_SMALLDATA | H5FD_FEAT_POSIX_COMPAT_HANDLE | H5FD_FEAT_DEFAULT_VFD_COMPATIBLE;
  return 0;
}

haddr_t vfd_get_eoa(const H5FD_t* file, H5FD_mem_t) { return as_file(file)->eoa; }

herr_t vfd_set_eoa(H5FD_t* file, H5FD_mem_t, haddr_t addr) {
  as_file(file)->eoa = addr;
  return 0;
}

haddr_t vfd_get_eof(const H5FD_t* file, H5FD_mem_t) { return as_file(file)->eof; }

herr_t vfd_get_handle(H5FD_t* file, hid_t, void** handle) {
  *handle = &as_file(file)->fd;
  return 0;
}

herr_t vfd_read(H5FD_t* file, H5FD_mem_t, hid_t, haddr_t addr, size_t size, void* buffer) {
  DirectFile* f = as_file(file);
  if (addr == HADDR_UNDEF || addr + size > f->eoa)
    return push_error("vfd_read", H5E_READERROR, "read past the end of the allocated space", EINVAL);
  auto* p = static_cast<uint8_t*>(buffer);
  while (size > 0) {
    const ssize_t r = ::pread(f->fd, p, size, static_cast<off_t>(addr));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return push_error("vfd_read", H5E_READERROR, "pread", errno);
    if (r == 0) {  // past the end of the file: zeros, as sec2
      std::memset(p, 0, size);
      break;
    }
    p += r;
    size -= static_cast<size_t>(r);
    addr += static_cast<haddr_t>(r);
  }
  return 0;
}

herr_t vfd_write(H5FD_t* file, H5FD_mem_t type, hid_t, haddr_t addr, size_t size, const void* buffer) {
  DirectFile* f = as_file(file);
  if (addr == HADDR_UNDEF || addr + size > f->eoa)
    return push_error("vfd_write", H5E_WRITEERROR, "write past the end of the allocated space", EINVAL);
  const auto* p = static_cast<const uint8_t*>(buffer);
  size_t done = 0;
  int err = 0;
  if (type == H5FD_MEM_DRAW && f->dfd >= 0 && size >= kDirectMinBytes && addr % kDirectAlign == 0) {
    const size_t bulk = align_down(size);
    bool ok = true;
    if (reinterpret_cast<uintptr_t>(p) % kDirectAlign == 0) {
      ok = pwrite_all(f->dfd, p, bulk, addr, &err);
    } else {
      constexpr size_t kPiece = size_t{4} << 20;
      if (!f->bounce) f->bounce = new AlignedBuffer;
      f->bounce->resize(std::min(kPiece, bulk));
      for (size_t at = 0; ok && at < bulk; at += kPiece) {
        const size_t n = std::min(kPiece, bulk - at);
        std::memcpy(f->bounce->data(), p + at, n);
        ok = pwrite_all(f->dfd, f->bounce->data(), n, addr + at, &err);
      }
    }
    if (ok) {
      done = bulk;
      g_direct_written.fetch_add(static_cast<int64_t>(bulk));
    } else if (err == EINVAL) {
      // The file system takes O_DIRECT opens but not these transfers: page cache from now on.
      ::close(f->dfd);
      f->dfd = -1;
    } else {
      return push_error("vfd_write", H5E_WRITEERROR, "pwrite (direct)", err);
    }
  }
  if (done < size && !pwrite_all(f->fd, p + done, size - done, addr + done, &err))
    return push_error("vfd_write", H5E_WRITEERROR, "pwrite", err);
  f->eof = std::max<haddr_t>(f->eof, addr + size);
  return 0;
}

herr_t vfd_truncate(H5FD_t* file, hid_t, hbool_t) {
  DirectFile* f = as_file(file);
  if (f->eoa != f->eof) {
    if (::ftruncate(f->fd, static_cast<off_t>(f->eoa)) != 0)
      return push_error("vfd_truncate", H5E_SEEKERROR, "ftruncate", errno);
    f->eof = f->eoa;
  }
  return 0;
}

const H5FD_class_t kDirectClass = {
    "moeforge_direct",  // name
    kMaxAddr,           // maxaddr
    H5F_CLOSE_WEAK,     // fc_degree
    nullptr,            // terminate
    nullptr,            // sb_size
    nullptr,            // sb_encode
    nullptr,            // sb_decode
    0,                  // fapl_size
    nullptr,            // fapl_get
    nullptr,            // fapl_copy
    nullptr,            // fapl_free
    0,                  // dxpl_size
    nullptr,            // dxpl_copy
    nullptr,            // dxpl_free
    vfd_open,
    vfd_close,
    vfd_cmp,
    vfd_query,
    nullptr,  // get_type_map
    nullptr,  // alloc
    nullptr,  // free
    vfd_get_eoa,
    vfd_set_eoa,
    vfd_get_eof,
    vfd_get_handle,
    vfd_read,
    vfd_write,
    nullptr,  // flush (the commit fsyncs the file)
    vfd_truncate,
    nullptr,  // lock
    nullptr,  // unlock
    H5FD_FLMAP_DICHOTOMY,
};

hid_t direct_driver() {
  static const hid_t id = H5FDregister(&kDirectClass);
  return id;
}

}  // namespace
#endif

hid_t shard_file_access_plist() {
  const hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
  MOE_CHECK(fapl >= 0, "checkpoint: cannot create an HDF5 file-access property list");
  bool ok = H5Pset_alignment(fapl, kDirectMinBytes, kDirectAlign) >= 0;
#ifdef MOEFORGE_DIRECT_VFD
  if (ok && direct_io_enabled()) {
    const hid_t driver = direct_driver();
    ok = driver >= 0 && H5Pset_driver(fapl, driver, nullptr) >= 0;
  }
#endif
  if (!ok) {
    H5Pclose(fapl);
    MOE_CHECK(false, "checkpoint: cannot set up the HDF5 file driver for shard files");
  }
  return fapl;
}

}  // namespace moeforge::checkpoint
