// Streaming MMIDIDX (.bin/.idx) writer; see mmidx_writer.h for the byte layout.
#include "mmidx_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace solo {

namespace {

constexpr char kIndexHeader[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kIndexVersion = 1;
constexpr size_t kStdioBuffer = size_t{1} << 20;
constexpr size_t kDirectWrite = size_t{64} << 10;  // appends of at least this many bytes bypass the stdio buffer
constexpr size_t kHashChunk = size_t{128} << 10;

[[noreturn]] void throw_errno(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " " + path + ": " + std::strerror(errno));
}

void write_all(FILE* f, const void* data, size_t n, const std::string& path) {
  if (n != 0 && std::fwrite(data, 1, n, f) != n) throw_errno("cannot write", path);
}

void flush_and_fsync(FILE* f, const std::string& path) {
  if (std::fflush(f) != 0) throw_errno("cannot flush", path);
  if (::fsync(::fileno(f)) != 0) throw_errno("cannot fsync", path);
}

}  // namespace

int64_t mmidx_dtype_size(MMIdxDType dtype) {
  switch (dtype) {
    case MMIdxDType::kUInt8:
    case MMIdxDType::kInt8:
      return 1;
    case MMIdxDType::kInt16:
    case MMIdxDType::kUInt16:
      return 2;
    case MMIdxDType::kInt32:
    case MMIdxDType::kFloat32:
      return 4;
    case MMIdxDType::kInt64:
    case MMIdxDType::kFloat64:
      return 8;
  }
  throw std::invalid_argument("unknown MMIDIDX dtype code");
}

std::string temp_path_for(const std::string& final_path) { return final_path + ".tmp"; }

void fsync_parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) throw_errno("cannot open directory", dir);
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw_errno("cannot fsync directory", dir);
}

MMIdxWriter::MMIdxWriter(const std::string& prefix, MMIdxDType dtype, ChecksumAlgo checksum)
    : bin_path_(prefix + kBinSuffix),
      idx_path_(prefix + kIdxSuffix),
      dtype_(dtype),
      itemsize_(mmidx_dtype_size(dtype)),
      bin_hash_(checksum) {
  const std::string tmp = temp_path_for(bin_path_);
  bin_ = std::fopen(tmp.c_str(), "wb");
  if (bin_ == nullptr) throw_errno("cannot create", tmp);
  buffer_.resize(kStdioBuffer);
  std::setvbuf(bin_, buffer_.data(), _IOFBF, buffer_.size());
}

MMIdxWriter::~MMIdxWriter() { abort(); }

void MMIdxWriter::write_bytes(const void* data, size_t n) {
  // Small writes go through the stdio buffer; large ones (image patches) straight to the file, so each byte is
  // copied once (into the page cache). Hashing runs in chunks just before each chunk is written, while it is in cache.
  const auto* p = static_cast<const uint8_t*>(data);
  offset_ += static_cast<int64_t>(n);
  if (n < kDirectWrite) {
    if (!external_bin_hash_) bin_hash_.update(p, n);
    write_all(bin_, p, n, temp_path_for(bin_path_));
    return;
  }
  if (std::fflush(bin_) != 0) throw_errno("cannot write", temp_path_for(bin_path_));
  const int fd = ::fileno(bin_);
  while (n > 0) {
    const size_t chunk = std::min(n, kHashChunk);
    if (!external_bin_hash_) bin_hash_.update(p, chunk);
    for (size_t done = 0; done < chunk;) {
      const ssize_t w = ::write(fd, p + done, chunk - done);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) throw_errno("cannot write", temp_path_for(bin_path_));
      done += static_cast<size_t>(w);
    }
    p += chunk;
    n -= chunk;
  }
}

void MMIdxWriter::begin_sequence() {
  if (finished_) throw std::logic_error("MMIdxWriter: begin_sequence after finish: " + bin_path_);
  if (seq_start_ >= 0) throw std::logic_error("MMIdxWriter: begin_sequence inside an open sequence");
  seq_start_ = offset_;
}

void MMIdxWriter::append(const void* data, int64_t n_elements) {
  if (seq_start_ < 0) throw std::logic_error("MMIdxWriter: append outside a sequence");
  write_bytes(data, static_cast<size_t>(n_elements * itemsize_));
}

void MMIdxWriter::end_sequence() {
  if (seq_start_ < 0) throw std::logic_error("MMIdxWriter: end_sequence without begin_sequence");
  const int64_t n = (offset_ - seq_start_) / itemsize_;
  // Megatron stores sequence lengths as int32 element counts.
  if (n > std::numeric_limits<int32_t>::max()) {
    throw std::overflow_error("MMIdxWriter: sequence of " + std::to_string(n) + " elements exceeds int32 in " +
                              bin_path_);
  }
  lengths_.push_back(static_cast<int32_t>(n));
  pointers_.push_back(seq_start_);
  seq_start_ = -1;
}

void MMIdxWriter::finish() {
  if (finished_) return;
  if (seq_start_ >= 0) throw std::logic_error("MMIdxWriter: finish inside an open sequence");
  // numpy.memmap (used by IndexedDataset) cannot map an empty file: a shard whose sequences are all empty (e.g.
  // text-only patches) gets 8 unreferenced zero bytes. Readers only follow the pointers, so this is invisible.
  if (offset_ == 0) {
    const char zeros[8] = {};
    write_bytes(zeros, sizeof(zeros));
    if (external_bin_hash_) bin_hash_.update(zeros, sizeof(zeros));
  }
  flush_and_fsync(bin_, temp_path_for(bin_path_));
  std::fclose(bin_);
  bin_ = nullptr;
  bin_digest_ = bin_hash_.hexdigest();

  const std::string tmp = temp_path_for(idx_path_);
  FILE* idx = std::fopen(tmp.c_str(), "wb");
  if (idx == nullptr) throw_errno("cannot create", tmp);
  Checksum idx_hash(bin_hash_.algo());
  auto put = [&](const void* data, size_t n) {
    idx_hash.update(data, n);
    write_all(idx, data, n, tmp);
  };
  try {
    const uint64_t n_seq = lengths_.size();
    const uint64_t n_doc = n_seq + 1;
    const uint8_t code = static_cast<uint8_t>(dtype_);
    put(kIndexHeader, sizeof(kIndexHeader));
    put(&kIndexVersion, sizeof(kIndexVersion));  // little-endian hosts only (x86-64, aarch64)
    put(&code, 1);
    put(&n_seq, sizeof(n_seq));
    put(&n_doc, sizeof(n_doc));
    put(lengths_.data(), lengths_.size() * sizeof(int32_t));
    put(pointers_.data(), pointers_.size() * sizeof(int64_t));
    std::vector<int64_t> doc_idx(n_doc);
    for (uint64_t i = 0; i < n_doc; ++i) doc_idx[i] = static_cast<int64_t>(i);
    put(doc_idx.data(), doc_idx.size() * sizeof(int64_t));
    flush_and_fsync(idx, tmp);
    idx_digest_ = idx_hash.hexdigest();
  } catch (...) {
    std::fclose(idx);
    throw;
  }
  std::fclose(idx);
  finished_ = true;
}

void MMIdxWriter::commit() {
  if (!finished_) throw std::logic_error("MMIdxWriter: commit before finish: " + bin_path_);
  if (committed_) return;
  for (const std::string* p : {&bin_path_, &idx_path_}) {
    const std::string tmp = temp_path_for(*p);
    if (std::rename(tmp.c_str(), p->c_str()) != 0) throw_errno("cannot rename " + tmp + " to", *p);
  }
  committed_ = true;
}

void MMIdxWriter::abort() noexcept {
  // Once only: a later call (the destructor) must not remove the temp files of a new writer with the same prefix.
  if (committed_ || aborted_) return;
  aborted_ = true;
  if (bin_ != nullptr) {
    std::fclose(bin_);
    bin_ = nullptr;
  }
  std::remove(temp_path_for(bin_path_).c_str());
  std::remove(temp_path_for(idx_path_).c_str());
}

}  // namespace solo
