// The shard builder: layout, long-document split, packing, the writer thread, finish/abort (see shard_builder.h).
#include "shard_builder.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "format.h"

namespace solo {

namespace {

constexpr int64_t kPatchRowsPerTask = 8;  // patchify work unit: 8 patch rows of one image

// The roles the layout needs, looked up by name in the table Python passed; first_special is appended if absent.
LayoutIds resolve_ids(TokenTable& table) {
  auto find = [&](const char* role) -> const int32_t* {
    for (const auto& [name, id] : table) {
      if (name == role) return &id;
    }
    return nullptr;
  };
  auto need = [&](const char* role) {
    const int32_t* id = find(role);
    if (id == nullptr) {
      throw std::invalid_argument(std::string("token_ids has no \"") + role +
                                  "\" (needs bos, eos, pad, vision, vpatch, row_sep, vision_end)");
    }
    return *id;
  };
  LayoutIds ids{need("bos"), need("eos"), need("pad"), need("vision"), need("vpatch"), need("row_sep"),
                need("vision_end"), -1};
  for (const auto& [name, id] : table) {
    if (id < 0) throw std::invalid_argument("token ids must be >= 0 (got " + name + " = " + std::to_string(id) + ")");
  }
  if (const int32_t* fs = find("first_special")) {
    ids.first_special = *fs;
  } else {
    ids.first_special = std::min({ids.vision, ids.vpatch, ids.row_sep, ids.vision_end});
    table.emplace_back("first_special", ids.first_special);
  }
  return ids;
}

void check_config(const ShardBuilderConfig& c) {
  if (c.seq_length < 4) throw std::invalid_argument("seq_length must be >= 4, got " + std::to_string(c.seq_length));
  if (c.threads < 1) throw std::invalid_argument("threads must be >= 1, got " + std::to_string(c.threads));
  if (c.out_prefix.empty()) throw std::invalid_argument("out_prefix must not be empty");
}

std::string base_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

ShardBuilder::ShardBuilder(ShardBuilderConfig config)
    : cfg_(std::move(config)), ids_(resolve_ids(cfg_.token_ids)), planner_(cfg_.seq_length, cfg_.buffer_docs) {
  check_config(cfg_);
  if (cfg_.threads > 1) pool_ = std::make_unique<ThreadPool>(cfg_.threads);
  for (size_t k = 0; k < kNumShardParts; ++k) {
    parts_[k] = std::make_unique<MMIdxWriter>(cfg_.out_prefix + "." + kShardParts[k].name, kShardParts[k].dtype,
                                              cfg_.checksum);
  }
  sidecar_path_ = cfg_.out_prefix + kSidecarSuffix;
  if (cfg_.checksum == ChecksumAlgo::kSha256) {
    part(ShardPart::kPatches).hash_bin_externally();
    hasher_ = std::thread(&ShardBuilder::hasher_loop, this);
  }
  writer_ = std::thread(&ShardBuilder::writer_loop, this);
  intake_ = std::make_unique<IntakeThread>([this](const Submission& doc) { ingest(doc); });
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
    const std::string where = "record " + record_id + ", item " + std::to_string(k) + ": ";
    try {
      check_image_shape(items[k].height, items[k].width);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(where + e.what());
    }
    if (items[k].target) throw std::invalid_argument(where + "an image cannot be a loss target");
  }
}

uint64_t ShardBuilder::submit(Submission doc) {
  std::lock_guard<std::mutex> api_lock(api_mu_);
  if (finished_ || aborted_) throw std::logic_error("ShardBuilder: add_document after finish()/abort()");
  check_writer_error();
  intake_->rethrow_error();
  validate(doc.record_id, doc.items);
  return intake_->push(std::move(doc));
}

void ShardBuilder::add_document(const std::string& record_id, const std::vector<DocItem>& items, bool eos_target) {
  intake_->wait(submit({record_id, items, {}, eos_target}));
}

void ShardBuilder::drain() { intake_->drain(); }

void ShardBuilder::ingest(const Submission& sub) {
  const int64_t S = cfg_.seq_length;
  // Sizes before any heavy work (image shapes were checked by validate()).
  int64_t total = 2, image_tokens = 0;
  for (const DocItem& it : sub.items) {
    if (it.is_image()) {
      image_tokens += image_token_count(it.height / kPatchSize, it.width / kPatchSize);
    } else {
      total += it.n_tokens;
    }
  }
  total += image_tokens;
  stats_.input_documents++;
  if (image_tokens + 2 > S) {
    stats_.rejected.emplace_back(sub.record_id, "images_exceed_pack");
    return;
  }
  if (total > S && cfg_.drop_long_text) {
    stats_.rejected.emplace_back(sub.record_id, "long_text_dropped");
    return;
  }
  std::vector<Segment> segments;
  std::unique_ptr<Doc> doc = lay_out(sub, total, segments);
  if (total <= S) {
    add_doc_to_planner(std::move(doc));
  } else {
    split_long(*doc, segments);  // longer than a pack (its images fit)
  }
}

// [BOS] + items + [EOS] as tokens, the images patchified (in parallel strips of patch rows), the target runs.
std::unique_ptr<ShardBuilder::Doc> ShardBuilder::lay_out(const Submission& sub, int64_t total,
                                                         std::vector<Segment>& segments) {
  int64_t n_patches = 0, n_images = 0, image_tokens = 0;
  for (const DocItem& it : sub.items) {
    if (!it.is_image()) continue;
    const int64_t n_h = it.height / kPatchSize, n_w = it.width / kPatchSize;
    image_tokens += image_token_count(n_h, n_w);
    n_patches += n_h * n_w;
    ++n_images;
  }
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
  std::vector<Strip> strips;
  segments.reserve(sub.items.size() + 2);
  int32_t* tok = doc->tokens.data();
  int64_t pos = 0, patch_pos = 0;
  tok[pos++] = ids_.bos;
  segments.push_back({1, 0, false, false});
  for (const DocItem& it : sub.items) {
    if (it.is_image()) {
      const int64_t n_h = it.height / kPatchSize, n_w = it.width / kPatchSize;
      const int64_t n_tok = image_token_count(n_h, n_w);
      image_layout(n_h, n_w, ids_.vision, ids_.vpatch, ids_.row_sep, ids_.vision_end, tok + pos, nullptr);
      if (it.patchified) {  // a sequential copy: cheap even when the bytes come cold from another process
        std::memcpy(doc->patches.data() + patch_pos * kPatchDim, it.pixels,
                    static_cast<size_t>(n_h * n_w * kPatchDim));
      }
      for (int64_t r0 = 0; !it.patchified && r0 < n_h; r0 += kPatchRowsPerTask) {
        const int64_t rows = std::min(kPatchRowsPerTask, n_h - r0);
        strips.push_back({it.pixels + r0 * kPatchSize * it.width * kChannels, rows, it.width,
                          doc->patches.data() + (patch_pos + r0 * n_w) * kPatchDim});
      }
      segments.push_back({n_tok, n_h * n_w, true, false});
      pos += n_tok;
      patch_pos += n_h * n_w;
    } else if (it.n_tokens > 0) {
      std::memcpy(tok + pos, it.tokens, static_cast<size_t>(it.n_tokens) * sizeof(int32_t));
      segments.push_back({it.n_tokens, 0, false, it.target});
      pos += it.n_tokens;
    }
  }
  tok[pos++] = ids_.eos;
  segments.push_back({1, 0, false, sub.eos_target});
  auto run_strip = [&](int64_t i) {
    const Strip& s = strips[static_cast<size_t>(i)];
    patchify(s.src, s.rows * kPatchSize, s.width, s.dst);
  };
  if (pool_) {
    pool_->parallel_for(static_cast<int64_t>(strips.size()), run_strip);
  } else {
    for (size_t i = 0; i < strips.size(); ++i) run_strip(static_cast<int64_t>(i));
  }
  int64_t start = 0;
  for (const Segment& seg : segments) {  // maximal runs of target segments
    if (seg.target) {
      if (!doc->targets.empty() && doc->targets.back() == start) {
        doc->targets.back() = start + seg.length;
      } else {
        doc->targets.insert(doc->targets.end(), {start, start + seg.length});
      }
      doc->n_target_tokens += seg.length;
    }
    start += seg.length;
  }
  return doc;
}

// Cuts a document longer than a pack into chunks of at most S tokens, never inside an image; pure text gives chunks
// of exactly S (the last one shorter). Each chunk is its own document; the target runs are cut with the tokens.
void ShardBuilder::split_long(const Doc& doc, const std::vector<Segment>& segments) {
  const int64_t S = cfg_.seq_length;
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
  size_t run = 0;  // first target run that may reach into the current chunk
  for (const Cut& c : chunks) {
    auto part = std::make_unique<Doc>();
    part->tokens.assign(doc.tokens.begin() + t0, doc.tokens.begin() + t0 + c.tokens);
    part->patches.assign(doc.patches.begin() + p0 * kPatchDim, doc.patches.begin() + (p0 + c.patches) * kPatchDim);
    part->n_images = c.images;
    part->n_patches = c.patches;
    part->n_vision_tokens = c.vision_tokens;
    const int64_t t1 = t0 + c.tokens;
    while (run < doc.targets.size() && doc.targets[run + 1] <= t0) run += 2;
    for (size_t r = run; r < doc.targets.size() && doc.targets[r] < t1; r += 2) {
      const int64_t a = std::max(doc.targets[r], t0), b = std::min(doc.targets[r + 1], t1);
      part->targets.insert(part->targets.end(), {a - t0, b - t0});
      part->n_target_tokens += b - a;
    }
    t0 = t1;
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
      stats_.tokens_target += d->n_target_tokens;
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
  MMIdxWriter &tokens = part(ShardPart::kTokens), &patches = part(ShardPart::kPatches);
  std::vector<int32_t> cu{0}, runs;  // runs: the pack's target runs, adjacent ones merged
  cu.reserve(job.docs.size() + 1);
  tokens.begin_sequence();
  patches.begin_sequence();
  for (const auto& d : job.docs) {
    tokens.append(d->tokens.data(), static_cast<int64_t>(d->tokens.size()));
    patches.append(d->patches.data(), static_cast<int64_t>(d->patches.size()));
    for (size_t r = 0; r < d->targets.size(); r += 2) {
      const auto a = static_cast<int32_t>(cu.back() + d->targets[r]);
      const auto b = static_cast<int32_t>(cu.back() + d->targets[r + 1]);
      if (!runs.empty() && runs.back() == a) {
        runs.back() = b;
      } else {
        runs.insert(runs.end(), {a, b});
      }
    }
    cu.push_back(cu.back() + static_cast<int32_t>(d->tokens.size()));
  }
  if (cu.back() < S) {
    const std::vector<int32_t> pad(static_cast<size_t>(S - cu.back()), ids_.pad);
    tokens.append(pad.data(), static_cast<int64_t>(pad.size()));
  }
  tokens.end_sequence();
  patches.end_sequence();
  auto write_one = [this](ShardPart p, const std::vector<int32_t>& v) {
    part(p).begin_sequence();
    part(p).append(v.data(), static_cast<int64_t>(v.size()));
    part(p).end_sequence();
  };
  write_one(ShardPart::kDocs, cu);
  write_one(ShardPart::kTargets, runs);
}

void ShardBuilder::hasher_loop() {
  PackJob job;
  while (hashes_.pop(job)) {
    for (auto& d : job.docs) {  // exactly the bytes write_pack appended to the patches file, in order
      part(ShardPart::kPatches).hash_bin(d->patches.data(), d->patches.size());
      patch_buffers().give(std::move(d->patches));
    }
  }
}

void ShardBuilder::stop_threads(bool discard) noexcept {
  if (intake_) intake_->stop(discard);  // discard: the intake thread drains without ingesting
  packs_.close(discard);
  if (writer_.joinable()) writer_.join();
  hashes_.close(discard);  // the writer, its only producer, has stopped
  if (hasher_.joinable()) hasher_.join();
}

ShardStats ShardBuilder::finish() {
  std::lock_guard<std::mutex> api_lock(api_mu_);
  if (finished_ || aborted_) throw std::logic_error("ShardBuilder: finish() called twice or after abort()");
  drain();
  emit(planner_.flush());
  stop_threads(false);
  check_writer_error();
  for (auto& w : parts_) w->finish();

  const std::string tmp = temp_path_for(sidecar_path_);
  std::string json_checksum;
  {
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (f == nullptr) throw std::runtime_error("cannot create " + tmp + ": " + std::strerror(errno));
    const std::string json = sidecar_json(cfg_.seq_length, cfg_.token_ids, stats_);
    Checksum json_hash(cfg_.checksum);
    json_hash.update(json.data(), json.size());
    json_checksum = json_hash.hexdigest();
    const bool ok = std::fwrite(json.data(), 1, json.size(), f) == json.size() && std::fflush(f) == 0 &&
                    ::fsync(::fileno(f)) == 0;
    std::fclose(f);
    if (!ok) throw std::runtime_error("cannot write " + tmp + ": " + std::strerror(errno));
  }
  // Data files first, the sidecar last: a shard is complete iff {prefix}.json exists.
  for (auto& w : parts_) w->commit();
  if (std::rename(tmp.c_str(), sidecar_path_.c_str()) != 0) {
    throw std::runtime_error("cannot rename " + tmp + ": " + std::strerror(errno));
  }
  fsync_parent_dir(sidecar_path_);
  finished_ = true;
  // File checksums, computed while writing, in part order (the order of schema.shard_files()), the sidecar last.
  stats_.files.clear();
  for (const auto& w : parts_) {
    stats_.files.emplace_back(base_name(w->bin_path()), w->bin_checksum());
    stats_.files.emplace_back(base_name(w->idx_path()), w->idx_checksum());
  }
  stats_.files.emplace_back(base_name(sidecar_path_), json_checksum);
  return stats_;
}

void ShardBuilder::abort() noexcept {
  std::lock_guard<std::mutex> api_lock(api_mu_);
  if (finished_ || aborted_) return;
  aborted_ = true;
  stop_threads(true);
  for (auto& w : parts_) {
    if (w) w->abort();
  }
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
