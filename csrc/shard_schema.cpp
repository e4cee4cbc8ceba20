// The sidecar JSON (see shard_schema.h).
#include "shard_schema.h"

#include "format.h"

namespace solo {

// Built with std::to_string, not an ostringstream: iostreams go through the process-wide C++ locale, and a
// toolchain that links libstdc++ statically into this module (seen on a GPU node's /opt/gcc) then mixes two copies'
// locale facets with the libstdc++.so that torch loaded: `ostream << long` segfaulted there.
std::string sidecar_json(int64_t seq_length, const TokenTable& token_ids, const ShardStats& stats) {
  using std::to_string;
  std::string o;
  o.reserve(1024);
  auto field = [&o](const char* name, int64_t value, const char* after = ",\n") {
    o += "  \"";
    o += name;
    o += "\": " + to_string(value) + after;
  };
  o += "{\n  \"format\": \"";
  o += kShardFormat;
  o += "\",\n";
  field("format_version", kShardFormatVersion);
  field("seq_length", seq_length);
  field("patch_dim", kPatchDim);
  o += "  \"token_ids\": {";
  for (size_t k = 0; k < token_ids.size(); ++k) {  // role names are checked identifiers (no escaping needed)
    o += (k ? ", \"" : "\"") + token_ids[k].first + "\": " + to_string(token_ids[k].second);
  }
  o += "},\n";
  for (const CountField& c : kCountFields) field(c.name, stats.*c.member);
  field("rejected", static_cast<int64_t>(stats.rejected.size()), "\n");
  o += "}\n";
  return o;
}

}  // namespace solo
