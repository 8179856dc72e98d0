// LLaVA-OneVision's preprocessing on uint8 tiles (twin: ovfast/preprocess.py and ovfast/media.py):
// colour conversion, the anyres canvas and its tiles, several-image squares, video frame squashes,
// and the normalisation of tiles into the vision tower's (N, 3, T, T) layout.
#pragma once

#include <cstdint>

#include "resize.h"

namespace ovfast {

// How an alpha channel is composited onto white, matching the two paths of transformers.
enum class AlphaRule : int {
  kPil = 0,    // PIL.Image.alpha_composite's fixed-point arithmetic (PIL images)
  kNumpy = 1,  // round(a / 255 * c + (1 - a / 255) * 255) in double, half to even (NumPy arrays)
};

// (h, w, channels) uint8 with 1 (grey), 3 (RGB) or 4 (RGBA) channels -> packed RGB (h, w, 3).
void to_rgb(const uint8_t* src, int64_t h, int64_t w, int channels, AlphaRule rule, uint8_t* dst);

// The geometry of one anyres image, computed by ovfast.anyres: the image is resized to
// new_h x new_w, placed at (top, left) on a grid_h x grid_w canvas of tile x tile tiles.
struct AnyresLayout {
  int64_t tile, grid_h, grid_w, new_h, new_w, top, left;
  bool base_horizontal_first, canvas_horizontal_first;
};

// tiles: (1 + grid_h * grid_w, tile, tile, 3); tile 0 is the whole image squashed, then the
// canvas tiles in row-major order, zero outside the image.
void anyres_tiles(const RgbView& src, const AnyresLayout& layout, uint8_t* tiles);

// out: (tile, tile, 3): src placed at (top, left) on a side x side square of `fill`, then squashed.
void padded_square_tile(const RgbView& src, const uint8_t fill[3], int64_t side, int64_t top, int64_t left,
                        int64_t tile, bool horizontal_first, uint8_t* out);

// out[n, c, y, x] = table[c * 256 + tiles[n, y, x, c]] for n tiles of tile x tile pixels; T is
// the output element (the float32, float16 or bfloat16 bits of the table's values).
template <typename T>
void normalize_tiles(const uint8_t* tiles, int64_t n, int64_t tile, const T* table, T* out);

}  // namespace ovfast
