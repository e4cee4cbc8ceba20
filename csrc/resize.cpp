// Pillow-exact bilinear resize of uint8 RGB images. See resize.h.
#include "resize.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SOLO_RESIZE_X86 1  // AVX2 paths, chosen at run time; other architectures use the portable loops only
#define SOLO_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SOLO_TARGET_CLONES
#endif

namespace py = pybind11;

namespace solo {

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS for 8-bit samples
constexpr int32_t kHalf = int32_t{1} << (kPrecisionBits - 1);

inline uint8_t clip8(int32_t v) {
  const int32_t s = v >> kPrecisionBits;  // arithmetic shift, as Pillow's lookup table index
  return static_cast<uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
}

inline double bilinear(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

// One output row of the vertical pass: out[i] = clip8(half + sum_t w[t] * rows[t][i]) for i < n bytes. Integer sums:
// the order of the terms does not matter, so this vectorises over i.
SOLO_TARGET_CLONES void vertical_row(const uint8_t* const* rows, const int32_t* w,
                                                                    int taps, int64_t n, int32_t* acc,
                                                                    uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) acc[i] = kHalf;
  for (int t = 0; t < taps; ++t) {
    const uint8_t* r = rows[t];
    const int32_t wt = w[t];
    for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<int32_t>(r[i]) * wt;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t s = acc[i] >> kPrecisionBits;
    out[i] = static_cast<uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
  }
}

// One row of the horizontal pass over 3-channel pixels, outputs [x0, out_w).
void horizontal_row(const uint8_t* in, const ResampleCoeffs& c, int64_t out_w, uint8_t* out, int64_t x0 = 0) {
  const int32_t* w = c.weights.data() + x0 * c.ksize;
  out += 3 * x0;
  for (int64_t x = x0; x < out_w; ++x, w += c.ksize, out += 3) {
    const uint8_t* p = in + 3 * static_cast<int64_t>(c.first[x]);
    int32_t s0 = kHalf, s1 = kHalf, s2 = kHalf;
    for (int32_t t = 0, n = c.count[x]; t < n; ++t, p += 3) {
      s0 += p[0] * w[t];
      s1 += p[1] * w[t];
      s2 += p[2] * w[t];
    }
    out[0] = clip8(s0);
    out[1] = clip8(s1);
    out[2] = clip8(s2);
  }
}

#ifdef SOLO_RESIZE_X86
// The horizontal pass with AVX2, 8 output pixels at a time: per tap, one gather of the 4 bytes at each output's input
// pixel (R, G, B and a spare byte), split into channels and multiplied by the tap's weights, all in int32 lanes: the
// same integer sums as the scalar loop. Taps past an output's count have weight 0 and a clamped index, so every
// output runs all ksize taps. Layout [tap][x] so that 8 outputs' offsets / weights are one load.
struct HorizontalPlan {
  int64_t ksize = 0, vector_end = 0;  // outputs [0, vector_end) go through the AVX2 loop (a multiple of 8)
  std::vector<int32_t> offsets, weights;  // ksize * vector_end each
};

HorizontalPlan plan_horizontal(const ResampleCoeffs& c, int64_t in_w, int64_t out_w) {
  HorizontalPlan p;
  p.ksize = c.ksize;
  // A gather reads 4 bytes at 3 * index: stay >= 1 pixel short of the row end. The 16-byte stores of a block write 4
  // bytes past its 8 pixels: stay >= 2 pixels short of the output row end (the scalar tail rewrites them).
  int64_t end = 0;
  for (int64_t b = 0; b + 8 + 2 <= out_w; b += 8) {
    bool ok = true;
    for (int64_t x = b; x < b + 8 && ok; ++x) ok = c.first[static_cast<size_t>(x)] + c.ksize <= in_w - 1;
    if (!ok) break;
    end = b + 8;
  }
  p.vector_end = end;
  p.offsets.resize(static_cast<size_t>(c.ksize * end));
  p.weights.resize(static_cast<size_t>(c.ksize * end));
  for (int64_t t = 0; t < c.ksize; ++t) {
    for (int64_t x = 0; x < end; ++x) {
      p.offsets[static_cast<size_t>(t * end + x)] = 3 * (c.first[static_cast<size_t>(x)] + static_cast<int32_t>(t));
      p.weights[static_cast<size_t>(t * end + x)] = c.weights[static_cast<size_t>(x * c.ksize + t)];
    }
  }
  return p;
}

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}

__attribute__((target("avx2"))) void horizontal_row_avx2(const uint8_t* in, const HorizontalPlan& p, uint8_t* out) {
  const __m256i half = _mm256_set1_epi32(kHalf), byte = _mm256_set1_epi32(0xFF), zero = _mm256_setzero_si256();
  const __m256i max8 = _mm256_set1_epi32(255);
  // Per 128-bit lane: 4 pixels of int32 0x00BBGGRR -> 12 bytes RGBRGBRGBRGB (then 4 zero bytes).
  const __m256i compact = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1, 0, 1, 2, 4, 5, 6, 8,
                                           9, 10, 12, 13, 14, -1, -1, -1, -1);
  const int64_t n = p.vector_end;
  for (int64_t x = 0; x < n; x += 8, out += 24) {
    __m256i s0 = half, s1 = half, s2 = half;
    for (int64_t t = 0; t < p.ksize; ++t) {
      const __m256i off = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&p.offsets[t * n + x]));
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&p.weights[t * n + x]));
      const __m256i v = _mm256_i32gather_epi32(reinterpret_cast<const int*>(in), off, 1);
      s0 = _mm256_add_epi32(s0, _mm256_mullo_epi32(_mm256_and_si256(v, byte), w));
      s1 = _mm256_add_epi32(s1, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 8), byte), w));
      s2 = _mm256_add_epi32(s2, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 16), byte), w));
    }
    s0 = _mm256_min_epi32(_mm256_max_epi32(_mm256_srai_epi32(s0, kPrecisionBits), zero), max8);
    s1 = _mm256_min_epi32(_mm256_max_epi32(_mm256_srai_epi32(s1, kPrecisionBits), zero), max8);
    s2 = _mm256_min_epi32(_mm256_max_epi32(_mm256_srai_epi32(s2, kPrecisionBits), zero), max8);
    const __m256i pix =
        _mm256_or_si256(s0, _mm256_or_si256(_mm256_slli_epi32(s1, 8), _mm256_slli_epi32(s2, 16)));
    const __m256i packed = _mm256_shuffle_epi8(pix, compact);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 12), _mm256_extracti128_si256(packed, 1));
  }
}

#endif  // SOLO_RESIZE_X86

void horizontal_rows(const uint8_t* src, int64_t src_stride, int64_t rows, const ResampleCoeffs& c, int64_t in_w,
                     int64_t out_w, uint8_t* dst) {
  const int64_t out_row = out_w * 3;
#ifdef SOLO_RESIZE_X86
  if (cpu_has_avx2()) {
    const HorizontalPlan p = plan_horizontal(c, in_w, out_w);
    for (int64_t y = 0; y < rows; ++y) {
      horizontal_row_avx2(src + y * src_stride, p, dst + y * out_row);
      horizontal_row(src + y * src_stride, c, out_w, dst + y * out_row, p.vector_end);
    }
    return;
  }
#endif
  for (int64_t y = 0; y < rows; ++y) horizontal_row(src + y * src_stride, c, out_w, dst + y * out_row);
}

}  // namespace

ResampleCoeffs bilinear_coeffs(int64_t in_size, int64_t out_size) {
  // Pillow's precompute_coeffs + normalize_coeffs_8bpc for the bilinear filter (support 1), box = (0, in_size).
  ResampleCoeffs c;
  const double scale = static_cast<double>(static_cast<float>(in_size)) / static_cast<double>(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 1.0 * filterscale;
  c.ksize = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  c.first.resize(static_cast<size_t>(out_size));
  c.count.resize(static_cast<size_t>(out_size));
  c.weights.assign(static_cast<size_t>(out_size * c.ksize), 0);
  std::vector<double> k(static_cast<size_t>(c.ksize));
  for (int64_t xx = 0; xx < out_size; ++xx) {
    const double center = 0.0 + (static_cast<double>(xx) + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = static_cast<int>(in_size);
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      const double w = bilinear((static_cast<double>(x + xmin) - center + 0.5) * ss);
      k[static_cast<size_t>(x)] = w;
      ww += w;
    }
    int32_t* out = &c.weights[static_cast<size_t>(xx * c.ksize)];
    for (int x = 0; x < xmax; ++x) {
      double v = k[static_cast<size_t>(x)];
      if (ww != 0.0) v /= ww;
      out[x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                     : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
    }
    c.first[static_cast<size_t>(xx)] = xmin;
    c.count[static_cast<size_t>(xx)] = xmax;
  }
  return c;
}

bool pillow13_vertical_first(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w) {
  // Pillow >= 13: "if height is being scaled down more than twice the amount the width is, run the vertical pass
  // first". Earlier Pillow always ran the horizontal pass first. The two orders round differently.
  return in_h - out_h > 0 && in_h - out_h > (in_w - out_w) * 2;
}

namespace {

void vertical_pass(const uint8_t* in, int64_t in_stride, int64_t row0, const ResampleCoeffs& cv, int64_t row_bytes,
                   int64_t out_h, uint8_t* out) {
  std::vector<int32_t> acc(static_cast<size_t>(row_bytes));
  std::vector<const uint8_t*> rows(static_cast<size_t>(cv.ksize));
  for (int64_t y = 0; y < out_h; ++y) {
    const int32_t first = cv.first[static_cast<size_t>(y)], taps = cv.count[static_cast<size_t>(y)];
    for (int32_t t = 0; t < taps; ++t) rows[static_cast<size_t>(t)] = in + (first + t - row0) * in_stride;
    vertical_row(rows.data(), &cv.weights[static_cast<size_t>(y * cv.ksize)], taps, row_bytes, acc.data(),
                 out + y * row_bytes);
  }
}

}  // namespace

void resize_bilinear_rgb(const uint8_t* src, int64_t in_h, int64_t in_w, int64_t src_stride, uint8_t* dst,
                         int64_t out_h, int64_t out_w, bool vertical_first) {
  if (in_h < 1 || in_w < 1 || out_h < 1 || out_w < 1) {
    throw std::invalid_argument("resize: sizes must be positive, got " + std::to_string(in_w) + "x" +
                                std::to_string(in_h) + " -> " + std::to_string(out_w) + "x" + std::to_string(out_h));
  }
  const int64_t out_row = out_w * 3;
  const bool need_h = out_w != in_w, need_v = out_h != in_h;
  if (!need_h && !need_v) {
    for (int64_t y = 0; y < in_h; ++y) std::memcpy(dst + y * out_row, src + y * src_stride, out_row);
    return;
  }
  if (!need_h) {
    vertical_pass(src, src_stride, 0, bilinear_coeffs(in_h, out_h), out_row, out_h, dst);
    return;
  }
  const ResampleCoeffs ch = bilinear_coeffs(in_w, out_w);
  if (!need_v) {
    horizontal_rows(src, src_stride, in_h, ch, in_w, out_w, dst);
    return;
  }
  const ResampleCoeffs cv = bilinear_coeffs(in_h, out_h);
  std::vector<uint8_t> tmp;
  if (vertical_first) {  // all source columns down to out_h rows, then each row across
    const int64_t in_row = in_w * 3;
    tmp.resize(static_cast<size_t>(out_h * in_row));
    vertical_pass(src, src_stride, 0, cv, in_row, out_h, tmp.data());
    horizontal_rows(tmp.data(), in_row, out_h, ch, in_w, out_w, dst);
    return;
  }
  // Horizontal first, over the source rows the vertical pass reads (Pillow's ybox_first .. ybox_last).
  const int64_t y_first = cv.first[0];
  const int64_t y_last = cv.first[static_cast<size_t>(out_h - 1)] + cv.count[static_cast<size_t>(out_h - 1)];
  tmp.resize(static_cast<size_t>((y_last - y_first) * out_row));
  horizontal_rows(src + y_first * src_stride, src_stride, y_last - y_first, ch, in_w, out_w, tmp.data());
  vertical_pass(tmp.data(), out_row, y_first, cv, out_row, out_h, dst);
}

}  // namespace solo

void register_resize(py::module_& m) {
  m.def(
      "resize_bilinear",
      [](const py::array& img, int64_t width, int64_t height, bool vertical_first) {
        if (img.ndim() != 3 || img.shape(2) != 3 || !py::array_t<uint8_t>::check_(img)) {
          throw py::type_error("resize_bilinear expects uint8[H, W, 3]");
        }
        if (img.strides(2) != 1 || img.strides(1) != 3) {
          throw std::invalid_argument("resize_bilinear: pixels must be contiguous within rows (HWC)");
        }
        py::array_t<uint8_t> out({height, width, int64_t{3}});
        const auto* src = static_cast<const uint8_t*>(img.data());
        const int64_t h = img.shape(0), w = img.shape(1), stride = img.strides(0);
        uint8_t* dst = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          solo::resize_bilinear_rgb(src, h, w, stride, dst, height, width, vertical_first);
        }
        return out;
      },
      py::arg("img"), py::arg("width"), py::arg("height"), py::arg("vertical_first") = false,
      "uint8[H, W, 3] -> uint8[height, width, 3], bit-identical to PIL Image.resize((width, height), BILINEAR) "
      "(GIL released). vertical_first: run the vertical pass first (Pillow >= 13 does when "
      "pillow13_vertical_first(...) holds; earlier Pillow never does).");
  m.def("pillow13_vertical_first", &solo::pillow13_vertical_first, py::arg("in_h"), py::arg("in_w"), py::arg("out_h"),
        py::arg("out_w"), "Pillow >= 13's choice of pass order for a resize (True: vertical pass first).");
}
