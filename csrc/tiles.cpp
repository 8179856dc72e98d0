#include "tiles.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"
#include "thread_pool.h"

namespace ovfast {
namespace {

// PIL.Image.alpha_composite(white, rgba) for one channel value (libImaging/AlphaComposite.c with
// an opaque white destination; 7 bits of extra precision, divisions by 255 rounded by shifts).
inline uint8_t composite_pil(uint32_t c, uint32_t a) {
  constexpr uint32_t kBits = 7;
  if (a == 0) return 255;
  const uint32_t blend = 255 * (255 - a);
  const uint32_t outa255 = a * 255 + blend;
  const uint32_t coef1 = a * 255 * 255 * (1u << kBits) / outa255;
  const uint32_t coef2 = 255 * (1u << kBits) - coef1;
  const uint32_t tmp = c * coef1 + 255 * coef2 + (0x80u << kBits);
  return static_cast<uint8_t>((((tmp >> 8) + tmp) >> 8) >> kBits);
}

// transformers' NumPy path: np.round(alpha * c + (1 - alpha) * 255) with alpha = a / 255, in
// double; nearbyint rounds half to even like np.round (-ffp-contract=off keeps the two roundings).
inline uint8_t composite_numpy(uint32_t c, uint32_t a) {
  const double alpha = static_cast<double>(a) / 255.0;
  return static_cast<uint8_t>(std::nearbyint(alpha * static_cast<double>(c) + (1.0 - alpha) * 255.0));
}

OVFAST_VECTORIZE void grey_row(const uint8_t* __restrict src, int64_t w, uint8_t* __restrict dst) {
  for (int64_t x = 0; x < w; ++x) dst[3 * x] = dst[3 * x + 1] = dst[3 * x + 2] = src[x];
}

// Fills canvas rows [y0, y1) of a tile grid with zeros between columns [x0, x1).
void zero_canvas(uint8_t* tiles, const AnyresLayout& l, int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = x0; x < x1;) {
      const int64_t tx = x / l.tile, xx = x % l.tile, n = std::min(x1 - x, l.tile - xx);
      std::memset(tiles + (((y / l.tile) * l.grid_w + tx) * l.tile + y % l.tile) * l.tile * 3 + xx * 3, 0, n * 3);
      x += n;
    }
  }
}

template <typename T>
inline void normalize_row(const uint8_t* __restrict px, int64_t w, const T* __restrict table,
                          T* __restrict r, T* __restrict g, T* __restrict b) {
  for (int64_t x = 0; x < w; ++x) {
    r[x] = table[px[3 * x]];
    g[x] = table[256 + px[3 * x + 1]];
    b[x] = table[512 + px[3 * x + 2]];
  }
}

}  // namespace

void to_rgb(const uint8_t* src, int64_t h, int64_t w, int channels, AlphaRule rule, uint8_t* dst) {
  // The composite depends only on (value, alpha): one 64 KiB table replaces per-pixel arithmetic.
  std::vector<uint8_t> lut;
  if (channels == 4) {
    lut.resize(256 * 256);
    for (uint32_t a = 0; a < 256; ++a)
      for (uint32_t c = 0; c < 256; ++c)
        lut[a * 256 + c] = rule == AlphaRule::kPil ? composite_pil(c, a) : composite_numpy(c, a);
  }
  parallel_for(h, 16, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      const uint8_t* s = src + y * w * channels;
      uint8_t* d = dst + y * w * 3;
      if (channels == 1) {
        grey_row(s, w, d);
      } else if (channels == 3) {
        std::memcpy(d, s, w * 3);
      } else {
        for (int64_t x = 0; x < w; ++x) {
          const uint8_t* row = lut.data() + s[4 * x + 3] * 256;
          d[3 * x] = row[s[4 * x]];
          d[3 * x + 1] = row[s[4 * x + 1]];
          d[3 * x + 2] = row[s[4 * x + 2]];
        }
      }
    }
  });
}

void anyres_tiles(const RgbView& src, const AnyresLayout& l, uint8_t* tiles) {
  const int64_t tile_bytes = l.tile * l.tile * 3;
  resize_bicubic_into(src, tiles, l.tile, l.tile, l.tile * 3, l.base_horizontal_first);
  uint8_t* canvas = tiles + tile_bytes;
  const int64_t canvas_h = l.grid_h * l.tile, canvas_w = l.grid_w * l.tile;
  // A resized row spans up to grid_w tiles: copy it there piece by piece.
  RowSink sink;
  sink.put = [&](int64_t y, const uint8_t* row) {
    const int64_t cy = l.top + y, ty = cy / l.tile, yy = cy % l.tile;
    for (int64_t x = 0; x < l.new_w;) {
      const int64_t cx = l.left + x, tx = cx / l.tile, xx = cx % l.tile, n = std::min(l.new_w - x, l.tile - xx);
      std::memcpy(canvas + ((ty * l.grid_w + tx) * l.tile + yy) * l.tile * 3 + xx * 3, row + x * 3, n * 3);
      x += n;
    }
  };
  resize_bicubic(src, l.new_h, l.new_w, l.canvas_horizontal_first, sink);
  parallel_for(canvas_h, 64, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      if (y < l.top || y >= l.top + l.new_h) {
        zero_canvas(canvas, l, y, y + 1, 0, canvas_w);
      } else {
        zero_canvas(canvas, l, y, y + 1, 0, l.left);
        zero_canvas(canvas, l, y, y + 1, l.left + l.new_w, canvas_w);
      }
    }
  });
}

void padded_square_tile(const RgbView& src, const uint8_t fill[3], int64_t side, int64_t top, int64_t left,
                        int64_t tile, bool horizontal_first, uint8_t* out) {
  if (src.h == side && src.w == side) return resize_bicubic_into(src, out, tile, tile, tile * 3, horizontal_first);
  auto square = scratch_bytes(side * side * 3);
  std::vector<uint8_t> fill_row(side * 3);
  for (int64_t x = 0; x < side; ++x) std::memcpy(fill_row.data() + x * 3, fill, 3);
  parallel_for(side, 64, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      uint8_t* row = square.get() + y * side * 3;
      std::memcpy(row, fill_row.data(), side * 3);
      if (y >= top && y < top + src.h) std::memcpy(row + left * 3, src.row(y - top), src.w * 3);
    }
  });
  resize_bicubic_into(RgbView{square.get(), side, side, side * 3}, out, tile, tile, tile * 3, horizontal_first);
}

template <typename T>
void normalize_tiles(const uint8_t* tiles, int64_t n, int64_t tile, const T* table, T* out) {
  const int64_t plane = tile * tile;
  parallel_for(n * tile, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r / tile, y = r % tile;
      T* o = out + i * 3 * plane + y * tile;
      normalize_row<T>(tiles + (i * plane + y * tile) * 3, tile, table, o, o + plane, o + 2 * plane);
    }
  });
}

template void normalize_tiles<uint16_t>(const uint8_t*, int64_t, int64_t, const uint16_t*, uint16_t*);
template void normalize_tiles<uint32_t>(const uint8_t*, int64_t, int64_t, const uint32_t*, uint32_t*);

}  // namespace ovfast
