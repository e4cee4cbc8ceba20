// The pool of patch buffers (see buffers.h).
#include "buffers.h"

namespace solo {

ByteBuffer BufferPool::take(size_t n) {
  ByteBuffer b;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // The most recently released buffer that is large enough (warm in cache, pages already mapped).
    for (size_t i = free_.size(); i-- > 0;) {
      if (free_[i].capacity() >= n) {
        b = std::move(free_[i]);
        free_[i] = std::move(free_.back());
        free_.pop_back();
        bytes_ -= b.capacity();
        break;
      }
    }
  }
  if (b.capacity() < n) b = ByteBuffer();  // too small (or none): allocate fresh; never copy the old contents
  b.resize(n);  // no initialisation (DefaultInitAllocator): patchify overwrites every byte
  return b;
}

void BufferPool::give(ByteBuffer&& b) {
  if (b.capacity() == 0) return;
  ByteBuffer drop;  // freed outside the lock
  std::lock_guard<std::mutex> lock(mu_);
  if (bytes_ + b.capacity() <= kMaxBytes) {
    bytes_ += b.capacity();
    free_.push_back(std::move(b));
  } else {
    drop = std::move(b);
  }
}

void BufferPool::release() {
  std::vector<ByteBuffer> drop;  // freed outside the lock
  std::lock_guard<std::mutex> lock(mu_);
  drop.swap(free_);
  bytes_ = 0;
}

BufferPool& patch_buffers() {
  static BufferPool* pool = new BufferPool();  // leaked on purpose: no destruction-order issues at exit
  return *pool;
}

}  // namespace solo
