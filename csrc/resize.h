// The SOLO resize (bilinear, PIL semantics) of uint8 RGB images, bit-identical to Pillow's Image.resize(size,
// BILINEAR) (libImaging/Resample.c: coefficients in double, normalised to 22-bit fixed point, a horizontal then a
// vertical pass over 8-bit samples, each rounded and clipped).
//
// Why our own: Pillow's two passes are scalar loops over 4-byte pixels, and going numpy -> PIL -> numpy around them
// costs two more copies; resizing was about half of a preprocessing worker's time on 512-px photos. Integer sums do
// not depend on the order of their terms, so both passes here run with SIMD (the vertical one over whole rows, the
// horizontal one 8 output pixels at a time with AVX2 gathers, where the CPU has AVX2) and still give Pillow's bytes. tests/test_image.py compares against the installed Pillow on many
// shapes, and format/image.py checks a few at import and falls back to Pillow should a future Pillow differ.
#pragma once

#include <cstdint>
#include <vector>

namespace solo {

// Per output position: the first input index, the number of taps, and that many fixed-point weights (ksize each).
struct ResampleCoeffs {
  int64_t ksize = 0;
  std::vector<int32_t> first, count;
  std::vector<int32_t> weights;  // out_size * ksize
};

ResampleCoeffs bilinear_coeffs(int64_t in_size, int64_t out_size);

// Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many pixels as the width;
// earlier versions always ran the horizontal pass first. The orders round differently (by 1 here and there), so the
// caller says which Pillow to match (format/image.py probes the installed one).
bool pillow13_vertical_first(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w);

// src: uint8[in_h, in_w, 3] with row stride src_stride bytes; dst: contiguous uint8[out_h, out_w, 3].
// Throws std::invalid_argument on non-positive sizes. Thread-safe; allocates its temporaries.
void resize_bilinear_rgb(const uint8_t* src, int64_t in_h, int64_t in_w, int64_t src_stride, uint8_t* dst,
                         int64_t out_h, int64_t out_w, bool vertical_first);

}  // namespace solo
