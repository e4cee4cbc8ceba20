// The SOLO shard packer: documents (text token runs + images) -> packs of exactly seq_length tokens, written as
// three MMIDIDX datasets per shard prefix ({prefix}.tokens, {prefix}.patches, {prefix}.docs) plus a JSON sidecar
// ({prefix}.json, renamed into place last: it marks a complete shard). See docs/shard_format.md.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "mmidx_writer.h"

namespace solo {

// ---------------------------------------------------------------------------------------------------------------
// Bounded-buffer best-fit-decreasing planner (lengths only; shared by ShardBuilder and _C.plan_packs).
//
// Items (length <= capacity) are buffered. When the buffer holds `buffer_items`, the buffer is packed with best-fit
// decreasing (longest first, each into the open bin with the least room that still fits; ties broken deterministically);
// bins with at most `slack` free slots are emitted, and if the items of the remaining bins still exceed half the
// buffer the fullest of them are emitted too. The rest go back to the buffer and are re-packed with the next
// arrivals (at most buffer_items/2 are kept). flush() emits everything. Fully deterministic for a given arrival order.
class BestFitPlanner {
 public:
  using Bin = std::vector<int64_t>;  // item ids in placement order

  BestFitPlanner(int64_t capacity, int64_t buffer_items, int64_t slack = -1);

  // Adds an item; returns the bins emitted by this call (usually none).
  std::vector<Bin> push(int64_t id, int64_t length);
  std::vector<Bin> flush();
  // An early round (e.g. the buffered documents hold too many bytes): keeps at most half the pending items.
  std::vector<Bin> shrink();
  int64_t pending() const { return static_cast<int64_t>(items_.size()); }
  int64_t capacity() const { return capacity_; }

 private:
  struct Item {
    int64_t id, length;
  };
  std::vector<Bin> round(bool final, int64_t retain_limit);

  int64_t capacity_, buffer_items_, slack_;
  std::vector<Item> items_;
};

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

// ---------------------------------------------------------------------------------------------------------------
struct ShardBuilderConfig {
  std::string out_prefix;
  int64_t seq_length = 32768;
  int32_t bos_id = 1, eos_id = 2, pad_id = 0;
  int32_t vision_id = 32000, vpatch_id = 32001, row_sep_id = 32002, vision_end_id = 32004;
  int32_t first_special_id = -1;  // ids >= it are never text; -1: min of the four vision ids
  int64_t buffer_docs = 4096;
  int64_t buffer_bytes = int64_t{1} << 30;  // also start a packing round when buffered documents hold this much
  bool drop_long_text = false;  // long_text="drop"
  int threads = 1;
  ChecksumAlgo checksum = ChecksumAlgo::kXxh64;  // of every written file (checksum.h)
};

// One input item of a document: a text token run or an already-resized image (views, not owned). An image comes
// as pixels or, patchified already (by a preprocess worker, while the pixels are in its cache), as its patch grid.
struct DocItem {
  const int32_t* tokens = nullptr;  // text: n_tokens ids
  int64_t n_tokens = 0;
  const uint8_t* pixels = nullptr;  // image: uint8[height, width, 3], or uint8[height/32 * width/32, 3072] patches
  int64_t height = 0, width = 0;
  bool patchified = false;  // pixels holds the patches (in <vpatch> order), not the HWC pixels
  bool is_image() const { return pixels != nullptr; }
};

struct ShardStats {
  int64_t packs = 0, documents = 0, input_documents = 0, images = 0, patches = 0;
  int64_t tokens_total = 0, tokens_text = 0, tokens_vision = 0, pad_tokens = 0, slots = 0;
  int64_t text_docs_split = 0;
  std::vector<std::pair<std::string, std::string>> rejected;  // (record_id, reason)
  std::vector<std::pair<std::string, std::string>> files;  // finish(): (file name, "<algo>:<hex>"), shard_files() order
};

// A bounded FIFO between two threads: push() blocks while it is full, pop() while it is empty and returns false once
// it is closed and drained. close(discard) ends it (discard: drop what is queued); a push after close is dropped.
template <typename T>
class BoundedQueue {
 public:
  explicit BoundedQueue(size_t capacity) : capacity_(capacity) {}
  void push(T&& item) {
    std::unique_lock<std::mutex> lock(mu_);
    space_cv_.wait(lock, [&] { return items_.size() < capacity_ || closed_; });
    if (closed_) return;
    items_.push_back(std::move(item));
    cv_.notify_one();
  }
  bool pop(T& out) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return closed_ || !items_.empty(); });
    if (items_.empty()) return false;
    out = std::move(items_.front());
    items_.pop_front();
    space_cv_.notify_one();
    return true;
  }
  void close(bool discard) {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    if (discard) items_.clear();
    cv_.notify_all();
    space_cv_.notify_all();
  }

 private:
  const size_t capacity_;
  std::mutex mu_;
  std::condition_variable cv_, space_cv_;
  std::deque<T> items_;
  bool closed_ = false;
};

// A small fixed pool; parallel_for runs fn(0..n-1) on the pool plus the calling thread and waits.
class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // total threads incl. the caller; <= 1 means run inline
  ~ThreadPool();
  void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  void worker();
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, next_ = 0, finished_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

class ShardBuilder {
 public:
  explicit ShardBuilder(ShardBuilderConfig config);
  ~ShardBuilder();
  ShardBuilder(const ShardBuilder&) = delete;
  ShardBuilder& operator=(const ShardBuilder&) = delete;

  // A document to add later, on the intake thread. The caller keeps every pointer in `items` valid (and unchanged)
  // until completed() >= the sequence number submit() returns; `release` flags (e.g. a worker's slot-busy byte in
  // shared memory) are set to 0 as soon as the document's bytes have been copied.
  struct Submission {
    std::string record_id;
    std::vector<DocItem> items;
    std::vector<uint8_t*> release;
  };

  // Thread-safe with respect to other calls on the same builder (serialised). Throws std::invalid_argument on a
  // malformed item (image shape) naming the record. Returns once the document is copied in.
  void add_document(const std::string& record_id, const std::vector<DocItem>& items);
  // The same, asynchronous: validates in the calling thread (errors name the record), then queues the document for
  // the intake thread, which lays it out, copies its patches and packs, in submission order. Returns its sequence
  // number. A document-producing process thereby hands over the copying and packing and goes on with the next
  // record (the build's parent, which would otherwise be the bottleneck with many workers).
  uint64_t submit(Submission doc);
  uint64_t completed() const { return done_seq_.load(std::memory_order_acquire); }
  // Emits everything, writes + fsyncs all files under temp names, renames them into place (sidecar last).
  ShardStats finish();
  // Removes the temp files; the builder is unusable afterwards. Called by the destructor unless finished.
  void abort() noexcept;

  ShardStats stats_snapshot();  // running counts (emitted packs only)
  int64_t pending_documents();
  const ShardBuilderConfig& config() const { return cfg_; }

 private:
  struct Doc {
    TokenBuffer tokens;  // [BOS] + layout + [EOS] (or a chunk of it)
    ByteBuffer patches;  // n_patches * 3072, in <vpatch> order
    int64_t n_images = 0, n_patches = 0, n_vision_tokens = 0;
  };
  struct PackJob {
    std::vector<std::unique_ptr<Doc>> docs;
  };

  void validate(const std::string& record_id, const std::vector<DocItem>& items) const;
  void ingest(const std::string& record_id, const std::vector<DocItem>& items);  // on the intake thread
  void intake_loop();
  void drain();  // wait until the intake thread has ingested everything submitted; rethrows its error
  void add_doc_to_planner(std::unique_ptr<Doc> doc);
  void emit(std::vector<BestFitPlanner::Bin> bins);
  void write_pack(const PackJob& job);
  void check_writer_error();
  void stop_threads(bool discard) noexcept;  // discard: drop queued packs (abort)
  std::string sidecar_json(const ShardStats& s) const;

  ShardBuilderConfig cfg_;
  std::mutex api_mu_;  // serialises the public calls
  BestFitPlanner planner_;
  std::map<int64_t, std::unique_ptr<Doc>> buffered_;  // planner item id -> document
  int64_t buffered_bytes_ = 0;
  int64_t next_id_ = 0;
  std::unique_ptr<ThreadPool> pool_;

  std::unique_ptr<MMIdxWriter> tokens_w_, patches_w_, docs_w_;
  std::string sidecar_path_;

  // Packs go emit() -> packs_ -> writer thread (writes them in emission order; XXH64 hashes each chunk just before
  // writing it) which hands the patch buffers back to the pool. With SHA-256 (~1.7 GB/s, one sequential chain) the
  // patches file, nearly all the bytes, is hashed by a third thread instead: writer -> hashes_ -> hasher thread, over
  // exactly what was written, in the same order, beside the writes instead of in front of each of them.
  static constexpr size_t kMaxQueuedPacks = 8;
  // submit() -> intake_ -> intake thread (ingest: layout, copy, planner, emit). Bounded: a full queue blocks submit().
  static constexpr size_t kMaxQueuedDocs = 64;
  struct Queued {
    Submission doc;
    uint64_t seq = 0;
  };
  BoundedQueue<Queued> intake_{kMaxQueuedDocs};
  std::thread intake_thread_;
  uint64_t submitted_seq_ = 0;  // under api_mu_
  std::atomic<uint64_t> done_seq_{0};
  std::mutex intake_mu_;
  std::condition_variable intake_cv_;
  std::exception_ptr intake_error_;  // under intake_mu_
  std::atomic<bool> aborting_{false};
  void writer_loop();
  void hasher_loop();
  BoundedQueue<PackJob> packs_{kMaxQueuedPacks}, hashes_{kMaxQueuedPacks};
  std::thread writer_, hasher_;
  std::mutex error_mu_;
  std::exception_ptr writer_error_;

  std::mutex stats_mu_;
  ShardStats stats_;
  bool finished_ = false, aborted_ = false;
};

}  // namespace solo
