// Pillow-exact BICUBIC resize of packed RGB uint8 images (twin: ovfast/resample.py and Pillow).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace ovfast {

// A packed RGB image: h rows of w * 3 bytes, `stride` bytes apart.
struct RgbView {
  const uint8_t* data;
  int64_t h, w, stride;
  const uint8_t* row(int64_t y) const { return data + y * stride; }
};

// Pillow's fixed-point filter for one pass from `in` to `out` samples: output i reads inputs
// start[i] .. start[i] + count[i] - 1 with weights[i * ksize + k] (22 fractional bits).
struct Taps {
  int64_t ksize = 0;
  std::vector<int32_t> start, count, weights;
};
Taps bicubic_taps(int64_t in, int64_t out);

// Where a resize puts its output rows: straight into a packed image (`direct`, rows `stride`
// bytes apart), or handed one at a time to `put` (row valid during the call only; called from
// pool threads).
struct RowSink {
  uint8_t* direct = nullptr;
  int64_t stride = 0;
  std::function<void(int64_t y, const uint8_t* row)> put;
};

// Resizes `src` to out_h x out_w exactly as Pillow's Image.resize(BICUBIC) does; `horizontal_first`
// is Pillow's pass order for these sizes (ovfast.resample.horizontal_first). Rows go to `sink`.
void resize_bicubic(const RgbView& src, int64_t out_h, int64_t out_w, bool horizontal_first, const RowSink& sink);

// An uninitialised byte buffer for large intermediates: no zeroing pass, and huge pages when the
// kernel offers them, so first-touch page faults do not dominate.
std::unique_ptr<uint8_t[]> scratch_bytes(int64_t n);

// Asks for transparent huge pages on the 2 MiB-aligned part of [p, p + n) (a hint: a no-op where
// unsupported). Large outputs written once are otherwise mostly page-fault time.
void advise_huge_pages(void* p, int64_t n);

// Same, into a packed image of out_h rows `dst_stride` bytes apart.
void resize_bicubic_into(const RgbView& src, uint8_t* dst, int64_t out_h, int64_t out_w, int64_t dst_stride,
                         bool horizontal_first);

}  // namespace ovfast
