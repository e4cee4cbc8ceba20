// The SOLO shard builder: documents (text token runs + images) -> packs of exactly seq_length tokens, written as one
// MMIDIDX dataset per part of shard_schema.h ({prefix}.tokens, .patches, .docs, .targets) plus the JSON sidecar
// ({prefix}.json, renamed into place last: it marks a complete shard). See docs/shard_format.md.
//
// Threads: producers submit() documents to the intake thread (intake.h: layout, patch copy, planner.h's packing),
// which hands finished packs to a writer thread; with SHA-256 checksums a hasher thread hashes the patches file.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "buffers.h"
#include "checksum.h"
#include "intake.h"
#include "mmidx_writer.h"
#include "planner.h"
#include "shard_schema.h"
#include "threads.h"

namespace solo {

struct ShardBuilderConfig {
  std::string out_prefix;
  int64_t seq_length = 32768;
  // role -> id, from Python (megatron_solo/format/schema.py TokenIds). The packer needs bos, eos, pad, vision,
  // vpatch, row_sep, vision_end; first_special (ids >= it are never text) defaults to the smallest vision id. The
  // table goes into the sidecar as given (first_special appended when derived).
  TokenTable token_ids;
  int64_t buffer_docs = 4096;
  int64_t buffer_bytes = int64_t{1} << 30;  // also start a packing round when buffered documents hold this much
  bool drop_long_text = false;  // long_text="drop"
  int threads = 1;
  ChecksumAlgo checksum = ChecksumAlgo::kXxh64;  // of every written file (checksum.h)
};

// The ids the layout writes, resolved from ShardBuilderConfig::token_ids.
struct LayoutIds {
  int32_t bos, eos, pad, vision, vpatch, row_sep, vision_end, first_special;
};

class ShardBuilder {
 public:
  explicit ShardBuilder(ShardBuilderConfig config);
  ~ShardBuilder();
  ShardBuilder(const ShardBuilder&) = delete;
  ShardBuilder& operator=(const ShardBuilder&) = delete;

  // Thread-safe with respect to other calls on the same builder (serialised). Throws std::invalid_argument on a
  // malformed item (image shape, an image marked as a target) naming the record. Returns once the document is
  // copied in. Loss targets: the tokens of every text item with target set, and the closing EOS iff eos_target;
  // never BOS nor an image's layout tokens.
  void add_document(const std::string& record_id, const std::vector<DocItem>& items, bool eos_target = true);
  // The same, asynchronous: validates in the calling thread (errors name the record), then queues the document for
  // the intake thread, which lays it out, copies its patches and packs, in submission order. Returns its sequence
  // number. A document-producing process thereby hands over the copying and packing and goes on with the next
  // record (the build's parent, which would otherwise be the bottleneck with many workers).
  uint64_t submit(Submission doc);
  uint64_t completed() const { return intake_->completed(); }
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
    std::vector<int64_t> targets;  // loss-target runs: [start, end) pairs of document positions, sorted, disjoint
    int64_t n_images = 0, n_patches = 0, n_vision_tokens = 0, n_target_tokens = 0;
  };
  struct PackJob {
    std::vector<std::unique_ptr<Doc>> docs;
  };
  struct Segment {  // one run of a laid-out document: BOS, a text item, an image layout, EOS
    int64_t length, patches;
    bool image, target;
  };

  void validate(const std::string& record_id, const std::vector<DocItem>& items) const;
  void ingest(const Submission& doc);  // on the intake thread
  std::unique_ptr<Doc> lay_out(const Submission& doc, int64_t total, std::vector<Segment>& segments);
  void split_long(const Doc& doc, const std::vector<Segment>& segments);
  void add_doc_to_planner(std::unique_ptr<Doc> doc);
  void emit(std::vector<BestFitPlanner::Bin> bins);
  void write_pack(const PackJob& job);
  void writer_loop();
  void hasher_loop();
  void check_writer_error();
  void drain();  // wait until the intake thread has ingested everything submitted; rethrows its error
  void stop_threads(bool discard) noexcept;  // discard: drop queued documents and packs (abort)
  MMIdxWriter& part(ShardPart p) { return *parts_[static_cast<size_t>(p)]; }

  ShardBuilderConfig cfg_;
  LayoutIds ids_;
  std::mutex api_mu_;  // serialises the public calls
  BestFitPlanner planner_;
  std::map<int64_t, std::unique_ptr<Doc>> buffered_;  // planner item id -> document
  int64_t buffered_bytes_ = 0;
  int64_t next_id_ = 0;
  std::unique_ptr<ThreadPool> pool_;

  std::array<std::unique_ptr<MMIdxWriter>, kNumShardParts> parts_;
  std::string sidecar_path_;

  // Packs go emit() -> packs_ -> writer thread (writes them in emission order; XXH64 hashes each chunk just before
  // writing it) which hands the patch buffers back to the pool. With SHA-256 (~1.7 GB/s, one sequential chain) the
  // patches file, nearly all the bytes, is hashed by a third thread instead: writer -> hashes_ -> hasher thread, over
  // exactly what was written, in the same order, beside the writes instead of in front of each of them.
  static constexpr size_t kMaxQueuedPacks = 8;
  BoundedQueue<PackJob> packs_{kMaxQueuedPacks}, hashes_{kMaxQueuedPacks};
  std::thread writer_, hasher_;
  std::mutex error_mu_;
  std::exception_ptr writer_error_;
  std::unique_ptr<IntakeThread> intake_;  // submit() -> intake thread (ingest: layout, copy, planner, emit)

  ShardStats stats_;
  bool finished_ = false, aborted_ = false;
};

}  // namespace solo
