// SHA-256 (FIPS 180-4), streaming. Used by the shard writer to checksum each file while it is written, so the build
// needs no second pass over its output; the digests equal hashlib.sha256 of the files (tests/test_packer.py checks
// against hashlib). x86-64 CPUs with the SHA extensions use them (checked at run time), others a portable loop.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace solo {

class Sha256 {
 public:
  explicit Sha256(bool portable = false);  // portable: never use SHA-NI (tests compare both paths)
  void update(const void* data, size_t n);
  // Finalises (the object is unusable for update() afterwards) and returns 64 lowercase hex digits.
  std::string hexdigest();

  static bool hardware_accelerated();  // this CPU has the SHA extensions (used unless portable)

 private:
  void blocks(const uint8_t* p, size_t n_blocks);
  uint32_t state_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
  bool done_ = false, shani_ = false;
};

}  // namespace solo
