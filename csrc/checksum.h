// File checksums of the shard writer, computed from the bytes as they are written (no read-back pass).
//
// Two algorithms, named in every digest string ("xxh64:<16 hex>", "sha256:<64 hex>") so that a manifest says how to
// check itself:
//  - xxh64 (default): XXH64 with seed 0, as `xxhsum` / python-xxhash print it (big-endian hex). Not cryptographic,
//    but it catches corruption and truncation, and at ~10 GB/s a core it costs ~0.06 ms per 512-px image where
//    SHA-256 (one sequential chain, ~1.7 GB/s even with SHA-NI) cost ~0.45 ms: the largest single cost of the build
//    process after the image work itself. Checksumming shards with XXH64 is common practice (e.g. MosaicML
//    streaming's shard hashes).
//  - sha256: for shard sets that are published or must resist tampering (`--checksum sha256`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "sha256.h"

namespace solo {

// XXH64 (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md), streaming, seed 0.
class Xxh64 {
 public:
  void update(const void* data, size_t n);
  uint64_t digest() const;  // may be called at any time; update() may continue afterwards

 private:
  uint64_t acc_[4] = {0x9E3779B185EBCA87ULL + 0xC2B2AE3D27D4EB4FULL, 0xC2B2AE3D27D4EB4FULL, 0,
                      0 - 0x9E3779B185EBCA87ULL};
  uint8_t buf_[32];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

enum class ChecksumAlgo { kXxh64, kSha256 };

ChecksumAlgo parse_checksum_algo(const std::string& name);  // "xxh64" | "sha256"; throws std::invalid_argument
const char* checksum_algo_name(ChecksumAlgo algo);

class Checksum {
 public:
  // portable: SHA-256 without SHA-NI (tests compare both code paths)
  explicit Checksum(ChecksumAlgo algo = ChecksumAlgo::kXxh64, bool portable = false) : algo_(algo), sha_(portable) {}
  void update(const void* data, size_t n);
  std::string hexdigest();  // "<algo>:<hex>"; finalises (no update() afterwards)
  ChecksumAlgo algo() const { return algo_; }

 private:
  ChecksumAlgo algo_;
  Xxh64 xxh_;
  Sha256 sha_;
};

// Checksum of a whole file, read in 1 MiB blocks. Throws std::runtime_error naming the file.
std::string file_checksum(const std::string& path, ChecksumAlgo algo);

}  // namespace solo
