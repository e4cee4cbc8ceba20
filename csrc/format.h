// THE SOLO image format rule (one implementation, used from Python via megatron_solo._C and by the C++ packer).
//
// Patch layout: an image of H x W pixels (H, W multiples of 32), HWC uint8 RGB, becomes n_h*n_w patches
// (n_h = H/32, n_w = W/32) in row-major order (patch index i*n_w + j), each a 3072-byte vector laid out
// channel-first inside the patch: value (c, y, x) sits at c*1024 + y*32 + x.
//
// Token layout of an image of n_h x n_w patches:
//   <vision> row_0 <vrow_sep> row_1 ... <vrow_sep> row_{n_h-1} </vision>, each row = n_w <vpatch>.
// Separators go BETWEEN rows only. Cost: n_h*n_w + (n_h - 1) + 2 tokens.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace solo {

constexpr int64_t kPatchSize = 32;                                  // pixels per patch side
constexpr int64_t kChannels = 3;                                    // RGB
constexpr int64_t kPatchDim = kChannels * kPatchSize * kPatchSize;  // 3072 uint8 values per patch

// Throws std::invalid_argument unless height/width are positive multiples of kPatchSize.
void check_image_shape(int64_t height, int64_t width);
// Throws std::invalid_argument unless n_h, n_w >= 1.
void check_grid(int64_t n_h, int64_t n_w);

// img: contiguous uint8[height, width, 3]; out: uint8[(height/32)*(width/32), 3072] (caller-allocated).
// Validates the shape (throws std::invalid_argument). Thread-safe, no allocation.
void patchify(const uint8_t* img, int64_t height, int64_t width, uint8_t* out);

// patches: contiguous uint8[n_h*n_w, 3072]; out: uint8[n_h*32, n_w*32, 3] (caller-allocated). Exact inverse of patchify.
void unpatchify(const uint8_t* patches, int64_t n_h, int64_t n_w, uint8_t* out);

// n_h*n_w + n_h - 1 + 2. Throws std::invalid_argument for n_h < 1 or n_w < 1.
int64_t image_token_count(int64_t n_h, int64_t n_w);

// Writes image_token_count(n_h, n_w) entries to token_ids and patch_index (caller-allocated).
// patch_index is patch_offset + (i*n_w + j) at the <vpatch> of patch (i, j), -1 elsewhere. patch_offset lets
// a packer number patches across several images of one pack; patch_index may be nullptr if not needed.
void image_layout(int64_t n_h, int64_t n_w, int32_t vision_id, int32_t vpatch_id, int32_t row_sep_id,
                  int32_t vision_end_id, int32_t* token_ids, int32_t* patch_index, int32_t patch_offset = 0);

// Convenience form returning vectors (patch_offset 0).
struct ImageLayout {
  std::vector<int32_t> token_ids;
  std::vector<int32_t> patch_index;
};
ImageLayout image_layout(int64_t n_h, int64_t n_w, int32_t vision_id, int32_t vpatch_id, int32_t row_sep_id,
                         int32_t vision_end_id);

}  // namespace solo
