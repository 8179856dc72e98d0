#include "resize.h"

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "simd.h"
#include "thread_pool.h"

namespace ovfast {
namespace {

constexpr int kPrecisionBits = 22;  // Pillow's PRECISION_BITS for 8-bit images
constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);
// The horizontal pass works on kRows rows at once, transposed so that the kLanes bytes of one
// column are contiguous: the tap loop is then a vertical-style multiply-add over kLanes lanes.
constexpr int kRows = 16;
constexpr int kLanes = kRows * 3;
constexpr int64_t kChunk = 2048;  // vertical pass: accumulator lanes kept in L1

// Pillow's bicubic kernel (a = -0.5), same operations in the same order.
double bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

inline uint8_t clip8(int32_t acc) {
  int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

inline uint8_t* out_row(const RowSink& sink, int64_t y, uint8_t* scratch) {
  return sink.direct ? sink.direct + y * sink.stride : scratch;
}

inline void emit(const RowSink& sink, int64_t y, const uint8_t* row) {
  if (!sink.direct) sink.put(y, row);
}

// Pixel copies. copy4 moves 4 bytes to move one 3-byte pixel: the extra byte lands on the next
// pixel, which is written after it. Callers copy the last pixel of a run with copy3 so nothing
// is read or written past the run.
inline void copy3(uint8_t* d, const uint8_t* s) {
  d[0] = s[0];
  d[1] = s[1];
  d[2] = s[2];
}

inline void copy4(uint8_t* d, const uint8_t* s) {
  uint32_t v;
  std::memcpy(&v, s, 4);
  std::memcpy(d, &v, 4);
}

// block[x * kLanes + r * 3 + c] = in[r][x * 3 + c] for kRows rows of w pixels.
void transpose_in(const uint8_t* const* in, int64_t w, uint8_t* block) {
  for (int64_t x = 0; x < w - 1; ++x) {
    uint8_t* b = block + x * kLanes;
    for (int r = 0; r < kRows; ++r) copy4(b + r * 3, in[r] + x * 3);
  }
  for (int r = 0; r < kRows; ++r) copy3(block + (w - 1) * kLanes + r * 3, in[r] + (w - 1) * 3);
}

// row[x * 3 + c] = block[x * kLanes + r * 3 + c]: row r of a transposed output block.
void transpose_out(const uint8_t* block, int r, int64_t w, uint8_t* row) {
  for (int64_t x = 0; x < w - 1; ++x) copy4(row + x * 3, block + x * kLanes + r * 3);
  copy3(row + (w - 1) * 3, block + (w - 1) * kLanes + r * 3);
}

// One horizontal pass over a transposed block: out[x * kLanes + j] for every output column x.
OVFAST_VECTORIZE void horizontal_block(const uint8_t* __restrict block, const Taps& t, int64_t out_w,
                                       uint8_t* __restrict out) {
  for (int64_t x = 0; x < out_w; ++x) {
    int32_t acc[kLanes];
    for (int j = 0; j < kLanes; ++j) acc[j] = kHalf;
    const uint8_t* p = block + static_cast<int64_t>(t.start[x]) * kLanes;
    const int32_t* w = t.weights.data() + x * t.ksize;
    for (int32_t k = 0; k < t.count[x]; ++k) {
      const int32_t wk = w[k];
      const uint8_t* q = p + k * kLanes;
      for (int j = 0; j < kLanes; ++j) acc[j] += q[j] * wk;
    }
    for (int j = 0; j < kLanes; ++j) out[x * kLanes + j] = clip8(acc[j]);
  }
}

// One output row of the vertical pass: out[j] = sum_k rows[start + k][j] * w[k].
OVFAST_VECTORIZE void vertical_row(const RgbView& src, const int32_t* w, int64_t start, int32_t count,
                                   int32_t* __restrict acc, uint8_t* __restrict out) {
  const int64_t n = src.w * 3;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t m = std::min(kChunk, n - j0);
    for (int64_t j = 0; j < m; ++j) acc[j] = kHalf;
    int32_t k = 0;
    for (; k + 4 <= count; k += 4) {  // four taps per sweep: a quarter of the accumulator traffic
      const uint8_t* __restrict a = src.row(start + k) + j0;
      const uint8_t* __restrict b = src.row(start + k + 1) + j0;
      const uint8_t* __restrict c = src.row(start + k + 2) + j0;
      const uint8_t* __restrict d = src.row(start + k + 3) + j0;
      const int32_t wa = w[k], wb = w[k + 1], wc = w[k + 2], wd = w[k + 3];
      for (int64_t j = 0; j < m; ++j) acc[j] += a[j] * wa + b[j] * wb + c[j] * wc + d[j] * wd;
    }
    for (; k < count; ++k) {
      const uint8_t* __restrict in = src.row(start + k) + j0;
      const int32_t wk = w[k];
      for (int64_t j = 0; j < m; ++j) acc[j] += in[j] * wk;
    }
    for (int64_t j = 0; j < m; ++j) out[j0 + j] = clip8(acc[j]);
  }
}

// Horizontal pass over source rows [r0, r1); output row y - r0 goes to the sink.
void horizontal_pass(const RgbView& src, int64_t r0, int64_t r1, const Taps& t, int64_t out_w, const RowSink& sink) {
  const int64_t blocks = (r1 - r0 + kRows - 1) / kRows;
  parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> block(src.w * kLanes), tout(out_w * kLanes), rows(kRows * out_w * 3);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t y0 = r0 + b * kRows;
      const int n = static_cast<int>(std::min<int64_t>(kRows, r1 - y0));
      const uint8_t* in[kRows];
      for (int r = 0; r < kRows; ++r) in[r] = src.row(y0 + std::min(r, n - 1));  // a short block repeats its last row
      transpose_in(in, src.w, block.data());
      horizontal_block(block.data(), t, out_w, tout.data());
      for (int r = 0; r < n; ++r) {
        uint8_t* dst = out_row(sink, y0 - r0 + r, rows.data() + r * out_w * 3);
        transpose_out(tout.data(), r, out_w, dst);
        emit(sink, y0 - r0 + r, dst);
      }
    }
  });
}

// Vertical pass to t's outputs; taps index rows of `src` shifted down by `offset`.
void vertical_pass(const RgbView& src, const Taps& t, int64_t offset, const RowSink& sink) {
  const int64_t out_h = static_cast<int64_t>(t.start.size());
  parallel_for(out_h, 4, [&](int64_t y0, int64_t y1) {
    std::vector<int32_t> acc(std::min(kChunk, src.w * 3));
    std::vector<uint8_t> row(src.w * 3);
    for (int64_t y = y0; y < y1; ++y) {
      uint8_t* dst = out_row(sink, y, row.data());
      vertical_row(src, t.weights.data() + y * t.ksize, t.start[y] - offset, t.count[y], acc.data(), dst);
      emit(sink, y, dst);
    }
  });
}

void copy_rows(const RgbView& src, const RowSink& sink) {
  parallel_for(src.h, 64, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      if (sink.direct) {
        std::memcpy(sink.direct + y * sink.stride, src.row(y), src.w * 3);
      } else {
        sink.put(y, src.row(y));
      }
    }
  });
}

}  // namespace

void advise_huge_pages(void* p, int64_t n) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(n)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

std::unique_ptr<uint8_t[]> scratch_bytes(int64_t n) {
  std::unique_ptr<uint8_t[]> buf(new uint8_t[n]);
  advise_huge_pages(buf.get(), n);
  return buf;
}

Taps bicubic_taps(int64_t in, int64_t out) {
  Taps t;
  const double scale = static_cast<double>(in) / static_cast<double>(out);
  const double filterscale = std::max(scale, 1.0);
  const double support = 2.0 * filterscale;
  const double ss = 1.0 / filterscale;
  t.ksize = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  t.start.resize(out);
  t.count.resize(out);
  t.weights.assign(out * t.ksize, 0);
  std::vector<double> k(t.ksize);
  for (int64_t i = 0; i < out; ++i) {
    const double center = (static_cast<double>(i) + 0.5) * scale;
    int64_t xmin = static_cast<int64_t>(center - support + 0.5);  // truncation, as Pillow's (int)
    if (xmin < 0) xmin = 0;
    int64_t xmax = static_cast<int64_t>(center + support + 0.5);
    if (xmax > in) xmax = in;
    xmax -= xmin;
    double total = 0.0;  // summed left to right, as Pillow does
    for (int64_t x = 0; x < xmax; ++x) {
      const double w = bicubic((static_cast<double>(x + xmin) - center + 0.5) * ss);
      k[x] = w;
      total += w;
    }
    for (int64_t x = 0; x < xmax; ++x) {
      if (total != 0.0) k[x] /= total;
      // Round half away from zero into 22 fractional bits (Pillow's normalize_coeffs_8bpc).
      const double scaled = k[x] * static_cast<double>(1 << kPrecisionBits);
      t.weights[i * t.ksize + x] = static_cast<int32_t>(k[x] < 0 ? -0.5 + scaled : 0.5 + scaled);
    }
    t.start[i] = static_cast<int32_t>(xmin);
    t.count[i] = static_cast<int32_t>(xmax);
  }
  return t;
}

void resize_bicubic(const RgbView& src, int64_t out_h, int64_t out_w, bool horizontal_first, const RowSink& sink) {
  if (out_h == src.h && out_w == src.w) {
    copy_rows(src, sink);  // Pillow returns a copy when the size is unchanged
    return;
  }
  const Taps ty = bicubic_taps(src.h, out_h), tx = bicubic_taps(src.w, out_w);
  if (horizontal_first) {
    if (out_w == src.w) return vertical_pass(src, ty, 0, sink);
    if (out_h == src.h) return horizontal_pass(src, 0, src.h, tx, out_w, sink);
    // Only the rows the vertical pass reads are resampled horizontally.
    const int64_t first = ty.start.front(), last = ty.start.back() + ty.count.back();
    auto mid = scratch_bytes((last - first) * out_w * 3);
    horizontal_pass(src, first, last, tx, out_w, RowSink{mid.get(), out_w * 3, {}});
    return vertical_pass(RgbView{mid.get(), last - first, out_w, out_w * 3}, ty, first, sink);
  }
  auto mid = scratch_bytes(out_h * src.w * 3);
  vertical_pass(src, ty, 0, RowSink{mid.get(), src.w * 3, {}});
  const RgbView mv{mid.get(), out_h, src.w, src.w * 3};
  if (out_w == src.w) return copy_rows(mv, sink);
  horizontal_pass(mv, 0, out_h, tx, out_w, sink);
}

void resize_bicubic_into(const RgbView& src, uint8_t* dst, int64_t out_h, int64_t out_w, int64_t dst_stride,
                         bool horizontal_first) {
  resize_bicubic(src, out_h, out_w, horizontal_first, RowSink{dst, dst_stride, {}});
}

}  // namespace ovfast
