// The shard builder's intake thread (see intake.h).
#include "intake.h"

#include <utility>

namespace solo {

IntakeThread::IntakeThread(Ingest ingest) : ingest_(std::move(ingest)), thread_(&IntakeThread::loop, this) {}

uint64_t IntakeThread::push(Submission doc) {
  rethrow_error();
  const uint64_t seq = ++submitted_;
  queue_.push({std::move(doc), seq});
  return seq;
}

void IntakeThread::rethrow_error() {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_) std::rethrow_exception(error_);
}

void IntakeThread::wait(uint64_t seq) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return done_.load(std::memory_order_acquire) >= seq; });
  if (error_) std::rethrow_exception(error_);
}

void IntakeThread::loop() {
  Queued q;
  while (queue_.pop(q)) {
    bool skip = discard_.load(std::memory_order_acquire);
    {
      std::lock_guard<std::mutex> lock(mu_);
      skip = skip || error_ != nullptr;
    }
    if (!skip) {
      try {
        ingest_(q.doc);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        error_ = std::current_exception();
      }
    }
    // The bytes are copied (or will never be): the producer may reuse them. Release order: our reads come first.
    for (uint8_t* flag : q.doc.release) __atomic_store_n(flag, uint8_t{0}, __ATOMIC_RELEASE);
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_.store(q.seq, std::memory_order_release);
    }
    cv_.notify_all();
  }
}

void IntakeThread::stop(bool discard) noexcept {
  if (discard) discard_.store(true, std::memory_order_release);
  queue_.close(false);
  if (thread_.joinable()) thread_.join();
}

}  // namespace solo
