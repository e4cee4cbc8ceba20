// What a producer hands the shard builder (DocItem, Submission) and the builder's intake thread, which ingests the
// submitted documents (layout, copy, packing) one by one in submission order, off the producer's thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "threads.h"

namespace solo {

// One input item of a document: a text token run or an already-resized image (views, not owned). An image comes
// as pixels or, patchified already (by a preprocess worker, while the pixels are in its cache), as its patch grid.
struct DocItem {
  const int32_t* tokens = nullptr;  // text: n_tokens ids
  int64_t n_tokens = 0;
  const uint8_t* pixels = nullptr;  // image: uint8[height, width, 3], or uint8[height/32 * width/32, 3072] patches
  int64_t height = 0, width = 0;
  bool patchified = false;  // pixels holds the patches (in <vpatch> order), not the HWC pixels
  bool target = true;       // text: its tokens are loss targets (an image never is)
  bool is_image() const { return pixels != nullptr; }
};

// A document to add: [BOS] + items + [EOS]. The caller keeps every pointer in `items` valid (and unchanged) until
// the intake thread has completed it; `release` flags (e.g. a worker's slot-busy byte in shared memory) are set to 0
// as soon as the document's bytes have been copied (or dropped).
struct Submission {
  std::string record_id;
  std::vector<DocItem> items;
  std::vector<uint8_t*> release;
  bool eos_target = true;  // the closing EOS is a loss target
};

class IntakeThread {
 public:
  using Ingest = std::function<void(const Submission&)>;
  explicit IntakeThread(Ingest ingest);  // starts the thread
  ~IntakeThread() { stop(true); }
  IntakeThread(const IntakeThread&) = delete;
  IntakeThread& operator=(const IntakeThread&) = delete;

  // Queues a document (blocks while kMaxQueued are waiting) and returns its sequence number (1, 2, ...). Not
  // thread-safe: the builder serialises its callers. Rethrows an earlier ingest error instead of queueing.
  uint64_t push(Submission doc);
  uint64_t completed() const { return done_.load(std::memory_order_acquire); }
  void wait(uint64_t seq);  // until document seq is ingested; rethrows an ingest error
  void drain() { wait(submitted_); }
  void rethrow_error();
  // Ends the thread (idempotent). discard: the documents still queued are released without being ingested.
  void stop(bool discard) noexcept;

  static constexpr size_t kMaxQueued = 64;

 private:
  struct Queued {
    Submission doc;
    uint64_t seq = 0;
  };
  void loop();

  Ingest ingest_;
  BoundedQueue<Queued> queue_{kMaxQueued};
  uint64_t submitted_ = 0;
  std::atomic<uint64_t> done_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  std::exception_ptr error_;  // under mu_; after an error the thread keeps draining but ingests nothing more
  std::atomic<bool> discard_{false};
  std::thread thread_;  // last: starts once everything above exists
};

}  // namespace solo
