// SOLO patchify / unpatchify / image token layout (see format.h), and their pybind11 bindings.
#include "format.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>

namespace py = pybind11;

namespace solo {

void check_image_shape(int64_t height, int64_t width) {
  if (height <= 0 || width <= 0 || height % kPatchSize != 0 || width % kPatchSize != 0) {
    throw std::invalid_argument("patchify: image height and width must be positive multiples of " +
                                std::to_string(kPatchSize) + ", got " + std::to_string(height) + "x" +
                                std::to_string(width) + " (H x W); resize it with the SOLO resize rule first");
  }
}

void check_grid(int64_t n_h, int64_t n_w) {
  if (n_h < 1 || n_w < 1) {
    throw std::invalid_argument("patch grid must be at least 1x1, got n_h=" + std::to_string(n_h) +
                                ", n_w=" + std::to_string(n_w));
  }
  // Patch indices and token positions are int32 everywhere downstream.
  if (n_h > std::numeric_limits<int32_t>::max() / 2 / n_w) {
    throw std::invalid_argument("patch grid " + std::to_string(n_h) + "x" + std::to_string(n_w) +
                                " is too large for int32 patch indices");
  }
}

namespace {

// One patch row: 32 interleaved RGB pixels (96 bytes) -> 32 bytes each of r, g, b.
void deinterleave_row(const uint8_t* src, uint8_t* r, uint8_t* g, uint8_t* b) {
  for (int64_t x = 0; x < kPatchSize; ++x) {
    r[x] = src[3 * x];
    g[x] = src[3 * x + 1];
    b[x] = src[3 * x + 2];
  }
}

#if defined(__x86_64__)
// Same with SSSE3 byte shuffles: 16 pixels (three 16-byte loads) per step, ~10x the scalar loop.
__attribute__((target("ssse3"))) void deinterleave_row_ssse3(const uint8_t* src, uint8_t* r, uint8_t* g,
                                                              uint8_t* b) {
  const __m128i r0 = _mm_setr_epi8(0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i r1 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14, -1, -1, -1, -1, -1);
  const __m128i r2 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 13);
  const __m128i g0 = _mm_setr_epi8(1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i g1 = _mm_setr_epi8(-1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1);
  const __m128i g2 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14);
  const __m128i b0 = _mm_setr_epi8(2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i b1 = _mm_setr_epi8(-1, -1, -1, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1);
  const __m128i b2 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15);
  for (int half = 0; half < 2; ++half, src += 48, r += 16, g += 16, b += 16) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i m = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    const __m128i vr = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, r0), _mm_shuffle_epi8(m, r1)),
                                    _mm_shuffle_epi8(c, r2));
    const __m128i vg = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, g0), _mm_shuffle_epi8(m, g1)),
                                    _mm_shuffle_epi8(c, g2));
    const __m128i vb = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, b0), _mm_shuffle_epi8(m, b1)),
                                    _mm_shuffle_epi8(c, b2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(r), vr);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(g), vg);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(b), vb);
  }
}
#endif

template <typename Row>
inline __attribute__((always_inline)) void patchify_loop(const uint8_t* img, int64_t width, int64_t n_h, int64_t n_w,
                                                         uint8_t* out, Row row) {
  const int64_t plane = kPatchSize * kPatchSize;
  for (int64_t i = 0; i < n_h; ++i) {
    for (int64_t j = 0; j < n_w; ++j) {
      uint8_t* patch = out + (i * n_w + j) * kPatchDim;
      for (int64_t y = 0; y < kPatchSize; ++y) {
        const uint8_t* src = img + ((i * kPatchSize + y) * width + j * kPatchSize) * kChannels;
        uint8_t* r = patch + y * kPatchSize;
        row(src, r, r + plane, r + 2 * plane);
      }
    }
  }
}

#if defined(__x86_64__)
__attribute__((target("ssse3"))) void patchify_ssse3(const uint8_t* img, int64_t width, int64_t n_h, int64_t n_w,
                                                     uint8_t* out) {
  patchify_loop(img, width, n_h, n_w, out, deinterleave_row_ssse3);
}
const bool kHasSsse3 = [] {
  __builtin_cpu_init();  // required before __builtin_cpu_supports in a static initialiser
  return __builtin_cpu_supports("ssse3") != 0;
}();
#endif

}  // namespace

void patchify(const uint8_t* img, int64_t height, int64_t width, uint8_t* out) {
  check_image_shape(height, width);
  const int64_t n_h = height / kPatchSize, n_w = width / kPatchSize;
#if defined(__x86_64__)
  if (kHasSsse3) return patchify_ssse3(img, width, n_h, n_w, out);
#endif
  patchify_loop(img, width, n_h, n_w, out, deinterleave_row);
}

void unpatchify(const uint8_t* patches, int64_t n_h, int64_t n_w, uint8_t* out) {
  check_grid(n_h, n_w);
  const int64_t width = n_w * kPatchSize;
  const int64_t plane = kPatchSize * kPatchSize;
  for (int64_t i = 0; i < n_h; ++i) {
    for (int64_t j = 0; j < n_w; ++j) {
      const uint8_t* patch = patches + (i * n_w + j) * kPatchDim;
      for (int64_t y = 0; y < kPatchSize; ++y) {
        uint8_t* dst = out + ((i * kPatchSize + y) * width + j * kPatchSize) * kChannels;
        const uint8_t* r = patch + y * kPatchSize;
        const uint8_t* g = r + plane;
        const uint8_t* b = g + plane;
        for (int64_t x = 0; x < kPatchSize; ++x) {
          dst[3 * x] = r[x];
          dst[3 * x + 1] = g[x];
          dst[3 * x + 2] = b[x];
        }
      }
    }
  }
}

int64_t image_token_count(int64_t n_h, int64_t n_w) {
  check_grid(n_h, n_w);
  return n_h * n_w + (n_h - 1) + 2;
}

void image_layout(int64_t n_h, int64_t n_w, int32_t vision_id, int32_t vpatch_id, int32_t row_sep_id,
                  int32_t vision_end_id, int32_t* token_ids, int32_t* patch_index, int32_t patch_offset) {
  check_grid(n_h, n_w);
  if (patch_offset < 0 || static_cast<int64_t>(patch_offset) + n_h * n_w > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("image_layout: patch_offset " + std::to_string(patch_offset) +
                                " out of range for int32 patch indices");
  }
  int64_t t = 0;
  auto put = [&](int32_t id, int32_t pidx) {
    token_ids[t] = id;
    if (patch_index != nullptr) patch_index[t] = pidx;
    ++t;
  };
  put(vision_id, -1);
  for (int64_t i = 0; i < n_h; ++i) {
    if (i > 0) put(row_sep_id, -1);
    for (int64_t j = 0; j < n_w; ++j) put(vpatch_id, patch_offset + static_cast<int32_t>(i * n_w + j));
  }
  put(vision_end_id, -1);
}

ImageLayout image_layout(int64_t n_h, int64_t n_w, int32_t vision_id, int32_t vpatch_id, int32_t row_sep_id,
                         int32_t vision_end_id) {
  const int64_t n = image_token_count(n_h, n_w);
  ImageLayout out{std::vector<int32_t>(n), std::vector<int32_t>(n)};
  image_layout(n_h, n_w, vision_id, vpatch_id, row_sep_id, vision_end_id, out.token_ids.data(), out.patch_index.data());
  return out;
}

}  // namespace solo

namespace {

// Accept only uint8 arrays (never silently cast floats); return a C-contiguous view/copy.
py::array_t<uint8_t, py::array::c_style> as_uint8(const py::array& a, const char* fn, const char* what) {
  if (!a.dtype().is(py::dtype::of<uint8_t>())) {
    throw py::type_error(std::string(fn) + ": " + what + " must have dtype uint8, got " +
                         py::str(a.dtype()).cast<std::string>());
  }
  return py::array_t<uint8_t, py::array::c_style>::ensure(a);
}

py::array py_patchify(const py::array& img_any, const py::object& out_obj) {
  if (img_any.ndim() != 3 || img_any.shape(2) != solo::kChannels) {
    std::string shape = "(";
    for (py::ssize_t d = 0; d < img_any.ndim(); ++d) shape += (d ? ", " : "") + std::to_string(img_any.shape(d));
    throw std::invalid_argument("patchify: expected an RGB image of shape (H, W, 3), got shape " + shape + ")");
  }
  auto img = as_uint8(img_any, "patchify", "image");
  const int64_t height = img.shape(0), width = img.shape(1);
  solo::check_image_shape(height, width);
  const int64_t n = (height / solo::kPatchSize) * (width / solo::kPatchSize);
  py::array out;
  if (out_obj.is_none()) {
    out = py::array_t<uint8_t>({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(solo::kPatchDim)});
  } else {  // caller-provided memory (e.g. a shared-memory slot): any shape, n * 3072 contiguous writable bytes
    out = py::reinterpret_borrow<py::array>(out_obj);
    if (!out.dtype().is(py::dtype::of<uint8_t>()) || !(out.flags() & py::array::c_style) || !out.writeable() ||
        out.size() != n * solo::kPatchDim) {
      throw std::invalid_argument("patchify: out must be a writable C-contiguous uint8 array of " +
                                  std::to_string(n * solo::kPatchDim) + " bytes");
    }
  }
  const uint8_t* src = img.data();
  auto* dst = static_cast<uint8_t*>(out.mutable_data());
  {
    py::gil_scoped_release nogil;
    solo::patchify(src, height, width, dst);
  }
  return out;
}

py::array_t<uint8_t> py_unpatchify(const py::array& patches_any, int64_t n_h, int64_t n_w) {
  solo::check_grid(n_h, n_w);
  if (patches_any.ndim() != 2 || patches_any.shape(0) != n_h * n_w || patches_any.shape(1) != solo::kPatchDim) {
    std::string shape = "(";
    for (py::ssize_t d = 0; d < patches_any.ndim(); ++d) {
      shape += (d ? ", " : "") + std::to_string(patches_any.shape(d));
    }
    throw std::invalid_argument("unpatchify: expected patches of shape (" + std::to_string(n_h * n_w) + ", " +
                                std::to_string(solo::kPatchDim) + ") for a " + std::to_string(n_h) + "x" +
                                std::to_string(n_w) + " grid, got " + shape + ")");
  }
  auto patches = as_uint8(patches_any, "unpatchify", "patches");
  py::array_t<uint8_t> out({static_cast<py::ssize_t>(n_h * solo::kPatchSize),
                            static_cast<py::ssize_t>(n_w * solo::kPatchSize), static_cast<py::ssize_t>(solo::kChannels)});
  const uint8_t* src = patches.data();
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    solo::unpatchify(src, n_h, n_w, dst);
  }
  return out;
}

std::tuple<py::array_t<int32_t>, py::array_t<int32_t>> py_image_layout(int64_t n_h, int64_t n_w, int32_t vision_id,
                                                                       int32_t vpatch_id, int32_t row_sep_id,
                                                                       int32_t vision_end_id) {
  const int64_t n = solo::image_token_count(n_h, n_w);
  py::array_t<int32_t> ids(static_cast<py::ssize_t>(n));
  py::array_t<int32_t> pidx(static_cast<py::ssize_t>(n));
  solo::image_layout(n_h, n_w, vision_id, vpatch_id, row_sep_id, vision_end_id, ids.mutable_data(),
                     pidx.mutable_data());
  return {ids, pidx};
}

}  // namespace

void register_format(py::module_& m) {
  m.attr("PATCH_SIZE") = solo::kPatchSize;
  m.attr("PATCH_DIM") = solo::kPatchDim;
  m.def("patchify", &py_patchify, py::arg("img"), py::arg("out") = py::none(),
        "uint8[H, W, 3] (H, W multiples of 32) -> uint8[n_h*n_w, 3072]; channel-first (c, y, x) inside a patch, "
        "patches row-major. out: write into this writable C-contiguous uint8 array of n_h*n_w*3072 bytes (any "
        "shape) and return it.");
  m.def("unpatchify", &py_unpatchify, py::arg("patches"), py::arg("n_h"), py::arg("n_w"),
        "uint8[n_h*n_w, 3072] -> uint8[n_h*32, n_w*32, 3]; exact inverse of patchify.");
  m.def("image_token_count", &solo::image_token_count, py::arg("n_h"), py::arg("n_w"),
        "Tokens an n_h x n_w patch image costs: n_h*n_w + n_h - 1 + 2.");
  m.def("image_layout", &py_image_layout, py::arg("n_h"), py::arg("n_w"), py::arg("vision_id"), py::arg("vpatch_id"),
        py::arg("row_sep_id"), py::arg("vision_end_id"),
        "(token_ids int32[T], patch_index int32[T]) for <vision> rows of <vpatch> separated by <vrow_sep> "
        "</vision>; patch_index is -1 for non-patch tokens.");
}
