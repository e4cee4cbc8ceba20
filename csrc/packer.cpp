// SOLO shard packer (best-fit-decreasing over a bounded buffer) and its pybind11 bindings. See packer.h and
// docs/shard_format.md.
#include "packer.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <stdexcept>

#include "format.h"
#include "checksum.h"

namespace py = pybind11;

namespace solo {

// ===================================================================================== BestFitPlanner
BestFitPlanner::BestFitPlanner(int64_t capacity, int64_t buffer_items, int64_t slack)
    : capacity_(capacity), buffer_items_(buffer_items), slack_(slack >= 0 ? slack : capacity / 256) {
  if (capacity < 1) throw std::invalid_argument("seq_length must be >= 1, got " + std::to_string(capacity));
  if (buffer_items < 1) throw std::invalid_argument("buffer_docs must be >= 1, got " + std::to_string(buffer_items));
  items_.reserve(static_cast<size_t>(buffer_items));
}

std::vector<BestFitPlanner::Bin> BestFitPlanner::push(int64_t id, int64_t length) {
  if (length < 1 || length > capacity_) {
    throw std::invalid_argument("planner item of length " + std::to_string(length) + " does not fit a pack of " +
                                std::to_string(capacity_));
  }
  items_.push_back({id, length});
  if (static_cast<int64_t>(items_.size()) >= buffer_items_) return round(false, buffer_items_ / 2);
  return {};
}

std::vector<BestFitPlanner::Bin> BestFitPlanner::flush() { return round(true, 0); }

std::vector<BestFitPlanner::Bin> BestFitPlanner::shrink() {
  return round(false, static_cast<int64_t>(items_.size()) / 2);
}

std::vector<BestFitPlanner::Bin> BestFitPlanner::round(bool final, int64_t retain_limit) {
  // Best-fit decreasing: longest first (ties: earliest arrival), each into the open bin with the least room that
  // still fits (ties: the bin that reached that room first).
  std::sort(items_.begin(), items_.end(), [](const Item& a, const Item& b) {
    return a.length != b.length ? a.length > b.length : a.id < b.id;
  });
  struct OpenBin {
    int64_t remaining;
    std::vector<Item> items;
  };
  std::vector<OpenBin> bins;
  std::multimap<int64_t, size_t> by_room;
  for (const Item& it : items_) {
    auto slot = by_room.lower_bound(it.length);
    size_t b;
    if (slot == by_room.end()) {
      b = bins.size();
      bins.push_back({capacity_, {}});
    } else {
      b = slot->second;
      by_room.erase(slot);
    }
    bins[b].remaining -= it.length;
    bins[b].items.push_back(it);
    if (bins[b].remaining > 0) by_room.emplace(bins[b].remaining, b);
  }

  std::vector<char> emit(bins.size(), final ? 1 : 0);
  if (!final) {
    int64_t retained = 0;
    for (size_t b = 0; b < bins.size(); ++b) {
      if (bins[b].remaining <= slack_) {
        emit[b] = 1;
      } else {
        retained += static_cast<int64_t>(bins[b].items.size());
      }
    }
    // Bound the buffer: keep at most retain_limit items for re-packing; emit the fullest of the rest.
    if (retained > retain_limit) {
      std::vector<size_t> kept;
      for (size_t b = 0; b < bins.size(); ++b) {
        if (!emit[b]) kept.push_back(b);
      }
      std::stable_sort(kept.begin(), kept.end(),
                       [&](size_t a, size_t b) { return bins[a].remaining < bins[b].remaining; });
      for (size_t b : kept) {
        if (retained <= retain_limit) break;
        emit[b] = 1;
        retained -= static_cast<int64_t>(bins[b].items.size());
      }
    }
  }

  std::vector<Bin> out;
  std::vector<Item> keep;
  for (size_t b = 0; b < bins.size(); ++b) {
    if (emit[b]) {
      Bin ids;
      ids.reserve(bins[b].items.size());
      for (const Item& it : bins[b].items) ids.push_back(it.id);
      out.push_back(std::move(ids));
    } else {
      keep.insert(keep.end(), bins[b].items.begin(), bins[b].items.end());
    }
  }
  items_ = std::move(keep);
  return out;
}

// ===================================================================================== ThreadPool
ThreadPool::ThreadPool(int n_threads) {
  for (int i = 1; i < n_threads; ++i) workers_.emplace_back(&ThreadPool::worker, this);
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::worker() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [&] { return stop_ || (fn_ != nullptr && next_ < n_); });
    if (stop_) return;
    while (fn_ != nullptr && next_ < n_) {
      const int64_t i = next_++;
      const auto* fn = fn_;
      lock.unlock();
      try {
        (*fn)(i);
      } catch (...) {
        std::lock_guard<std::mutex> g(mu_);
        if (!error_) error_ = std::current_exception();
      }
      lock.lock();
      if (++finished_ == n_) done_cv_.notify_all();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (workers_.empty() || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::unique_lock<std::mutex> lock(mu_);
  fn_ = &fn;
  n_ = n;
  next_ = 0;
  finished_ = 0;
  error_ = nullptr;
  cv_.notify_all();
  while (next_ < n_) {  // the caller works too
    const int64_t i = next_++;
    lock.unlock();
    try {
      fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> g(mu_);
      if (!error_) error_ = std::current_exception();
    }
    lock.lock();
    ++finished_;
  }
  done_cv_.wait(lock, [&] { return finished_ == n_; });
  fn_ = nullptr;
  std::exception_ptr err = error_;
  error_ = nullptr;
  lock.unlock();
  if (err) std::rethrow_exception(err);
}

// ===================================================================================== ShardBuilder
namespace {

void check_ids(const ShardBuilderConfig& c) {
  if (c.seq_length < 4) throw std::invalid_argument("seq_length must be >= 4, got " + std::to_string(c.seq_length));
  if (c.threads < 1) throw std::invalid_argument("threads must be >= 1, got " + std::to_string(c.threads));
  for (int32_t id : {c.bos_id, c.eos_id, c.pad_id, c.vision_id, c.vpatch_id, c.row_sep_id, c.vision_end_id}) {
    if (id < 0) throw std::invalid_argument("token ids must be >= 0 (got " + std::to_string(id) + ")");
  }
}

constexpr int64_t kPatchRowsPerTask = 8;  // patchify work unit: 8 patch rows of one image

}  // namespace

// ===================================================================================== BufferPool
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

ShardBuilder::ShardBuilder(ShardBuilderConfig config)
    : cfg_(std::move(config)), planner_(cfg_.seq_length, cfg_.buffer_docs) {
  check_ids(cfg_);
  if (cfg_.first_special_id < 0) {
    cfg_.first_special_id = std::min({cfg_.vision_id, cfg_.vpatch_id, cfg_.row_sep_id, cfg_.vision_end_id});
  }
  if (cfg_.out_prefix.empty()) throw std::invalid_argument("out_prefix must not be empty");
  if (cfg_.threads > 1) pool_ = std::make_unique<ThreadPool>(cfg_.threads);
  tokens_w_ = std::make_unique<MMIdxWriter>(cfg_.out_prefix + ".tokens", MMIdxDType::kInt32, cfg_.checksum);
  patches_w_ = std::make_unique<MMIdxWriter>(cfg_.out_prefix + ".patches", MMIdxDType::kUInt8, cfg_.checksum);
  docs_w_ = std::make_unique<MMIdxWriter>(cfg_.out_prefix + ".docs", MMIdxDType::kInt32, cfg_.checksum);
  sidecar_path_ = cfg_.out_prefix + ".json";
  if (cfg_.checksum == ChecksumAlgo::kSha256) {
    patches_w_->hash_bin_externally();
    hasher_ = std::thread(&ShardBuilder::hasher_loop, this);
  }
  writer_ = std::thread(&ShardBuilder::writer_loop, this);
  intake_thread_ = std::thread(&ShardBuilder::intake_loop, this);
}

ShardBuilder::~ShardBuilder() {
  if (!finished_) abort();
}

void ShardBuilder::check_writer_error() {
  std::lock_guard<std::mutex> lock(error_mu_);
  if (writer_error_) std::rethrow_exception(writer_error_);
}

void ShardBuilder::validate(const std::string& record_id, const std::vector<DocItem>& items) const {
  for (size_t k = 0; k < items.size(); ++k) {
    if (!items[k].is_image()) continue;
    try {
      check_image_shape(items[k].height, items[k].width);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("record " + record_id + ", item " + std::to_string(k) + ": " + e.what());
    }
  }
}

uint64_t ShardBuilder::submit(Submission doc) {
  std::lock_guard<std::mutex> api_lock(api_mu_);
  if (finished_ || aborted_) throw std::logic_error("ShardBuilder: add_document after finish()/abort()");
  check_writer_error();
  {
    std::lock_guard<std::mutex> lock(intake_mu_);
    if (intake_error_) std::rethrow_exception(intake_error_);
  }
  validate(doc.record_id, doc.items);
  const uint64_t seq = ++submitted_seq_;
  intake_.push({std::move(doc), seq});
  return seq;
}

void ShardBuilder::add_document(const std::string& record_id, const std::vector<DocItem>& items) {
  const uint64_t seq = submit({record_id, items, {}});
  std::unique_lock<std::mutex> lock(intake_mu_);
  intake_cv_.wait(lock, [&] { return done_seq_.load(std::memory_order_acquire) >= seq; });
  if (intake_error_) std::rethrow_exception(intake_error_);
}

void ShardBuilder::intake_loop() {
  Queued q;
  while (intake_.pop(q)) {
    bool skip = aborting_.load(std::memory_order_acquire);
    {
      std::lock_guard<std::mutex> lock(intake_mu_);
      skip = skip || intake_error_ != nullptr;  // after an error: keep draining, ingest nothing more
    }
    if (!skip) {
      try {
        ingest(q.doc.record_id, q.doc.items);
      } catch (...) {
        std::lock_guard<std::mutex> lock(intake_mu_);
        intake_error_ = std::current_exception();
      }
    }
    // The bytes are copied (or will never be): the producer may reuse them. Release order: our reads come first.
    for (uint8_t* flag : q.doc.release) __atomic_store_n(flag, uint8_t{0}, __ATOMIC_RELEASE);
    {
      std::lock_guard<std::mutex> lock(intake_mu_);
      done_seq_.store(q.seq, std::memory_order_release);
    }
    intake_cv_.notify_all();
  }
}

void ShardBuilder::drain() {
  std::unique_lock<std::mutex> lock(intake_mu_);
  intake_cv_.wait(lock, [&] { return done_seq_.load(std::memory_order_acquire) >= submitted_seq_; });
  if (intake_error_) std::rethrow_exception(intake_error_);
}

void ShardBuilder::ingest(const std::string& record_id, const std::vector<DocItem>& items) {
  const int64_t S = cfg_.seq_length;

  // 1. Sizes (and shape checks) before any heavy work.
  int64_t total = 2, image_tokens = 0, n_patches = 0, n_images = 0;
  for (const DocItem& it : items) {
    if (it.is_image()) {  // shapes were checked by validate()
      const int64_t n_h = it.height / kPatchSize, n_w = it.width / kPatchSize;
      image_tokens += image_token_count(n_h, n_w);
      n_patches += n_h * n_w;
      ++n_images;
    } else {
      total += it.n_tokens;
    }
  }
  total += image_tokens;
  stats_.input_documents++;
  if (image_tokens + 2 > S) {
    stats_.rejected.emplace_back(record_id, "images_exceed_pack");
    return;
  }
  if (total > S && cfg_.drop_long_text) {
    stats_.rejected.emplace_back(record_id, "long_text_dropped");
    return;
  }

  // 2. Lay out tokens; patchify images (in parallel strips of patch rows).
  auto doc = std::make_unique<Doc>();
  doc->tokens.resize(static_cast<size_t>(total));
  doc->patches = patch_buffers().take(static_cast<size_t>(n_patches * kPatchDim));
  doc->n_images = n_images;
  doc->n_patches = n_patches;
  doc->n_vision_tokens = image_tokens;
  struct Strip {
    const uint8_t* src;
    int64_t rows, width;
    uint8_t* dst;
  };
  struct Segment {
    int64_t length, patches;
    bool image;
  };
  std::vector<Strip> strips;
  std::vector<Segment> segments;
  segments.reserve(items.size() + 2);
  int32_t* tok = doc->tokens.data();
  int64_t pos = 0, patch_pos = 0;
  tok[pos++] = cfg_.bos_id;
  segments.push_back({1, 0, false});
  for (const DocItem& it : items) {
    if (it.is_image()) {
      const int64_t n_h = it.height / kPatchSize, n_w = it.width / kPatchSize;
      const int64_t n_tok = image_token_count(n_h, n_w);
      image_layout(n_h, n_w, cfg_.vision_id, cfg_.vpatch_id, cfg_.row_sep_id, cfg_.vision_end_id, tok + pos, nullptr);
      if (it.patchified) {  // a sequential copy: cheap even when the bytes come cold from another process
        std::memcpy(doc->patches.data() + patch_pos * kPatchDim, it.pixels,
                    static_cast<size_t>(n_h * n_w * kPatchDim));
      }
      for (int64_t r0 = 0; !it.patchified && r0 < n_h; r0 += kPatchRowsPerTask) {
        const int64_t rows = std::min(kPatchRowsPerTask, n_h - r0);
        strips.push_back({it.pixels + r0 * kPatchSize * it.width * kChannels, rows, it.width,
                          doc->patches.data() + (patch_pos + r0 * n_w) * kPatchDim});
      }
      segments.push_back({n_tok, n_h * n_w, true});
      pos += n_tok;
      patch_pos += n_h * n_w;
    } else if (it.n_tokens > 0) {
      std::memcpy(tok + pos, it.tokens, static_cast<size_t>(it.n_tokens) * sizeof(int32_t));
      segments.push_back({it.n_tokens, 0, false});
      pos += it.n_tokens;
    }
  }
  tok[pos++] = cfg_.eos_id;
  segments.push_back({1, 0, false});
  auto run_strip = [&](int64_t i) {
    const Strip& s = strips[static_cast<size_t>(i)];
    patchify(s.src, s.rows * kPatchSize, s.width, s.dst);
  };
  if (pool_) {
    pool_->parallel_for(static_cast<int64_t>(strips.size()), run_strip);
  } else {
    for (size_t i = 0; i < strips.size(); ++i) run_strip(static_cast<int64_t>(i));
  }

  if (total <= S) {
    add_doc_to_planner(std::move(doc));
    return;
  }

  // 3. Longer than a pack (its images fit): cut into chunks of at most S tokens, never inside an image. Pure text
  //    gives chunks of exactly S (the last one shorter); each chunk is its own document.
  stats_.text_docs_split++;
  struct Cut {
    int64_t tokens, patches, images, vision_tokens;
  };
  std::vector<Cut> chunks;
  Cut cur{0, 0, 0, 0};
  for (const Segment& seg : segments) {
    if (seg.image) {
      if (cur.tokens + seg.length > S) {
        chunks.push_back(cur);
        cur = {0, 0, 0, 0};
      }
      cur.tokens += seg.length;
      cur.patches += seg.patches;
      cur.images += 1;
      cur.vision_tokens += seg.length;
    } else {
      int64_t left = seg.length;
      while (left > 0) {
        if (cur.tokens == S) {
          chunks.push_back(cur);
          cur = {0, 0, 0, 0};
        }
        const int64_t take = std::min(left, S - cur.tokens);
        cur.tokens += take;
        left -= take;
      }
    }
  }
  if (cur.tokens > 0) chunks.push_back(cur);
  int64_t t0 = 0, p0 = 0;
  for (const Cut& c : chunks) {
    auto part = std::make_unique<Doc>();
    part->tokens.assign(doc->tokens.begin() + t0, doc->tokens.begin() + t0 + c.tokens);
    part->patches.assign(doc->patches.begin() + p0 * kPatchDim, doc->patches.begin() + (p0 + c.patches) * kPatchDim);
    part->n_images = c.images;
    part->n_patches = c.patches;
    part->n_vision_tokens = c.vision_tokens;
    t0 += c.tokens;
    p0 += c.patches;
    add_doc_to_planner(std::move(part));
  }
}

void ShardBuilder::add_doc_to_planner(std::unique_ptr<Doc> doc) {
  const int64_t id = next_id_++;
  const int64_t length = static_cast<int64_t>(doc->tokens.size());
  buffered_bytes_ += static_cast<int64_t>(doc->tokens.size() * sizeof(int32_t) + doc->patches.size());
  buffered_.emplace(id, std::move(doc));
  emit(planner_.push(id, length));
  if (buffered_bytes_ > cfg_.buffer_bytes) emit(planner_.shrink());
}

void ShardBuilder::emit(std::vector<BestFitPlanner::Bin> bins) {
  for (auto& bin : bins) {
    PackJob job;
    int64_t real = 0;
    for (int64_t id : bin) {
      auto node = buffered_.find(id);
      std::unique_ptr<Doc> d = std::move(node->second);
      buffered_.erase(node);
      buffered_bytes_ -= static_cast<int64_t>(d->tokens.size() * sizeof(int32_t) + d->patches.size());
      real += static_cast<int64_t>(d->tokens.size());
      stats_.documents++;
      stats_.images += d->n_images;
      stats_.patches += d->n_patches;
      stats_.tokens_vision += d->n_vision_tokens;
      stats_.tokens_text += static_cast<int64_t>(d->tokens.size()) - d->n_vision_tokens;
      job.docs.push_back(std::move(d));
    }
    if (real > cfg_.seq_length) throw std::logic_error("ShardBuilder: internal error, over-long pack");
    stats_.packs++;
    stats_.tokens_total += real;
    stats_.pad_tokens += cfg_.seq_length - real;
    stats_.slots += cfg_.seq_length;
    check_writer_error();
    packs_.push(std::move(job));  // never blocks for good: after an error the writer keeps draining
  }
}

void ShardBuilder::writer_loop() {
  PackJob job;
  while (packs_.pop(job)) {
    {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (writer_error_) continue;  // keep draining so the producer never blocks
    }
    try {
      write_pack(job);
      if (hasher_.joinable()) {
        hashes_.push(std::move(job));
      } else {
        for (auto& d : job.docs) patch_buffers().give(std::move(d->patches));
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu_);
      writer_error_ = std::current_exception();
    }
  }
}

void ShardBuilder::write_pack(const PackJob& job) {
  const int64_t S = cfg_.seq_length;
  std::vector<int32_t> cu{0};
  cu.reserve(job.docs.size() + 1);
  tokens_w_->begin_sequence();
  patches_w_->begin_sequence();
  for (const auto& d : job.docs) {
    tokens_w_->append(d->tokens.data(), static_cast<int64_t>(d->tokens.size()));
    patches_w_->append(d->patches.data(), static_cast<int64_t>(d->patches.size()));
    cu.push_back(cu.back() + static_cast<int32_t>(d->tokens.size()));
  }
  if (cu.back() < S) {
    const std::vector<int32_t> pad(static_cast<size_t>(S - cu.back()), cfg_.pad_id);
    tokens_w_->append(pad.data(), static_cast<int64_t>(pad.size()));
  }
  tokens_w_->end_sequence();
  patches_w_->end_sequence();
  docs_w_->begin_sequence();
  docs_w_->append(cu.data(), static_cast<int64_t>(cu.size()));
  docs_w_->end_sequence();
}

void ShardBuilder::hasher_loop() {
  PackJob job;
  while (hashes_.pop(job)) {
    for (auto& d : job.docs) {  // exactly the bytes write_pack appended to the patches file, in order
      patches_w_->hash_bin(d->patches.data(), d->patches.size());
      patch_buffers().give(std::move(d->patches));
    }
  }
}

void ShardBuilder::stop_threads(bool discard) noexcept {
  if (discard) aborting_.store(true, std::memory_order_release);  // the intake thread drains without ingesting
  intake_.close(false);
  if (intake_thread_.joinable()) intake_thread_.join();
  packs_.close(discard);
  if (writer_.joinable()) writer_.join();
  hashes_.close(discard);  // the writer, its only producer, has stopped
  if (hasher_.joinable()) hasher_.join();
}

// Built with std::to_string, not an ostringstream: iostreams go through the process-wide C++ locale, and a
// toolchain that links libstdc++ statically into this module (seen on a GPU node's /opt/gcc) then mixes two copies'
// locale facets with the libstdc++.so that torch loaded: `ostream << long` segfaulted there.
std::string ShardBuilder::sidecar_json(const ShardStats& s) const {
  using std::to_string;
  std::string o;
  o.reserve(1024);
  auto field = [&o](const char* name, int64_t value, const char* after = ",\n") {
    o += "  \"";
    o += name;
    o += "\": " + to_string(value) + after;
  };
  o += "{\n  \"format\": \"solo-shard\",\n  \"format_version\": 1,\n";
  field("seq_length", cfg_.seq_length);
  field("patch_dim", kPatchDim);
  o += "  \"token_ids\": {\"bos\": " + to_string(cfg_.bos_id) + ", \"eos\": " + to_string(cfg_.eos_id) +
       ", \"pad\": " + to_string(cfg_.pad_id) + ", \"vision\": " + to_string(cfg_.vision_id) +
       ", \"vpatch\": " + to_string(cfg_.vpatch_id) + ", \"row_sep\": " + to_string(cfg_.row_sep_id) +
       ", \"vision_end\": " + to_string(cfg_.vision_end_id) + ", \"first_special\": " +
       to_string(cfg_.first_special_id) + "},\n";
  field("packs", s.packs);
  field("documents", s.documents);
  field("input_documents", s.input_documents);
  field("images", s.images);
  field("patches", s.patches);
  field("tokens_total", s.tokens_total);
  field("tokens_text", s.tokens_text);
  field("tokens_vision", s.tokens_vision);
  field("pad_tokens", s.pad_tokens);
  field("slots", s.slots);
  field("text_docs_split", s.text_docs_split);
  field("rejected", static_cast<int64_t>(s.rejected.size()), "\n");
  o += "}\n";
  return o;
}

ShardStats ShardBuilder::finish() {
  std::lock_guard<std::mutex> api_lock(api_mu_);
  if (finished_ || aborted_) throw std::logic_error("ShardBuilder: finish() called twice or after abort()");
  drain();
  emit(planner_.flush());
  stop_threads(false);
  check_writer_error();
  tokens_w_->finish();
  patches_w_->finish();
  docs_w_->finish();

  const std::string tmp = temp_path_for(sidecar_path_);
  std::string json_checksum;
  {
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (f == nullptr) throw std::runtime_error("cannot create " + tmp + ": " + std::strerror(errno));
    const std::string json = sidecar_json(stats_);
    Checksum json_hash(cfg_.checksum);
    json_hash.update(json.data(), json.size());
    json_checksum = json_hash.hexdigest();
    const bool ok = std::fwrite(json.data(), 1, json.size(), f) == json.size() && std::fflush(f) == 0 &&
                    ::fsync(::fileno(f)) == 0;
    std::fclose(f);
    if (!ok) throw std::runtime_error("cannot write " + tmp + ": " + std::strerror(errno));
  }
  // Data files first, the sidecar last: a shard is complete iff {prefix}.json exists.
  tokens_w_->commit();
  patches_w_->commit();
  docs_w_->commit();
  if (std::rename(tmp.c_str(), sidecar_path_.c_str()) != 0) {
    throw std::runtime_error("cannot rename " + tmp + ": " + std::strerror(errno));
  }
  fsync_parent_dir(sidecar_path_);
  finished_ = true;
  // File checksums, computed while writing; the order and names of data/shards.py shard_files().
  const auto slash = cfg_.out_prefix.find_last_of('/');
  const std::string base = slash == std::string::npos ? cfg_.out_prefix : cfg_.out_prefix.substr(slash + 1);
  const std::pair<const char*, const MMIdxWriter*> parts[] = {
      {"tokens", tokens_w_.get()}, {"patches", patches_w_.get()}, {"docs", docs_w_.get()}};
  stats_.files.clear();
  for (const auto& [part, w] : parts) {
    stats_.files.emplace_back(base + "." + part + ".bin", w->bin_checksum());
    stats_.files.emplace_back(base + "." + part + ".idx", w->idx_checksum());
  }
  stats_.files.emplace_back(base + ".json", json_checksum);
  return stats_;
}

void ShardBuilder::abort() noexcept {
  std::lock_guard<std::mutex> api_lock(api_mu_);
  if (finished_ || aborted_) return;
  aborted_ = true;
  stop_threads(true);
  if (tokens_w_) tokens_w_->abort();
  if (patches_w_) patches_w_->abort();
  if (docs_w_) docs_w_->abort();
  std::remove(temp_path_for(sidecar_path_).c_str());
  buffered_.clear();
  buffered_bytes_ = 0;
}

ShardStats ShardBuilder::stats_snapshot() {
  std::lock_guard<std::mutex> api_lock(api_mu_);
  if (!finished_ && !aborted_) drain();
  return stats_;
}

int64_t ShardBuilder::pending_documents() {
  std::lock_guard<std::mutex> api_lock(api_mu_);
  if (!finished_ && !aborted_) drain();
  return planner_.pending();
}

}  // namespace solo

// ===================================================================================== Python bindings
namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

py::dict stats_to_dict(const solo::ShardStats& s) {
  py::dict d;
  d["packs"] = s.packs;
  d["documents"] = s.documents;
  d["input_documents"] = s.input_documents;
  d["images"] = s.images;
  d["patches"] = s.patches;
  d["tokens_total"] = s.tokens_total;
  d["tokens_text"] = s.tokens_text;
  d["tokens_vision"] = s.tokens_vision;
  d["pad_tokens"] = s.pad_tokens;
  d["slots"] = s.slots;
  d["fill"] = s.slots > 0 ? static_cast<double>(s.tokens_total) / static_cast<double>(s.slots) : 0.0;
  d["text_docs_split"] = s.text_docs_split;
  py::list rejected;
  for (const auto& r : s.rejected) rejected.append(py::make_tuple(r.first, r.second));
  d["rejected"] = rejected;
  py::dict files;
  for (const auto& f : s.files) files[py::str(f.first)] = f.second;
  d["files"] = files;
  return d;
}

bool parse_long_text(const std::string& mode) {
  if (mode == "split") return false;
  if (mode == "drop") return true;
  throw std::invalid_argument("long_text must be \"split\" or \"drop\", got \"" + mode + "\"");
}

// The Python face of ShardBuilder: also owns what asynchronous add_document calls pinned (the arrays the intake thread
// reads later) and drops each pin, under the GIL, once the intake thread is past its document.
class PyShardBuilder : public solo::ShardBuilder {
 public:
  using solo::ShardBuilder::ShardBuilder;
  ~PyShardBuilder() { abort(); }  // joins the intake thread before the pinned arrays are released
  struct Pin {
    uint64_t seq;
    std::vector<py::object> objects;
    std::vector<std::vector<int32_t>> converted;
  };
  std::deque<Pin> pins;
  void unpin_completed() {
    const uint64_t done = completed();
    while (!pins.empty() && pins.front().seq <= done) pins.pop_front();
  }
};

void py_add_document(PyShardBuilder& b, const std::string& record_id, const py::list& items,
                     const std::optional<py::list>& release) {
  // Under the GIL: validate and pin the arrays (contiguous views; int64 token arrays are converted).
  b.unpin_completed();
  std::vector<py::object> keep;
  std::vector<std::vector<int32_t>> converted;
  std::vector<solo::DocItem> doc_items;
  keep.reserve(items.size());
  converted.reserve(items.size());
  doc_items.reserve(items.size());
  for (size_t k = 0; k < items.size(); ++k) {
    py::handle h = items[k];
    if (!py::isinstance<py::array>(h)) {
      throw py::type_error("record " + record_id + ", item " + std::to_string(k) +
                           ": expected a numpy array (int32 token ids or uint8 [H, W, 3] image), got " +
                           py::str(py::type::of(h)).cast<std::string>());
    }
    auto a = py::reinterpret_borrow<py::array>(h);
    const char kind = a.dtype().kind();
    solo::DocItem item;
    if (a.ndim() == 1 && (kind == 'i' || kind == 'u')) {
      if (py::array_t<int32_t>::check_(a)) {  // dtype equivalence, not identity (unpickled arrays)
        auto c = py::array_t<int32_t, py::array::c_style>::ensure(a);
        item.tokens = c.data();
        item.n_tokens = c.shape(0);
        keep.push_back(std::move(c));
      } else {
        auto c = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
        std::vector<int32_t> v(static_cast<size_t>(c.shape(0)));
        const int64_t* src = c.data();
        for (size_t i = 0; i < v.size(); ++i) {
          if (src[i] < 0 || src[i] > std::numeric_limits<int32_t>::max()) {
            throw std::invalid_argument("record " + record_id + ", item " + std::to_string(k) + ": token id " +
                                        std::to_string(src[i]) + " out of int32 range");
          }
          v[i] = static_cast<int32_t>(src[i]);
        }
        converted.push_back(std::move(v));
        item.tokens = converted.back().data();
        item.n_tokens = static_cast<int64_t>(converted.back().size());
      }
    } else if (a.ndim() == 3 && py::array_t<uint8_t>::check_(a) &&
               (a.shape(2) == 3 || a.shape(2) == solo::kPatchDim)) {
      auto c = py::array_t<uint8_t, py::array::c_style>::ensure(a);
      item.pixels = c.data();
      item.patchified = c.shape(2) == solo::kPatchDim;  // [n_h, n_w, 3072]: the image's patch grid
      const int64_t scale = item.patchified ? solo::kPatchSize : 1;
      item.height = c.shape(0) * scale;
      item.width = c.shape(1) * scale;
      keep.push_back(std::move(c));
    } else {
      throw py::type_error("record " + record_id + ", item " + std::to_string(k) +
                           ": expected 1-D int32 token ids, a uint8 [H, W, 3] image or its uint8 [H/32, W/32, "
                           "3072] patch grid, got dtype " +
                           py::str(a.dtype()).cast<std::string>() + " shape " + shape_str(a));
    }
    doc_items.push_back(item);
  }
  if (!release) {
    py::gil_scoped_release nogil;
    b.add_document(record_id, doc_items);
    return;
  }
  std::vector<uint8_t*> flags;
  for (py::handle h : *release) {
    auto f = py::reinterpret_borrow<py::object>(h);
    if (!py::array_t<uint8_t>::check_(f) || py::reinterpret_borrow<py::array>(f).size() < 1 ||
        !py::reinterpret_borrow<py::array>(f).writeable()) {
      throw py::type_error("record " + record_id + ": release flags must be writable uint8 arrays of size >= 1");
    }
    flags.push_back(static_cast<uint8_t*>(py::reinterpret_borrow<py::array>(f).mutable_data()));
    keep.push_back(std::move(f));
  }
  uint64_t seq;
  {
    py::gil_scoped_release nogil;  // submit() may wait for room in the intake queue
    seq = b.submit({record_id, std::move(doc_items), std::move(flags)});
  }
  b.pins.push_back({seq, std::move(keep), std::move(converted)});
}

py::dict py_plan_packs(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lengths,
                       int64_t seq_length, int64_t buffer_docs, const std::string& long_text, int64_t slack) {
  const bool drop = parse_long_text(long_text);
  if (lengths.ndim() != 1) throw std::invalid_argument("plan_packs: lengths must be 1-D");
  const int64_t n = lengths.shape(0);
  const int64_t* len = lengths.data();
  std::vector<int64_t> piece_doc, piece_len, pack_offsets{0}, dropped;
  int64_t split = 0;
  {
    py::gil_scoped_release nogil;
    solo::BestFitPlanner planner(seq_length, buffer_docs, slack);
    auto take = [&](std::vector<solo::BestFitPlanner::Bin> bins) {
      for (const auto& bin : bins) {
        piece_doc.insert(piece_doc.end(), bin.begin(), bin.end());  // piece ids, mapped to docs below
        pack_offsets.push_back(static_cast<int64_t>(piece_doc.size()));
      }
    };
    std::vector<std::pair<int64_t, int64_t>> pieces;  // piece id -> (doc, length)
    for (int64_t i = 0; i < n; ++i) {
      if (len[i] < 1) throw std::invalid_argument("plan_packs: lengths must be >= 1");
      if (len[i] > seq_length && drop) {
        dropped.push_back(i);
        continue;
      }
      if (len[i] > seq_length) ++split;
      for (int64_t left = len[i]; left > 0; left -= seq_length) {
        const int64_t l = std::min(left, seq_length);
        pieces.emplace_back(i, l);
        take(planner.push(static_cast<int64_t>(pieces.size()) - 1, l));
      }
    }
    take(planner.flush());
    for (auto& id : piece_doc) {
      const auto& p = pieces[static_cast<size_t>(id)];
      piece_len.push_back(p.second);
      id = p.first;
    }
  }
  auto to_np = [](const std::vector<int64_t>& v) {
    py::array_t<int64_t> a(static_cast<py::ssize_t>(v.size()));
    if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(int64_t));
    return a;
  };
  py::dict d;
  d["pack_offsets"] = to_np(pack_offsets);
  d["piece_doc"] = to_np(piece_doc);
  d["piece_length"] = to_np(piece_len);
  d["dropped"] = to_np(dropped);
  d["split"] = split;
  return d;
}

}  // namespace

void register_packer(py::module_& m) {
  py::class_<PyShardBuilder>(m, "ShardBuilder",
                                 "Packs documents into seq_length packs and writes one shard: {prefix}.tokens/.patches/"
                                 ".docs (.bin/.idx, MMIDIDX) + {prefix}.json. See docs/shard_format.md.")
      .def(py::init([](const std::string& out_prefix, int64_t seq_length, int32_t bos_id, int32_t eos_id,
                       int32_t pad_id, int32_t vision_id, int32_t vpatch_id, int32_t row_sep_id,
                       int32_t vision_end_id, int64_t buffer_docs, const std::string& long_text, int threads,
                       int32_t first_special_id, int64_t buffer_bytes, const std::string& checksum) {
             solo::ShardBuilderConfig c;
             c.out_prefix = out_prefix;
             c.seq_length = seq_length;
             c.bos_id = bos_id;
             c.eos_id = eos_id;
             c.pad_id = pad_id;
             c.vision_id = vision_id;
             c.vpatch_id = vpatch_id;
             c.row_sep_id = row_sep_id;
             c.vision_end_id = vision_end_id;
             c.buffer_docs = buffer_docs;
             c.drop_long_text = parse_long_text(long_text);
             c.threads = threads;
             c.first_special_id = first_special_id;
             c.buffer_bytes = buffer_bytes;
             c.checksum = solo::parse_checksum_algo(checksum);
             return std::make_unique<PyShardBuilder>(std::move(c));
           }),
           py::arg("out_prefix"), py::arg("seq_length"), py::arg("bos_id"), py::arg("eos_id"), py::arg("pad_id"),
           py::arg("vision_id"), py::arg("vpatch_id"), py::arg("row_sep_id"), py::arg("vision_end_id"),
           py::arg("buffer_docs") = 4096, py::arg("long_text") = "split", py::arg("threads") = 1,
           py::arg("first_special_id") = -1, py::arg("buffer_bytes") = int64_t{1} << 30,
           py::arg("checksum") = "xxh64")
      .def("add_document", &py_add_document, py::arg("record_id"), py::arg("items"), py::arg("release") = py::none(),
           "items in order: 1-D int32 token ids (text), uint8 [H, W, 3] images (H, W multiples of 32) or an image's "
           "patch grid uint8 [H/32, W/32, 3072] (patchify's output, reshaped). The document is [BOS] + items + "
           "[EOS]. Releases the GIL. release=None: returns once the document is copied in. release=[flags]: returns "
           "at once (shapes are checked first); the builder's intake thread copies and packs the document later, in "
           "call order, keeps the arrays alive until then (do not modify them), and sets each flag (a writable uint8 "
           "array, e.g. a worker's slot-busy byte in shared memory) to 0 once the bytes are copied. Errors of a later "
           "step surface on the next call.")
      .def(
          "finish",
          [](PyShardBuilder& b) {
            solo::ShardStats s;
            try {
              py::gil_scoped_release nogil;
              s = b.finish();
            } catch (...) {
              b.unpin_completed();
              throw;
            }
            b.pins.clear();  // finish() joined the intake thread
            return stats_to_dict(s);
          },
          "Flush, write under temp names, fsync, rename into place ({prefix}.json last). Returns the counts.")
      .def(
          "abort",
          [](PyShardBuilder& b) {
            {
              py::gil_scoped_release nogil;
              b.abort();
            }
            b.pins.clear();
          },
          "Drop everything and remove the temp files.")
      .def(
          "stats",
          [](PyShardBuilder& b) {
            solo::ShardStats s;
            {
              py::gil_scoped_release nogil;
              s = b.stats_snapshot();
            }
            b.unpin_completed();
            return stats_to_dict(s);
          },
          "Running counts (packs emitted so far; documents still buffered are not counted yet).")
      .def_property_readonly("pending_documents",
                             [](PyShardBuilder& b) {
                               py::gil_scoped_release nogil;
                               return b.pending_documents();
                             })
      .def("__enter__", [](PyShardBuilder& b) -> PyShardBuilder& { return b; }, py::return_value_policy::reference)
      .def("__exit__", [](PyShardBuilder& b, const py::object&, const py::object&, const py::object&) {
        {
          py::gil_scoped_release nogil;
          b.abort();  // no-op after finish(); a with-block left without finish() leaves no shard
        }
        b.pins.clear();
        return false;
      });

  m.def(
      "checksum",
      [](const py::buffer& data, const std::string& algo, bool portable) {
        const py::buffer_info info = data.request();
        if (!PyBuffer_IsContiguous(info.view(), 'C')) {
          throw std::invalid_argument("checksum: the buffer must be C-contiguous");
        }
        const solo::ChecksumAlgo a = solo::parse_checksum_algo(algo);
        py::gil_scoped_release nogil;
        solo::Checksum h(a, portable);
        h.update(info.ptr, static_cast<size_t>(info.size * info.itemsize));
        return h.hexdigest();
      },
      py::arg("data"), py::arg("algo") = "xxh64", py::arg("portable") = false,
      "'<algo>:<hex>' of a contiguous buffer: the routine the ShardBuilder checksums its files with (algo 'xxh64' or "
      "'sha256'; portable=True: SHA-256 without SHA-NI, for tests).");
  m.def(
      "file_checksum",
      [](const std::string& path, const std::string& algo) {
        const solo::ChecksumAlgo a = solo::parse_checksum_algo(algo);
        py::gil_scoped_release nogil;
        return solo::file_checksum(path, a);
      },
      py::arg("path"), py::arg("algo") = "xxh64", "'<algo>:<hex>' of a file's bytes (GIL released).");
  m.def(
      "release_buffers", [] { solo::patch_buffers().release(); },
      "Free the process-wide pool of patch buffers that ShardBuilders recycle (call after the last builder).");
  m.attr("SHA256_HARDWARE") = solo::Sha256::hardware_accelerated();

  m.def("plan_packs", &py_plan_packs, py::arg("lengths"), py::arg("seq_length"), py::arg("buffer_docs") = 4096,
        py::arg("long_text") = "split", py::arg("slack") = -1,
        "Lengths-only entry into the ShardBuilder's packing routine (same BestFitPlanner). Longer-than-pack items "
        "are split into seq_length pieces (or dropped). Returns dict(pack_offsets int64[P+1], piece_doc int64[N], "
        "piece_length int64[N], dropped int64[], split int): pack p holds pieces pack_offsets[p]:pack_offsets[p+1].");
}
