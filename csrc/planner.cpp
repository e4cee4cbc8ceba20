// BestFitPlanner and plan_packs (see planner.h).
#include "planner.h"

#include <algorithm>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>

namespace solo {

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

PackPlan plan_packs(const int64_t* lengths, int64_t n, int64_t seq_length, int64_t buffer_docs, bool drop_long,
                    int64_t slack) {
  PackPlan plan;
  BestFitPlanner planner(seq_length, buffer_docs, slack);
  auto take = [&](std::vector<BestFitPlanner::Bin> bins) {
    for (const auto& bin : bins) {
      plan.piece_doc.insert(plan.piece_doc.end(), bin.begin(), bin.end());  // piece ids, mapped to docs below
      plan.pack_offsets.push_back(static_cast<int64_t>(plan.piece_doc.size()));
    }
  };
  std::vector<std::pair<int64_t, int64_t>> pieces;  // piece id -> (doc, length)
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 1) throw std::invalid_argument("plan_packs: lengths must be >= 1");
    if (lengths[i] > seq_length && drop_long) {
      plan.dropped.push_back(i);
      continue;
    }
    if (lengths[i] > seq_length) ++plan.split;
    for (int64_t left = lengths[i]; left > 0; left -= seq_length) {
      const int64_t l = std::min(left, seq_length);
      pieces.emplace_back(i, l);
      take(planner.push(static_cast<int64_t>(pieces.size()) - 1, l));
    }
  }
  take(planner.flush());
  for (auto& id : plan.piece_doc) {
    const auto& p = pieces[static_cast<size_t>(id)];
    plan.piece_length.push_back(p.second);
    id = p.first;
  }
  return plan;
}

}  // namespace solo
