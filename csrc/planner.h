// The packing decision, on lengths only: which documents (or pieces of them) share a pack. Used by the
// ShardBuilder and, through _C.plan_packs, by benchmarks and tests (the same routine, no bytes involved).
#pragma once

#include <cstdint>
#include <vector>

namespace solo {

// Bounded-buffer best-fit-decreasing planner.
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

// The plan of a whole length list, as the ShardBuilder would pack it: documents longer than seq_length are cut into
// seq_length pieces (or dropped, drop_long), every piece goes through one BestFitPlanner in order.
struct PackPlan {
  std::vector<int64_t> pack_offsets{0};  // pack p holds pieces pack_offsets[p]:pack_offsets[p+1]
  std::vector<int64_t> piece_doc, piece_length;  // per piece, in pack order
  std::vector<int64_t> dropped;  // documents dropped (drop_long)
  int64_t split = 0;  // documents cut into pieces
};
PackPlan plan_packs(const int64_t* lengths, int64_t n, int64_t seq_length, int64_t buffer_docs, bool drop_long,
                    int64_t slack);

}  // namespace solo
