// Streaming writer of one Megatron-Core MMIDIDX indexed dataset ({prefix}.bin + {prefix}.idx), the format that
// megatron.core.datasets.indexed_dataset.IndexedDataset (0.16.x .. 0.19.x) reads without any patch.
//
// .idx layout (little endian), as written by megatron-core's _IndexWriter:
//   9 bytes  "MMIDIDX\0\0"       magic
//   u64      1                   version
//   u8       dtype code          1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
//   u64      sequence_count      S
//   u64      document_count      S + 1 (we write one Megatron "document" per sequence: document_indices = 0..S)
//   i32[S]   sequence_lengths    elements (not bytes) per sequence
//   i64[S]   sequence_pointers   byte offset of each sequence in .bin
//   i64[S+1] document_indices
// .bin: the sequences' elements back to back.
//
// Checksums (checksum.h) of both files are computed from the bytes as they are written (no read-back pass);
// bin_checksum()/idx_checksum() are valid after finish().
//
// Crash safety: both files are written under temporary names ({path}.tmp), fsynced by finish(), and only
// commit() renames them to their final names. abort() (and the destructor, unless committed) removes them.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "checksum.h"

namespace solo {

enum class MMIdxDType : uint8_t { kUInt8 = 1, kInt8 = 2, kInt16 = 3, kInt32 = 4, kInt64 = 5, kFloat64 = 6,
                                  kFloat32 = 7, kUInt16 = 8 };

int64_t mmidx_dtype_size(MMIdxDType dtype);

// The two files of one dataset, {prefix}.bin and {prefix}.idx (megatron-core's get_bin_path / get_idx_path).
inline constexpr char kBinSuffix[] = ".bin";
inline constexpr char kIdxSuffix[] = ".idx";

// Temporary name of a file that finish()/commit() later renames to `final_path`.
std::string temp_path_for(const std::string& final_path);

// fsync the directory holding `path` so that a rename into it is durable.
void fsync_parent_dir(const std::string& path);

class MMIdxWriter {
 public:
  MMIdxWriter(const std::string& prefix, MMIdxDType dtype, ChecksumAlgo checksum = ChecksumAlgo::kXxh64);
  ~MMIdxWriter();
  MMIdxWriter(const MMIdxWriter&) = delete;
  MMIdxWriter& operator=(const MMIdxWriter&) = delete;

  // A sequence may be written in several parts: begin_sequence(), append()*, end_sequence().
  void begin_sequence();
  void append(const void* data, int64_t n_elements);
  void end_sequence();

  // The .bin checksum is fed by another thread: write() stops hashing, and the owner passes every byte it appended,
  // in order, to hash_bin() before finish() (the 8 padding bytes of an empty file are hashed by finish itself).
  void hash_bin_externally() { external_bin_hash_ = true; }
  void hash_bin(const void* data, size_t n) { bin_hash_.update(data, n); }

  // Flush, write the index, fsync both temp files. Idempotent.
  void finish();
  // Rename the temp files to {prefix}.bin / {prefix}.idx (bin first, idx last). Requires finish().
  void commit();
  // Close and remove the temp files (no-op after commit()).
  void abort() noexcept;

  int64_t sequence_count() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t bytes_written() const { return offset_; }
  const std::string& bin_path() const { return bin_path_; }
  const std::string& idx_path() const { return idx_path_; }
  const std::string& bin_checksum() const { return bin_digest_; }  // after finish()
  const std::string& idx_checksum() const { return idx_digest_; }  // after finish()

 private:
  void write_bytes(const void* data, size_t n);

  std::string bin_path_, idx_path_;
  MMIdxDType dtype_;
  int64_t itemsize_;
  FILE* bin_ = nullptr;
  std::vector<char> buffer_;  // stdio buffer for bin_
  int64_t offset_ = 0;        // bytes written to .bin so far
  int64_t seq_start_ = -1;    // byte offset of the open sequence, -1 when none is open
  std::vector<int32_t> lengths_;
  std::vector<int64_t> pointers_;
  Checksum bin_hash_;
  std::string bin_digest_, idx_digest_;
  bool finished_ = false, committed_ = false, aborted_ = false, external_bin_hash_ = false;
};

}  // namespace solo
