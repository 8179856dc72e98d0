// Argument checks for the bindings: every failure is a Python ValueError naming the argument.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace ovfast {
namespace py = pybind11;

// Largest accepted side of any image or tile: keeps every index and fixed-point tap in range.
constexpr int64_t kMaxSide = int64_t{1} << 24;

[[noreturn]] inline void fail(const std::string& name, const std::string& what) {
  throw py::value_error("ovfast._C: argument '" + name + "' " + what);
}

inline void check(bool ok, const std::string& name, const std::string& what) {
  if (!ok) fail(name, what);
}

inline std::string shape_str(const py::buffer_info& b) {
  std::string s = "(";
  for (size_t i = 0; i < b.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(b.shape[i]);
  return s + (b.shape.size() == 1 ? ",)" : ")");
}

// A C-contiguous buffer of `ndim` dimensions of `itemsize`-byte elements, every side in
// [1, kMaxSide] and the byte size free of overflow; `shape` entries >= 0 must match exactly.
inline py::buffer_info buffer_arg(const py::handle& obj, const std::string& name, int64_t itemsize,
                                  const std::vector<int64_t>& shape, bool writable) {
  if (!PyObject_CheckBuffer(obj.ptr())) fail(name, std::string("must be a buffer (a NumPy array), got ") + Py_TYPE(obj.ptr())->tp_name);
  py::buffer_info b = py::reinterpret_borrow<py::buffer>(obj).request();
  check(b.itemsize == itemsize, name, "must have " + std::to_string(itemsize) + "-byte elements, got " +
                                          std::to_string(b.itemsize) + " (format '" + b.format + "')");
  check(itemsize != 1 || b.format == "B", name, "must be uint8, got format '" + b.format + "'");
  check(b.ndim == static_cast<py::ssize_t>(shape.size()), name,
        "must have " + std::to_string(shape.size()) + " dimensions, got shape " + shape_str(b));
  check(!writable || !b.readonly, name, "must be writable");
  int64_t bytes = itemsize;
  for (size_t i = 0; i < shape.size(); ++i) {
    const int64_t n = b.shape[i];
    check(n >= 1 && n <= kMaxSide, name, "has a side out of [1, 2^24]: shape " + shape_str(b));
    check(shape[i] < 0 || n == shape[i], name, "has shape " + shape_str(b) + ", dimension " + std::to_string(i) +
                                                   " must be " + std::to_string(shape[i]));
    check(!__builtin_mul_overflow(bytes, n, &bytes), name, "is too large: shape " + shape_str(b));
  }
  int64_t expected = itemsize;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    check(b.shape[i] == 1 || b.strides[i] == expected, name, "must be C-contiguous (np.ascontiguousarray)");
    expected *= b.shape[i];
  }
  return b;
}

}  // namespace ovfast
