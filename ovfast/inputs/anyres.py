"""AnyRes geometry and token counts, as pure functions of image sizes (docs/reference-behaviour.md sections 3, 6, 7).

The same functions drive the preprocessing (which canvas, which resize), the feature packing
(unpad, downscale) and the placeholder expansion (how many tokens), so the three can never
disagree. Float expressions keep transformers' exact operation order: the rounding edge cases of
docs/reference-behaviour.md section 12 depend on it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def select_best_resolution(height: int, width: int, pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The canvas (H, W) that keeps the most of the image, then wastes the least; ties keep the first."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for ch, cw in pinpoints:
        scale = min(cw / width, ch / height)
        dw, dh = int(width * scale), int(height * scale)
        effective = min(dw * dh, width * height)
        wasted = cw * ch - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ch, cw), effective, wasted
    assert best is not None, "pinpoints must not be empty"
    return best


def fit_in_canvas(height: int, width: int, canvas_h: int, canvas_w: int) -> tuple[int, int]:
    """The aspect-preserving (new_h, new_w) the image is resized to inside its canvas."""
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def centred_padding(inner: int, outer: int) -> tuple[int, int]:
    """(before, after) padding that centres ``inner`` in ``outer``; the odd pixel goes after."""
    before = (outer - inner) // 2
    return before, outer - inner - before


def unpad_crop(height: int, width: int, map_h: int, map_w: int, truncate: bool = False) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and columns [c0, c1) of the (map_h, map_w) feature map that hold the image.

    transformers rounds to 7 decimals before truncating; the original LLaVA-NeXT code truncates
    directly (``truncate``), which gives different token counts for some sizes (docs/reference-behaviour.md
    section 11, row 4).
    """
    def floor(x: float) -> int:
        return int(x) if truncate else int(round(x, 7))

    if width / height > map_w / map_h:
        new_h = floor(height * (map_w / width))
        pad = (map_h - new_h) // 2
        return pad, map_h - pad, 0, map_w
    new_w = floor(width * (map_h / height))
    pad = (map_w - new_w) // 2
    return 0, map_h, pad, map_w - pad


def downscaled_size(rows: int, cols: int, grid: int, max_num_patches: int) -> tuple[int, int] | None:
    """anyres_max_N: the bilinear target size when the unpadded map exceeds N tiles by over 10%, else None."""
    ratio = math.sqrt(rows * cols / (max_num_patches * grid**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return None


def anyres_layout(height: int, width: int, pinpoints, tile: int, grid: int, max_num_patches: int,
                  truncate: bool = False) -> dict:
    """Everything about one single-image (anyres) item: canvas, tile grid, kept map and token count."""
    canvas_h, canvas_w = select_best_resolution(height, width, pinpoints)
    grid_h, grid_w = canvas_h // tile, canvas_w // tile
    r0, r1, c0, c1 = unpad_crop(height, width, grid * grid_h, grid * grid_w, truncate)
    rows, cols = r1 - r0, c1 - c0
    target = downscaled_size(rows, cols, grid, max_num_patches)
    out_rows, out_cols = target if target else (rows, cols)
    return {
        "canvas": (canvas_h, canvas_w),
        "grid": (grid_h, grid_w),
        "crop": (r0, r1, c0, c1),
        "downscale": target,
        "num_tokens": grid * grid + out_rows * (out_cols + 1),
    }


def anyres_num_tokens(height: int, width: int, pinpoints, tile: int = 384, grid: int = 27, max_num_patches: int = 9,
                      truncate: bool = False) -> int:
    """Placeholder tokens of one image alone in its prompt: base tile, unpadded grid and one newline per row."""
    return anyres_layout(height, width, pinpoints, tile, grid, max_num_patches, truncate)["num_tokens"]


def image_layout(height: int, width: int, model, tile: int) -> dict:
    """``anyres_layout`` of an image for a model (a ``ModelConfig``): its pinpoints, grid, anyres_max_N
    and unpad rounding (truncation under the original semantics)."""
    return anyres_layout(height, width, model.grid_pinpoints, tile, model.vision.grid, model.max_num_patches,
                         truncate=model.semantics == "original")


def multi_image_num_tokens(grid: int = 27) -> int:
    """Placeholder tokens of each image of a several-image prompt: one tile plus one newline."""
    return grid * grid + 1


def pooled_grid(grid: int = 27) -> int:
    """Side of a video frame's feature map after the 2x2 bilinear pooling: ceil(27 / 2) = 14."""
    return math.ceil(grid / 2)


def video_num_tokens(num_frames: int, grid: int = 27) -> int:
    """Placeholder tokens of a video: 196 per frame and one newline for the whole video."""
    return num_frames * pooled_grid(grid) ** 2 + 1
