// XXH64 and the algorithm-tagged checksums of the shard writer. See checksum.h.
#include "checksum.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

namespace solo {

namespace {

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL, kP2 = 0xC2B2AE3D27D4EB4FULL, kP3 = 0x165667B19E3779F9ULL,
                   kP4 = 0x85EBCA77C2B2AE63ULL, kP5 = 0x27D4EB2F165667C5ULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// Little-endian loads (x86-64 / aarch64 hosts, as the MMIDIDX writer assumes).
inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline uint64_t xxh_round(uint64_t acc, uint64_t lane) { return rotl(acc + lane * kP2, 31) * kP1; }
inline uint64_t xxh_merge(uint64_t h, uint64_t acc) { return (h ^ xxh_round(0, acc)) * kP1 + kP4; }

}  // namespace

void Xxh64::update(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  total_ += n;
  if (buf_len_ + n < sizeof(buf_)) {
    if (n != 0) std::memcpy(buf_ + buf_len_, p, n);
    buf_len_ += n;
    return;
  }
  uint64_t a0 = acc_[0], a1 = acc_[1], a2 = acc_[2], a3 = acc_[3];
  if (buf_len_ != 0) {  // complete the buffered stripe
    const size_t take = sizeof(buf_) - buf_len_;
    std::memcpy(buf_ + buf_len_, p, take);
    p += take;
    n -= take;
    a0 = xxh_round(a0, load64(buf_));
    a1 = xxh_round(a1, load64(buf_ + 8));
    a2 = xxh_round(a2, load64(buf_ + 16));
    a3 = xxh_round(a3, load64(buf_ + 24));
    buf_len_ = 0;
  }
  for (; n >= 32; p += 32, n -= 32) {
    a0 = xxh_round(a0, load64(p));
    a1 = xxh_round(a1, load64(p + 8));
    a2 = xxh_round(a2, load64(p + 16));
    a3 = xxh_round(a3, load64(p + 24));
  }
  acc_[0] = a0, acc_[1] = a1, acc_[2] = a2, acc_[3] = a3;
  if (n != 0) std::memcpy(buf_, p, n);
  buf_len_ = n;
}

uint64_t Xxh64::digest() const {
  uint64_t h;
  if (total_ >= sizeof(buf_)) {
    h = rotl(acc_[0], 1) + rotl(acc_[1], 7) + rotl(acc_[2], 12) + rotl(acc_[3], 18);
    for (const uint64_t a : acc_) h = xxh_merge(h, a);
  } else {
    h = kP5;  // seed 0
  }
  h += total_;
  const uint8_t* p = buf_;
  size_t n = buf_len_;
  for (; n >= 8; p += 8, n -= 8) h = rotl(h ^ xxh_round(0, load64(p)), 27) * kP1 + kP4;
  if (n >= 4) {
    h = rotl(h ^ (uint64_t{load32(p)} * kP1), 23) * kP2 + kP3;
    p += 4;
    n -= 4;
  }
  for (; n > 0; ++p, --n) h = rotl(h ^ (uint64_t{*p} * kP5), 11) * kP1;
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

ChecksumAlgo parse_checksum_algo(const std::string& name) {
  if (name == "xxh64") return ChecksumAlgo::kXxh64;
  if (name == "sha256") return ChecksumAlgo::kSha256;
  throw std::invalid_argument("checksum must be 'xxh64' or 'sha256', got '" + name + "'");
}

const char* checksum_algo_name(ChecksumAlgo algo) { return algo == ChecksumAlgo::kXxh64 ? "xxh64" : "sha256"; }

void Checksum::update(const void* data, size_t n) {
  if (algo_ == ChecksumAlgo::kXxh64) {
    xxh_.update(data, n);
  } else {
    sha_.update(data, n);
  }
}

std::string Checksum::hexdigest() {
  std::string out = checksum_algo_name(algo_);
  out += ':';
  if (algo_ == ChecksumAlgo::kSha256) return out + sha_.hexdigest();
  static const char kHex[] = "0123456789abcdef";
  const uint64_t v = xxh_.digest();
  for (int shift = 60; shift >= 0; shift -= 4) out += kHex[(v >> shift) & 0xF];
  return out;
}

std::string file_checksum(const std::string& path, ChecksumAlgo algo) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  std::vector<char> block(size_t{1} << 20);
  Checksum h(algo);
  size_t n;
  while ((n = std::fread(block.data(), 1, block.size(), f.get())) > 0) h.update(block.data(), n);
  if (std::ferror(f.get())) throw std::runtime_error("cannot read " + path + ": " + std::strerror(errno));
  return h.hexdigest();
}

}  // namespace solo
