"""Pillow's BICUBIC resize on the GPU, bit for bit, writing straight into 3-channel uint8 tiles.

Pillow resizes in two separable fixed-point passes (``ovfast/resample.py`` has the tables and a
NumPy twin). For each output sample of a pass::

    acc = 1 << 21;  acc += pixel[xmin + k] * weight[k] for k < ksize  (int32)
    out = clamp(acc >> 22, 0, 255)                                   (arithmetic shift)

and the first pass's output is stored as uint8 before the second pass reads it. Which pass
runs first follows ``resample.horizontal_first`` (Pillow 13 runs the vertical one first when
the height shrinks by more than twice as many pixels as the width), because the intermediate
rounding makes the order visible in the bits. A pass over an unchanged axis uses a one-tap
identity table (Pillow skips it; the copy is exact).

Launches: a request's resizes (anyres: the base squash and the canvas resize; video: every
frame) are a list of ``Resize`` jobs, and each pass is ONE launch over all of them. Every
program reads its job's descriptor row (a small int64 table, like the coefficient tables built
once per geometry and cached on the device), so jobs of different sizes, pass orders and
padding share the launch. Pass 1 writes a planar uint8 intermediate per job; pass 2 computes
every pixel of each job's canvas (the resized image where it lies, the fill colour elsewhere)
and stores it directly in its tile of the (n, 3, T, T) output: no canvas, pad or crop copies.
The several-image square padding is virtual too: pass 1 reads the fill colour outside the image.

Exact (integer arithmetic): tests require equality with PIL.Image.resize.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ovfast.inputs.resample import PRECISION_BITS, coefficients, horizontal_first

from . import _runtime


@dataclass(frozen=True)
class Resize:
    """One Pillow BICUBIC resize of an (H, W, 3) uint8 image into a canvas cut into tiles.

    The image is ``src_h`` x ``src_w`` at element ``src_offset`` of the (contiguous HWC)
    source buffer. With ``square``, it is first centred on a square of ``square_fill`` (left/top
    = (side - size) // 2, as processing.padded_square_tile does). The result (out_h, out_w)
    sits at ``offset`` (top, left) in a ``canvas`` (height, width; default: the result's size)
    whose other pixels are ``canvas_fill``; the canvas is cut into tile x tile crops, row-major,
    stored from output tile ``first_tile`` on.
    """

    src_offset: int
    src_h: int
    src_w: int
    out_h: int
    out_w: int
    first_tile: int
    canvas: tuple[int, int] | None = None
    offset: tuple[int, int] = (0, 0)
    canvas_fill: int = 0
    square: bool = False
    square_fill: tuple[int, int, int] = (0, 0, 0)


# Descriptor columns, one row per job and pass (the kernel reads them by these indices).
_FIELDS = (
    "block_start",  # 0: first program of the job
    "src_off", "src_sy", "src_sx", "src_sc",  # 1-4: source element offset and strides
    "data_h", "data_w", "pad_top", "pad_left",  # 5-8: where the real pixels lie in the input
    "in_h", "in_w",  # 9-10: the pass input's (logical, padded) size
    "axis",  # 11: 0 = vertical pass, 1 = horizontal pass
    "tab_min", "tab_w", "ksize",  # 12-14: the pass's coefficient table (row offsets) and taps
    "out_h", "out_w",  # 15-16: the pass output's size
    "canvas_h", "canvas_w", "top", "left",  # 17-20: the canvas it is placed in
    "dst_off", "dst_sy", "dst_sx", "dst_sc", "tile", "tiles_w", "tile_stride",  # 21-27: tiled output
    "src_fill0", "src_fill1", "src_fill2", "dst_fill0", "dst_fill1", "dst_fill2",  # 28-33
)
_NF = len(_FIELDS)


@triton.jit
def _pillow_pass_kernel(
    src_ptr, dst_ptr, desc_ptr, tab_min_ptr, tab_w_ptr,
    NUM_JOBS,
    NF: tl.constexpr, IDX: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    # IDX is the integer type of index and accumulator math: int32 when compiled; int64 under the
    # interpreter, which checks every int32 add and multiply for overflow (doubling its runtime)
    # but not int64 ones. Pillow's sums fit int32, so both give the same bits.
    # Which job this program works for: the last whose first program is <= pid (jobs are few).
    pid = tl.program_id(0)
    job = (pid * 0).to(IDX)
    for j in range(1, NUM_JOBS):
        job += (pid >= tl.load(desc_ptr + j * NF)).to(IDX)
    d = desc_ptr + job * NF
    src = src_ptr + tl.load(d + 1)  # int64 job offsets go on the pointers; IDX within a job
    src_sy = tl.load(d + 2).to(IDX)
    src_sx = tl.load(d + 3).to(IDX)
    src_sc = tl.load(d + 4).to(IDX)
    data_h = tl.load(d + 5).to(IDX)
    data_w = tl.load(d + 6).to(IDX)
    pad_top = tl.load(d + 7).to(IDX)
    pad_left = tl.load(d + 8).to(IDX)
    in_h = tl.load(d + 9).to(IDX)
    in_w = tl.load(d + 10).to(IDX)
    step_x = tl.load(d + 11).to(IDX)  # 1 in a horizontal pass: taps step along x
    step_y = 1 - step_x
    tab_min = tab_min_ptr + tl.load(d + 12)
    tab_w = tab_w_ptr + tl.load(d + 13)
    ksize = tl.load(d + 14).to(IDX)
    out_h = tl.load(d + 15).to(IDX)
    out_w = tl.load(d + 16).to(IDX)
    canvas_h = tl.load(d + 17).to(IDX)
    canvas_w = tl.load(d + 18).to(IDX)
    top = tl.load(d + 19).to(IDX)
    left = tl.load(d + 20).to(IDX)
    dst = dst_ptr + tl.load(d + 21)
    dst_sy = tl.load(d + 22).to(IDX)
    dst_sx = tl.load(d + 23).to(IDX)
    dst_sc = tl.load(d + 24).to(IDX)
    tile = tl.load(d + 25).to(IDX)
    tiles_w = tl.load(d + 26).to(IDX)
    tile_stride = tl.load(d + 27).to(IDX)
    # A block holds the three channels of each pixel on a last axis of 4 (blocks are powers of
    # two; the 4th lane re-reads channel 2 and is never stored), so every step below is one
    # block operation.
    chan = tl.arange(0, 4)
    chan_ok = chan < 3
    src_fill = tl.load(d + 28 + chan, mask=chan_ok, other=0).to(IDX)[None, None, :]
    dst_fill = tl.load(d + 31 + chan, mask=chan_ok, other=0).to(IDX)[None, None, :]

    # This program's BLOCK_Y x BLOCK_X block of canvas pixels, and the pass output they show.
    local = pid - tl.load(d).to(IDX)
    blocks_x = tl.cdiv(canvas_w, BLOCK_X)
    y = (local // blocks_x) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    x = (local % blocks_x) * BLOCK_X + tl.arange(0, BLOCK_X)
    oy = y - top
    ox = x - left
    row_in = (oy >= 0) & (oy < out_h) & (y < canvas_h)
    col_in = (ox >= 0) & (ox < out_w) & (x < canvas_w)

    # The resampled axis reads taps xmin + k with weights w[k]; the other axis reads its own
    # index with weight 1. Both are 1-D ([BLOCK_Y] or [BLOCK_X]) and broadcast to the block.
    row_taps = (row_in.to(IDX) * step_y) != 0
    col_taps = (col_in.to(IDX) * step_x) != 0
    base_y = tl.where(step_y != 0, tl.load(tab_min + oy, mask=row_taps, other=0).to(IDX), oy)
    base_x = tl.where(step_x != 0, tl.load(tab_min + ox, mask=col_taps, other=0).to(IDX), ox)
    src_c = src + (tl.minimum(chan, 2) * src_sc)[None, None, :]
    acc = tl.full((BLOCK_Y, BLOCK_X, 4), 1 << 21, IDX)  # 1 << (PRECISION_BITS - 1): rounding
    # Blocks of pure padding (most of a very wide or tall image's canvas) skip the taps.
    taps = ksize * tl.max(row_in.to(IDX), axis=0) * tl.max(col_in.to(IDX), axis=0)
    for k in range(0, taps):
        w = (tl.load(tab_w + oy * ksize + k, mask=row_taps, other=1).to(IDX)[:, None]
             * tl.load(tab_w + ox * ksize + k, mask=col_taps, other=1).to(IDX)[None, :])
        # Taps past a row's count weigh 0; clamping keeps their address inside the input.
        sy = tl.minimum(base_y + k * step_y, in_h - 1) - pad_top
        sx = tl.minimum(base_x + k * step_x, in_w - 1) - pad_left
        # Outside the real pixels (the virtual square padding) a tap reads the fill colour.
        rows_ok = (sy >= 0) & (sy < data_h) & row_in
        cols_ok = (sx >= 0) & (sx < data_w) & col_in
        inside = (rows_ok[:, None] & cols_ok[None, :])[:, :, None]
        off = ((sy * src_sy)[:, None] + (sx * src_sx)[None, :])[:, :, None]
        v = tl.load(src_c + off, mask=inside, other=src_fill)
        acc += v.to(IDX) * w[:, :, None]

    # Canvas pixel (y, x) lives in tile (y // tile, x // tile) at (y % tile, x % tile).
    off = (((y // tile) * tiles_w * tile_stride + (y % tile) * dst_sy)[:, None]
           + ((x // tile) * tile_stride + (x % tile) * dst_sx)[None, :])
    inside = (row_in[:, None] & col_in[None, :])[:, :, None]
    mask = ((y < canvas_h)[:, None] & (x < canvas_w)[None, :])[:, :, None] & chan_ok[None, None, :]
    v = tl.minimum(tl.maximum(acc >> 22, 0), 255)  # Pillow's clip8 (22 = PRECISION_BITS)
    v = tl.where(inside, v, dst_fill)
    tl.store(dst + off[:, :, None] + (chan * dst_sc)[None, None, :], v.to(tl.uint8), mask=mask)


# GPU: 8 x 128 pixels per program (8 per thread at 4 warps); each row of a block is 128
# contiguous bytes of a tile plane (one full cache line per store). Interpreter: fewer, bigger
# programs, as its cost is per NumPy op.
_BLOCK_Y, _BLOCK_X = (128, 256) if _runtime.INTERPRET else (8, 128)


@functools.lru_cache(maxsize=256)
def _table(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(xmin (out,), weights (out, ksize)) int32 for one pass; one identity tap when sizes match."""
    if in_size == out_size:
        return np.arange(out_size, dtype=np.int32), np.full((out_size, 1), 1 << PRECISION_BITS, dtype=np.int32)
    xmin, _, weights = coefficients(in_size, out_size)
    return xmin, weights


class _Tables:
    """The passes' coefficient tables, each pair stored once, concatenated for one upload."""

    def __init__(self):
        self.mins: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self._where: dict[tuple[int, int], tuple[int, int, int]] = {}
        self._sizes = [0, 0]

    def add(self, in_size: int, out_size: int) -> tuple[int, int, int]:
        """(tab_min, tab_w, ksize) of the in -> out table."""
        key = (in_size, out_size)
        if key not in self._where:
            xmin, weights = _table(in_size, out_size)
            self._where[key] = (self._sizes[0], self._sizes[1], weights.shape[1])
            self.mins.append(xmin)
            self.weights.append(weights.ravel())
            self._sizes[0] += xmin.size
            self._sizes[1] += weights.size
        return self._where[key]


@dataclass
class _Plan:
    desc: tuple[torch.Tensor, torch.Tensor]  # (jobs, _NF) int64 per pass
    programs: tuple[int, int]
    tab_min: torch.Tensor  # int32
    tab_w: torch.Tensor  # int32
    intermediate: int  # bytes of pass 1's output


def _blocks(h: int, w: int) -> int:
    return triton.cdiv(h, _BLOCK_Y) * triton.cdiv(w, _BLOCK_X)


@functools.lru_cache(maxsize=64)
def _plan(jobs: tuple[Resize, ...], tile: int, device: str) -> _Plan:
    tables = _Tables()
    rows: tuple[list[list[int]], list[list[int]]] = ([], [])
    programs = [0, 0]
    inter = 0
    tile_bytes = 3 * tile * tile
    for job in jobs:
        side = max(job.src_h, job.src_w) if job.square else 0
        in_h, in_w = (side, side) if job.square else (job.src_h, job.src_w)
        pad_top, pad_left = ((side - job.src_h) // 2, (side - job.src_w) // 2) if job.square else (0, 0)
        horizontal = horizontal_first(in_h, in_w, job.out_h, job.out_w)
        # Pass 1 output: rows x cols, planar (3, rows, cols) at byte ``inter`` of the intermediate.
        mid_h, mid_w = (in_h, job.out_w) if horizontal else (job.out_h, in_w)
        src_fill = job.square_fill if job.square else (0, 0, 0)
        first = dict(
            block_start=programs[0], src_off=job.src_offset, src_sy=3 * job.src_w, src_sx=3, src_sc=1,
            data_h=job.src_h, data_w=job.src_w, pad_top=pad_top, pad_left=pad_left, in_h=in_h, in_w=in_w,
            axis=int(horizontal), out_h=mid_h, out_w=mid_w, canvas_h=mid_h, canvas_w=mid_w, top=0, left=0,
            dst_off=inter, dst_sy=mid_w, dst_sx=1, dst_sc=mid_h * mid_w,
            tile=max(mid_h, mid_w), tiles_w=1, tile_stride=0,  # one "tile": the whole intermediate
            src_fill0=src_fill[0], src_fill1=src_fill[1], src_fill2=src_fill[2], dst_fill0=0, dst_fill1=0, dst_fill2=0,
        )
        first["tab_min"], first["tab_w"], first["ksize"] = (
            tables.add(in_w, job.out_w) if horizontal else tables.add(in_h, job.out_h))
        canvas_h, canvas_w = job.canvas or (job.out_h, job.out_w)
        if canvas_h % tile or canvas_w % tile:
            raise ValueError(f"canvas {canvas_h}x{canvas_w} is not a whole number of {tile}px tiles")
        second = dict(
            block_start=programs[1], src_off=inter, src_sy=mid_w, src_sx=1, src_sc=mid_h * mid_w,
            data_h=mid_h, data_w=mid_w, pad_top=0, pad_left=0, in_h=mid_h, in_w=mid_w,
            axis=int(not horizontal), out_h=job.out_h, out_w=job.out_w, canvas_h=canvas_h, canvas_w=canvas_w,
            top=job.offset[0], left=job.offset[1], dst_off=job.first_tile * tile_bytes, dst_sy=tile, dst_sx=1,
            dst_sc=tile * tile, tile=tile, tiles_w=canvas_w // tile, tile_stride=tile_bytes,
            src_fill0=0, src_fill1=0, src_fill2=0,
            dst_fill0=job.canvas_fill, dst_fill1=job.canvas_fill, dst_fill2=job.canvas_fill,
        )
        second["tab_min"], second["tab_w"], second["ksize"] = (
            tables.add(mid_h, job.out_h) if horizontal else tables.add(mid_w, job.out_w))
        for p, row, (h, w) in ((0, first, (mid_h, mid_w)), (1, second, (canvas_h, canvas_w))):
            rows[p].append([row[f] for f in _FIELDS])
            programs[p] += _blocks(h, w)
        inter += 3 * mid_h * mid_w

    def upload(a, dtype):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(device)

    return _Plan(
        desc=(upload(rows[0], np.int64), upload(rows[1], np.int64)),
        programs=(programs[0], programs[1]),
        tab_min=upload(np.concatenate(tables.mins), np.int32),
        tab_w=upload(np.concatenate(tables.weights), np.int32),
        intermediate=inter,
    )


def resize_into_tiles(src: torch.Tensor, jobs: list[Resize], tiles: torch.Tensor) -> torch.Tensor:
    """Run ``jobs`` reading the uint8 buffer ``src`` and writing uint8 ``tiles`` (n, 3, T, T): two launches."""
    if src.dtype != torch.uint8 or tiles.dtype != torch.uint8 or not (src.is_contiguous() and tiles.is_contiguous()):
        raise TypeError("src and tiles must be contiguous uint8 tensors")
    tile = tiles.shape[-1]
    if tiles.dim() != 4 or tiles.shape[1:] != (3, tile, tile):
        raise ValueError(f"tiles must have shape (n, 3, T, T), got {tuple(tiles.shape)}")
    for job in jobs:  # the kernel trusts the descriptors: out-of-range jobs would write past the buffers
        canvas_h, canvas_w = job.canvas or (job.out_h, job.out_w)
        if job.src_offset + 3 * job.src_h * job.src_w > src.numel():
            raise ValueError(f"{job} reads past the {src.numel()}-byte source")
        if job.first_tile + (canvas_h // tile) * (canvas_w // tile) > tiles.shape[0]:
            raise ValueError(f"{job} writes past the {tiles.shape[0]} tiles")
    plan = _plan(tuple(jobs), tile, str(tiles.device))
    mid = torch.empty(plan.intermediate, dtype=torch.uint8, device=tiles.device)  # planar per job
    for p, (a, b) in enumerate(((src, mid), (mid, tiles))):
        _pillow_pass_kernel[(plan.programs[p],)](
            a, b, plan.desc[p], plan.tab_min, plan.tab_w, len(jobs),
            NF=_NF, IDX=tl.int64 if _runtime.INTERPRET else tl.int32, BLOCK_Y=_BLOCK_Y, BLOCK_X=_BLOCK_X,
            num_warps=4,
        )
    return tiles
