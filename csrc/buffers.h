// Memory of the shard builder: uninitialised-on-resize buffers and the process-wide pool of patch buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace solo {

// std::allocator that leaves trivially constructible elements uninitialised on resize(): patch buffers are fully
// overwritten by patchify, so zero-filling them first is wasted memory bandwidth.
template <typename T>
struct DefaultInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  using std::allocator<T>::allocator;
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using ByteBuffer = std::vector<uint8_t, DefaultInitAllocator<uint8_t>>;
using TokenBuffer = std::vector<int32_t, DefaultInitAllocator<int32_t>>;

// Process-wide free list of patch buffers: a written document's buffer is reused by a later document (of this or a
// later builder), so steady-state packing neither page-faults fresh memory in nor hands it back to the OS. Holds at
// most kMaxBytes of released buffers: a whole builder buffer (buffer_bytes, default 1 GiB) and the packs queued
// behind it. Smaller, the pool recycled only part of each packing round and the rest of the documents were copied
// into freshly faulted, zeroed pages (~0.25 ms per 512-px image measured in a build; the largest cost of
// add_document). The pool only ever holds memory the builders used at once before; release() returns it all.
class BufferPool {
 public:
  ByteBuffer take(size_t n);  // size n, contents unspecified
  void give(ByteBuffer&& b);
  void release();  // free every pooled buffer (end of a build)
  static constexpr size_t kMaxBytes = size_t{1280} << 20;

 private:
  std::mutex mu_;
  std::vector<ByteBuffer> free_;
  size_t bytes_ = 0;
};
BufferPool& patch_buffers();

}  // namespace solo
