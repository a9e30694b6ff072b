// File-system steps of checkpointing: durable writes (fsync of files and directories, atomic
// replacement by rename), digests, and finding a checkpoint from a user-given path.
#pragma once

#include <cstdint>
#include <string>

#include "checkpoint/checkpoint.pb.h"

namespace moeforge::checkpoint {

inline constexpr const char* kManifestName = "manifest.pb";
inline constexpr const char* kLatestName = "latest";
inline constexpr int kFormatVersion = 1;

// fsync of a file or a directory (so a rename or a new entry in it is durable).
void fsync_path(const std::string& path);
// Makes the finished temporary file `tmp` durable and renames it to `path` (same directory).
void commit_file(const std::string& tmp, const std::string& path);
// Writes `bytes` to `path` atomically: a temporary file next to it, fsynced, renamed over
// `path`, then the directory fsynced. Readers see the old or the new content, never a mix.
void write_file_atomic(const std::string& path, const std::string& bytes);

struct FileDigest {
  int64_t size = 0;
  std::string sha256;  // lowercase hex
};
// Size and SHA-256 of a file (read in chunks); throws naming a missing or unreadable file.
FileDigest digest_file(const std::string& path);

// The step directory a user's path names: a step directory itself (it holds manifest.pb), or a
// checkpoint root whose `latest` names one. Throws saying which was expected.
std::string resolve_checkpoint(const std::string& path);
// The step directory `<root>/latest` names, or "" when the root has no `latest`.
std::string latest_step_dir(const std::string& root);

// Reads and checks <step_dir>/manifest.pb (format version, a step, tensors and files).
Manifest read_manifest(const std::string& step_dir);

}  // namespace moeforge::checkpoint
