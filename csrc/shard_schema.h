// THE shard schema, C++ side: the format tag and version, the part (file) names and dtypes, the count keys and the
// sidecar JSON. Python reads every one of these from megatron_solo._C (megatron_solo/format/schema.py is their one
// Python face); the token-id table comes the other way, from Python (schema.TokenIds) into ShardBuilderConfig.
// docs/shard_format.md describes the layout.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "mmidx_writer.h"

namespace solo {

inline constexpr char kShardFormat[] = "solo-shard";
inline constexpr int64_t kShardFormatVersion = 2;  // v2: + the targets part (v1: tokens, patches, docs)
inline constexpr char kSidecarSuffix[] = ".json";  // {prefix}.json, renamed into place last: the shard is complete

// One MMIDIDX dataset {prefix}.{name} per part, one sequence per pack. Order = file order of finish()'s "files".
enum class ShardPart : size_t { kTokens, kPatches, kDocs, kTargets };
struct ShardPartSpec {
  const char* name;
  MMIdxDType dtype;
};
inline constexpr ShardPartSpec kShardParts[] = {
    {"tokens", MMIdxDType::kInt32},   // int32[S]: the pack's tokens, pad after the last document
    {"patches", MMIdxDType::kUInt8},  // uint8[P * patch_dim]: one patch per <vpatch>, in token order
    {"docs", MMIdxDType::kInt32},     // int32[D + 1]: cu_seqlens
    {"targets", MMIdxDType::kInt32},  // int32[2K]: [start, end) pack positions of the K runs of loss targets
};
inline constexpr size_t kNumShardParts = sizeof(kShardParts) / sizeof(kShardParts[0]);
inline constexpr const ShardPartSpec& part_spec(ShardPart p) { return kShardParts[static_cast<size_t>(p)]; }

// (role, id) in the order Python gave them; written verbatim into the sidecar's "token_ids".
using TokenTable = std::vector<std::pair<std::string, int32_t>>;

struct ShardStats {
  int64_t packs = 0, documents = 0, input_documents = 0, images = 0, patches = 0;
  int64_t tokens_total = 0, tokens_text = 0, tokens_vision = 0, tokens_target = 0, pad_tokens = 0, slots = 0;
  int64_t text_docs_split = 0;
  std::vector<std::pair<std::string, std::string>> rejected;  // (record_id, reason)
  std::vector<std::pair<std::string, std::string>> files;  // finish(): (file name, "<algo>:<hex>"), part order
};

// The counts of a shard, by name: the sidecar keys, the keys of finish()/stats() and (summed) of the manifest.
struct CountField {
  const char* name;
  int64_t ShardStats::*member;
};
inline constexpr CountField kCountFields[] = {
    {"packs", &ShardStats::packs},
    {"documents", &ShardStats::documents},
    {"input_documents", &ShardStats::input_documents},
    {"images", &ShardStats::images},
    {"patches", &ShardStats::patches},
    {"tokens_total", &ShardStats::tokens_total},
    {"tokens_text", &ShardStats::tokens_text},
    {"tokens_vision", &ShardStats::tokens_vision},
    {"tokens_target", &ShardStats::tokens_target},
    {"pad_tokens", &ShardStats::pad_tokens},
    {"slots", &ShardStats::slots},
    {"text_docs_split", &ShardStats::text_docs_split},
};

// The sidecar {prefix}.json: format tag and version, seq_length, patch_dim, the token ids, every count of
// kCountFields and the number of rejected documents.
std::string sidecar_json(int64_t seq_length, const TokenTable& token_ids, const ShardStats& stats);

}  // namespace solo
