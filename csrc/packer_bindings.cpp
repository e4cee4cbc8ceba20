// pybind11 face of the shard packer: _C.ShardBuilder, _C.plan_packs, _C.release_buffers and the shard schema
// constants (SHARD_FORMAT, SHARD_FORMAT_VERSION, SHARD_PARTS, SHARD_COUNT_KEYS, SHARD_SIDECAR_SUFFIX,
// MMIDIDX_SUFFIXES) that megatron_solo/format/schema.py re-exports. See shard_builder.h and docs/shard_format.md.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <limits>
#include <optional>
#include <stdexcept>

#include "format.h"
#include "shard_builder.h"

namespace py = pybind11;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

py::dict stats_to_dict(const solo::ShardStats& s) {
  py::dict d;
  for (const solo::CountField& c : solo::kCountFields) d[c.name] = s.*c.member;
  d["fill"] = s.slots > 0 ? static_cast<double>(s.tokens_total) / static_cast<double>(s.slots) : 0.0;
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

// {role: id} -> the builder's table, in the dict's order. Roles are identifiers (they go into the sidecar's JSON).
solo::TokenTable token_table(const py::dict& token_ids) {
  solo::TokenTable table;
  for (const auto& [key, value] : token_ids) {
    const std::string role = py::cast<std::string>(key);
    const bool ok = !role.empty() && std::all_of(role.begin(), role.end(), [](char ch) {
      return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_';
    });
    if (!ok) throw std::invalid_argument("token_ids: role \"" + role + "\" is not a lower-case identifier");
    const auto id = py::cast<int64_t>(value);
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
      throw std::invalid_argument("token_ids: " + role + " = " + std::to_string(id) + " is not an int32 id >= 0");
    }
    table.emplace_back(role, static_cast<int32_t>(id));
  }
  return table;
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

// One item (a numpy array) -> DocItem viewing it; the array (or its int32 conversion) is kept in keep/converted.
solo::DocItem doc_item(const std::string& where, py::handle h, std::vector<py::object>& keep,
                       std::vector<std::vector<int32_t>>& converted) {
  if (!py::isinstance<py::array>(h)) {
    throw py::type_error(where + ": expected a numpy array (int32 token ids or uint8 [H, W, 3] image), got " +
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
          throw std::invalid_argument(where + ": token id " + std::to_string(src[i]) + " out of int32 range");
        }
        v[i] = static_cast<int32_t>(src[i]);
      }
      converted.push_back(std::move(v));
      item.tokens = converted.back().data();
      item.n_tokens = static_cast<int64_t>(converted.back().size());
    }
  } else if (a.ndim() == 3 && py::array_t<uint8_t>::check_(a) && (a.shape(2) == 3 || a.shape(2) == solo::kPatchDim)) {
    auto c = py::array_t<uint8_t, py::array::c_style>::ensure(a);
    item.pixels = c.data();
    item.patchified = c.shape(2) == solo::kPatchDim;  // [n_h, n_w, patch_dim]: the image's patch grid
    const int64_t scale = item.patchified ? solo::kPatchSize : 1;
    item.height = c.shape(0) * scale;
    item.width = c.shape(1) * scale;
    item.target = false;
    keep.push_back(std::move(c));
  } else {
    throw py::type_error(where + ": expected 1-D int32 token ids, a uint8 [H, W, 3] image or its uint8 [H/" +
                         std::to_string(solo::kPatchSize) + ", W/" + std::to_string(solo::kPatchSize) + ", " +
                         std::to_string(solo::kPatchDim) + "] patch grid, got dtype " +
                         py::str(a.dtype()).cast<std::string>() + " shape " + shape_str(a));
  }
  return item;
}

// targets: one 0/1 flag per item (a text item's tokens are targets iff 1; an image must have 0).
void apply_targets(const std::string& record_id, const py::object& targets, std::vector<solo::DocItem>& items) {
  if (py::isinstance<py::str>(targets) || py::isinstance<py::bytes>(targets) || !py::isinstance<py::sequence>(targets)) {
    throw py::type_error("record " + record_id + ": targets must be a sequence of 0/1 flags, one per item, got " +
                         py::str(py::type::of(targets)).cast<std::string>());
  }
  const auto flags = py::reinterpret_borrow<py::sequence>(targets);
  if (flags.size() != items.size()) {
    throw std::invalid_argument("record " + record_id + ": targets has " + std::to_string(flags.size()) +
                                " flags for " + std::to_string(items.size()) + " items");
  }
  for (size_t k = 0; k < items.size(); ++k) {
    const std::string where = "record " + record_id + ", item " + std::to_string(k);
    PyObject* index = PyNumber_Index(py::object(flags[k]).ptr());
    if (index == nullptr) {
      PyErr_Clear();
      throw py::type_error(where + ": targets[" + std::to_string(k) + "] is not an integer 0/1 flag");
    }
    const auto flag = py::reinterpret_steal<py::int_>(index).cast<int64_t>();
    if (flag != 0 && flag != 1) {
      throw std::invalid_argument(where + ": targets[" + std::to_string(k) + "] = " + std::to_string(flag) +
                                  ", expected 0 or 1");
    }
    items[k].target = flag == 1;  // an image flagged 1 is refused by ShardBuilder::validate, naming the item
  }
}

void py_add_document(PyShardBuilder& b, const std::string& record_id, const py::list& items,
                     const std::optional<py::list>& release, const py::object& targets, bool eos_target) {
  // Under the GIL: validate and pin the arrays (contiguous views; int64 token arrays are converted).
  b.unpin_completed();
  std::vector<py::object> keep;
  std::vector<std::vector<int32_t>> converted;
  std::vector<solo::DocItem> doc_items;
  keep.reserve(items.size());
  converted.reserve(items.size());
  doc_items.reserve(items.size());
  for (size_t k = 0; k < items.size(); ++k) {
    doc_items.push_back(doc_item("record " + record_id + ", item " + std::to_string(k), items[k], keep, converted));
  }
  if (!targets.is_none()) apply_targets(record_id, targets, doc_items);
  if (!release) {
    py::gil_scoped_release nogil;
    b.add_document(record_id, doc_items, eos_target);
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
    seq = b.submit({record_id, std::move(doc_items), std::move(flags), eos_target});
  }
  b.pins.push_back({seq, std::move(keep), std::move(converted)});
}

py::array_t<int64_t> to_numpy(const std::vector<int64_t>& v) {
  py::array_t<int64_t> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(int64_t));
  return a;
}

py::dict py_plan_packs(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lengths,
                       int64_t seq_length, int64_t buffer_docs, const std::string& long_text, int64_t slack) {
  const bool drop = parse_long_text(long_text);
  if (lengths.ndim() != 1) throw std::invalid_argument("plan_packs: lengths must be 1-D");
  solo::PackPlan plan;
  {
    py::gil_scoped_release nogil;
    plan = solo::plan_packs(lengths.data(), lengths.shape(0), seq_length, buffer_docs, drop, slack);
  }
  py::dict d;
  d["pack_offsets"] = to_numpy(plan.pack_offsets);
  d["piece_doc"] = to_numpy(plan.piece_doc);
  d["piece_length"] = to_numpy(plan.piece_length);
  d["dropped"] = to_numpy(plan.dropped);
  d["split"] = plan.split;
  return d;
}

void register_schema(py::module_& m) {
  m.attr("SHARD_FORMAT") = solo::kShardFormat;
  m.attr("SHARD_FORMAT_VERSION") = solo::kShardFormatVersion;
  m.attr("SHARD_SIDECAR_SUFFIX") = solo::kSidecarSuffix;
  m.attr("MMIDIDX_SUFFIXES") = py::make_tuple(solo::kBinSuffix, solo::kIdxSuffix);
  py::list parts, counts;
  for (const solo::ShardPartSpec& p : solo::kShardParts) parts.append(p.name);
  for (const solo::CountField& c : solo::kCountFields) counts.append(c.name);
  m.attr("SHARD_PARTS") = py::tuple(parts);
  m.attr("SHARD_COUNT_KEYS") = py::tuple(counts);
}

}  // namespace

void register_packer(py::module_& m) {
  register_schema(m);
  py::class_<PyShardBuilder>(m, "ShardBuilder",
                             "Packs documents into seq_length packs and writes one shard: one MMIDIDX .bin/.idx "
                             "pair per part of SHARD_PARTS + {prefix}.json. See docs/shard_format.md.")
      .def(py::init([](const std::string& out_prefix, int64_t seq_length, const py::dict& token_ids,
                       int64_t buffer_docs, const std::string& long_text, int threads, int64_t buffer_bytes,
                       const std::string& checksum) {
             solo::ShardBuilderConfig c;
             c.out_prefix = out_prefix;
             c.seq_length = seq_length;
             c.token_ids = token_table(token_ids);
             c.buffer_docs = buffer_docs;
             c.drop_long_text = parse_long_text(long_text);
             c.threads = threads;
             c.buffer_bytes = buffer_bytes;
             c.checksum = solo::parse_checksum_algo(checksum);
             return std::make_unique<PyShardBuilder>(std::move(c));
           }),
           py::arg("out_prefix"), py::arg("seq_length"), py::arg("token_ids"), py::arg("buffer_docs") = 4096,
           py::arg("long_text") = "split", py::arg("threads") = 1, py::arg("buffer_bytes") = int64_t{1} << 30,
           py::arg("checksum") = "xxh64",
           "token_ids: {role: id}, megatron_solo.format.schema.TokenIds.as_dict() (needs bos, eos, pad, vision, "
           "vpatch, row_sep, vision_end; first_special defaults to the smallest vision id); written to the sidecar.")
      .def("add_document", &py_add_document, py::arg("record_id"), py::arg("items"), py::arg("release") = py::none(),
           py::arg("targets") = py::none(), py::arg("eos_target") = true,
           "items in order: 1-D int32 token ids (text), uint8 [H, W, 3] images (H, W multiples of 32) or an image's "
           "patch grid uint8 [H/32, W/32, 3072] (patchify's output, reshaped). The document is [BOS] + items + "
           "[EOS]. Loss targets: targets=None, every token of every text item; else one 0/1 flag per item (a text "
           "item's tokens are targets iff 1; an image must have 0). The closing EOS is a target iff eos_target; BOS "
           "and image layouts never are. Releases the GIL. release=None: returns once the document is copied in. "
           "release=[flags]: returns at once (shapes are checked first); the builder's intake thread copies and "
           "packs the document later, in call order, keeps the arrays alive until then (do not modify them), and "
           "sets each flag (a writable uint8 array, e.g. a worker's slot-busy byte in shared memory) to 0 once the "
           "bytes are copied. Errors of a later step surface on the next call.")
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
      "release_buffers", [] { solo::patch_buffers().release(); },
      "Free the process-wide pool of patch buffers that ShardBuilders recycle (call after the last builder).");
  m.def("plan_packs", &py_plan_packs, py::arg("lengths"), py::arg("seq_length"), py::arg("buffer_docs") = 4096,
        py::arg("long_text") = "split", py::arg("slack") = -1,
        "Lengths-only entry into the ShardBuilder's packing routine (same BestFitPlanner). Longer-than-pack items "
        "are split into seq_length pieces (or dropped). Returns dict(pack_offsets int64[P+1], piece_doc int64[N], "
        "piece_length int64[N], dropped int64[], split int): pack p holds pieces pack_offsets[p]:pack_offsets[p+1].");
}
