// ovfast._C: native CPU preprocessing. Each function checks its arguments, then releases the GIL
// for the whole computation. Python wrappers and pure-Python twins live in ovfast/native.py.
#include <array>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "checks.h"
#include "resize.h"
#include "thread_pool.h"
#include "tiles.h"

namespace py = pybind11;
using namespace ovfast;

namespace {

RgbView rgb_arg(const py::buffer_info& b) {
  return RgbView{static_cast<const uint8_t*>(b.ptr), b.shape[0], b.shape[1], b.shape[1] * 3};
}

py::array_t<uint8_t> to_rgb_py(const py::handle& src, int alpha) {
  py::buffer_info s = buffer_arg(src, "src", 1, {-1, -1, -1}, false);
  const int c = static_cast<int>(s.shape[2]);
  check(c == 1 || c == 3 || c == 4, "src", "must have 1, 3 or 4 channels, got " + std::to_string(c));
  check(alpha == 0 || alpha == 1, "alpha", "must be 0 (PIL composite) or 1 (NumPy composite)");
  py::array_t<uint8_t> out({s.shape[0], s.shape[1], py::ssize_t{3}});
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    to_rgb(static_cast<const uint8_t*>(s.ptr), s.shape[0], s.shape[1], c, static_cast<AlphaRule>(alpha), dst);
  }
  return out;
}

void resize_py(const py::handle& src, const py::handle& out, bool horizontal_first) {
  py::buffer_info s = buffer_arg(src, "src", 1, {-1, -1, 3}, false);
  py::buffer_info o = buffer_arg(out, "out", 1, {-1, -1, 3}, true);
  py::gil_scoped_release nogil;
  resize_bicubic_into(rgb_arg(s), static_cast<uint8_t*>(o.ptr), o.shape[0], o.shape[1], o.shape[1] * 3,
                      horizontal_first);
}

void anyres_tiles_py(const py::handle& src, const py::handle& out, int64_t grid_w, int64_t new_h, int64_t new_w,
                     int64_t top, int64_t left, bool base_horizontal_first, bool canvas_horizontal_first) {
  py::buffer_info s = buffer_arg(src, "src", 1, {-1, -1, 3}, false);
  py::buffer_info o = buffer_arg(out, "out", 1, {-1, -1, -1, 3}, true);
  const int64_t tile = o.shape[1];
  check(o.shape[2] == tile, "out", "tiles must be square, got shape " + shape_str(o));
  check(grid_w >= 1 && o.shape[0] >= 2 && (o.shape[0] - 1) % grid_w == 0, "grid_w",
        "must divide the " + std::to_string(o.shape[0] - 1) + " canvas tiles of 'out'");
  AnyresLayout l{tile, (o.shape[0] - 1) / grid_w, grid_w, new_h, new_w, top, left, base_horizontal_first,
                 canvas_horizontal_first};
  check(new_h >= 1 && top >= 0 && top + new_h <= l.grid_h * tile, "new_h/top", "must place the image inside the canvas");
  check(new_w >= 1 && left >= 0 && left + new_w <= grid_w * tile, "new_w/left", "must place the image inside the canvas");
  py::gil_scoped_release nogil;
  advise_huge_pages(o.ptr, o.size);
  anyres_tiles(rgb_arg(s), l, static_cast<uint8_t*>(o.ptr));
}

void padded_square_tile_py(const py::handle& src, const py::handle& out, std::array<int, 3> fill, int64_t side,
                           int64_t top, int64_t left, bool horizontal_first) {
  py::buffer_info s = buffer_arg(src, "src", 1, {-1, -1, 3}, false);
  py::buffer_info o = buffer_arg(out, "out", 1, {-1, -1, 3}, true);
  check(o.shape[0] == o.shape[1], "out", "must be one square tile, got shape " + shape_str(o));
  check(side <= kMaxSide && top >= 0 && left >= 0 && top + s.shape[0] <= side && left + s.shape[1] <= side, "side/top/left",
        "must place the image inside the square");
  uint8_t f[3];
  for (int c = 0; c < 3; ++c) {
    check(fill[c] >= 0 && fill[c] <= 255, "fill", "values must be in [0, 255]");
    f[c] = static_cast<uint8_t>(fill[c]);
  }
  py::gil_scoped_release nogil;
  padded_square_tile(rgb_arg(s), f, side, top, left, o.shape[0], horizontal_first, static_cast<uint8_t*>(o.ptr));
}

void squash_frames_py(const py::list& frames, const py::handle& out, const std::vector<bool>& horizontal_first) {
  py::buffer_info o = buffer_arg(out, "out", 1, {static_cast<int64_t>(frames.size()), -1, -1, 3}, true);
  check(o.shape[1] == o.shape[2], "out", "tiles must be square, got shape " + shape_str(o));
  check(horizontal_first.size() == frames.size(), "horizontal_first", "must have one entry per frame");
  std::vector<py::buffer_info> src;
  for (size_t i = 0; i < frames.size(); ++i) src.push_back(buffer_arg(frames[i], "frames[" + std::to_string(i) + "]", 1, {-1, -1, 3}, false));
  const int64_t tile = o.shape[1];
  py::gil_scoped_release nogil;
  advise_huge_pages(o.ptr, o.size);
  for (size_t i = 0; i < src.size(); ++i) {
    resize_bicubic_into(rgb_arg(src[i]), static_cast<uint8_t*>(o.ptr) + i * tile * tile * 3, tile, tile, tile * 3,
                        horizontal_first[i]);
  }
}

void normalize_py(const py::handle& tiles, const py::handle& table, const py::handle& out) {
  py::buffer_info t = buffer_arg(tiles, "tiles", 1, {-1, -1, -1, 3}, false);
  const int64_t n = t.shape[0], tile = t.shape[1];
  check(t.shape[2] == tile, "tiles", "must be square, got shape " + shape_str(t));
  const int64_t itemsize = py::reinterpret_borrow<py::buffer>(table).request().itemsize;
  check(itemsize == 2 || itemsize == 4, "table", "must hold 2-byte (float16/bfloat16) or 4-byte (float32) values");
  py::buffer_info tb = buffer_arg(table, "table", itemsize, {3, 256}, false);
  py::buffer_info o = buffer_arg(out, "out", itemsize, {n, 3, tile, tile}, true);
  py::gil_scoped_release nogil;
  advise_huge_pages(o.ptr, o.size * itemsize);
  const auto* px = static_cast<const uint8_t*>(t.ptr);
  if (itemsize == 2) {
    normalize_tiles(px, n, tile, static_cast<const uint16_t*>(tb.ptr), static_cast<uint16_t*>(o.ptr));
  } else {
    normalize_tiles(px, n, tile, static_cast<const uint32_t*>(tb.ptr), static_cast<uint32_t*>(o.ptr));
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ovfast native CPU preprocessing (Pillow-exact bicubic, anyres tiles, normalisation)";
  m.def("num_threads", &num_threads, "Threads of the preprocessing pool, the caller included.");
  m.def(
      "set_num_threads",
      [](int n) {
        check(n >= 1 && n <= 1024, "n", "must be in [1, 1024], got " + std::to_string(n));
        set_num_threads(n);
      },
      py::arg("n"), "Use n threads (the caller included) from the next call on.");
  m.def("to_rgb", &to_rgb_py, py::arg("src"), py::arg("alpha"),
        "(H, W, 1|3|4) uint8 -> (H, W, 3): grey repeated, alpha onto white (0: PIL rule, 1: NumPy rule).");
  m.def("resize", &resize_py, py::arg("src"), py::arg("out"), py::arg("horizontal_first"),
        "Pillow BICUBIC resize of (H, W, 3) uint8 into out (h, w, 3).");
  m.def("anyres_tiles", &anyres_tiles_py, py::arg("src"), py::arg("out"), py::arg("grid_w"), py::arg("new_h"),
        py::arg("new_w"), py::arg("top"), py::arg("left"), py::arg("base_horizontal_first"),
        py::arg("canvas_horizontal_first"), "Base tile and row-major canvas tiles into out (1 + n, T, T, 3).");
  m.def("padded_square_tile", &padded_square_tile_py, py::arg("src"), py::arg("out"), py::arg("fill"), py::arg("side"),
        py::arg("top"), py::arg("left"), py::arg("horizontal_first"),
        "src at (top, left) on a side x side square of fill, squashed into out (T, T, 3).");
  m.def("squash_frames", &squash_frames_py, py::arg("frames"), py::arg("out"), py::arg("horizontal_first"),
        "Every (H, W, 3) frame squashed into out (F, T, T, 3).");
  m.def("normalize", &normalize_py, py::arg("tiles"), py::arg("table"), py::arg("out"),
        "out[n, c, y, x] = table[c, tiles[n, y, x, c]]; table and out share one 2- or 4-byte element type.");
}
