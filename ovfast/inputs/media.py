"""Request media: turning what users pass into pixels, and the ``Video`` item.

Accepted images: a PIL image, a file path, encoded bytes (or a ``data:`` URI), a uint8 NumPy
array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), or a uint8 torch tensor in the same layouts or
channels-first (C, H, W). Colour handling follows transformers 5.x: any alpha channel is
composited onto white, grey is repeated to three channels.

``decode`` stops before the colour conversion (``Pixels``), so the native path (ovfast._C) can
do it in C++; ``composite`` is its pure-Python twin and ``to_rgb`` the two together. Encoded
images above ``max_image_pixels()`` (Pillow's own limit by default) are refused before decoding.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import PIL.Image
import torch

from ..errors import EmptyVideoError, ImageReadError, ImageTooLargeError, UnsupportedInputError, VideoReadError
from . import media_ref
from .video_file import VideoFile

ImageLike = Union[PIL.Image.Image, str, os.PathLike, bytes, np.ndarray, torch.Tensor]

_max_image_pixels = PIL.Image.MAX_IMAGE_PIXELS or 0  # 0: no limit


def max_image_pixels() -> int:
    """Encoded images (and video frames) with more pixels than this are refused (0: no limit)."""
    return _max_image_pixels


def set_max_image_pixels(limit: int | None) -> None:
    """Change the pixel limit; None or 0 removes ovfast's own (Pillow's decompression-bomb guard,
    ``PIL.Image.MAX_IMAGE_PIXELS``, still applies to encoded images)."""
    global _max_image_pixels
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"the pixel limit must be a non-negative integer or None, got {limit!r}")
    _max_image_pixels = limit or 0


@dataclass(frozen=True)
class Pixels:
    """A decoded image before colour conversion: (H, W, C) uint8, C = 1 (grey), 3 (RGB) or 4 (RGBA).

    ``alpha`` says how an alpha channel goes onto white, as transformers does it for the input's
    kind: "pil" (PIL images: ``PIL.Image.alpha_composite``) or "numpy" (arrays: float64, rounded).
    """

    array: np.ndarray
    alpha: str = "pil"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def without_alpha(self) -> "Pixels":
        """The colour channels alone: PIL's ``.convert("RGB")`` of an RGBA image, as the original
        LLaVA-NeXT code loads images (transformers composites onto white instead)."""
        if self.array.shape[-1] != 4:
            return self
        return Pixels(np.ascontiguousarray(self.array[..., :3]), self.alpha)


class Video:
    """A video item: decoded frames, or a video file (path or bytes) sampled and decoded with PyAV.

    * ``Video(frames)``: a sequence of images (anything ``ovfast`` accepts as an image) or a uint8
      array / tensor of shape (T, H, W, 3); frames are converted when a request is prepared, so a
      bad frame raises there with its index.
    * ``Video(path_or_bytes_or_data_uri, num_frames=32)``: ``num_frames`` frames at ``linspace(0, N - 1, k)``
      (as integers: the original LLaVA-OneVision sampling; all N frames when N <= k), or one
      frame every ``1 / fps`` seconds with ``fps=``, or the frames ``indices=[...]``. The file is
      opened and indexed here (bad files raise ``VideoReadError`` at once, and ``num_frames`` is
      known before any pixel is decoded); the frames are decoded when a request is prepared. A
      damaged stream gives the frames that decode: ``num_frames`` then drops to their count.

    Each frame becomes 196 tokens (27x27 features pooled to 14x14) and the whole video one
    newline token more.
    """

    def __init__(self, frames: Sequence[ImageLike] | np.ndarray | torch.Tensor | str | os.PathLike | bytes,
                 num_frames: int | None = None, *, fps: float | None = None, indices: Sequence[int] | None = None):
        self._file: VideoFile | None = None
        if isinstance(frames, str):
            frames = local_source(frames, VideoReadError, "video")
        if isinstance(frames, (str, os.PathLike, bytes, bytearray, memoryview)):
            self._file = VideoFile(frames, max_image_pixels() or float("inf"))
            self._indices = self._file.sample(num_frames, fps, indices)
            return
        if (num_frames, fps, indices) != (None, None, None):
            raise UnsupportedInputError("num_frames, fps and indices sample a video file; pass only the frames you want")
        if isinstance(frames, (np.ndarray, torch.Tensor)):
            if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
                raise UnsupportedInputError(
                    f"a video array must have shape (T, H, W, 3), got {tuple(frames.shape)}"
                )
            self._frames: Sequence[Any] = frames
        elif isinstance(frames, Sequence):
            self._frames = list(frames)
        else:
            raise UnsupportedInputError(
                f"ovfast.Video takes a video file, its bytes, a list of frames or a (T, H, W, 3) uint8 array, "
                f"not {type(frames).__name__}"
            )
        if len(self._frames) == 0:
            raise EmptyVideoError("the video has no frames")

    @property
    def num_frames(self) -> int:
        return len(self._indices) if self._file is not None else len(self._frames)

    @property
    def frame_indices(self) -> list[int] | None:
        """For a video file: the indices of the frames used (after decoding, those that decoded)."""
        return list(self._indices) if self._file is not None else None

    def pixel_frames(self) -> list[Pixels]:
        """The frames, decoded, before colour conversion."""
        if self._file is not None:
            return [Pixels(f) for f in self._decode_file()]
        out = []
        for i, frame in enumerate(self._frames):
            try:
                out.append(decode(frame))
            except ImageReadError as e:
                raise type(e)(f"video frame {i}: {e}") from e.__cause__
            except UnsupportedInputError as e:
                raise type(e)(f"video frame {i}: {e}") from None
        return out

    def rgb_frames(self) -> list[np.ndarray]:
        """The frames as (H, W, 3) uint8 arrays."""
        return [composite(p) for p in self.pixel_frames()]

    def _decode_file(self) -> list[np.ndarray]:
        got = self._file.decode(self._indices)
        if not got:
            raise VideoReadError(f"none of the {len(self._indices)} sampled frames of {self._file.name} could be decoded")
        self._indices = [i for i in self._indices if i in got]
        return [got[i] for i in self._indices]

    def __repr__(self) -> str:
        if self._file is not None:
            return f"Video({self._file.name}, num_frames={self.num_frames} of {self._file.frame_count})"
        return f"Video(num_frames={self.num_frames})"


def as_items(images) -> list:
    """``images`` as a list of items: None or [] -> [], one image or Video -> [it], a list -> itself."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (Video, PIL.Image.Image, str, os.PathLike, bytes, np.ndarray, torch.Tensor)):
        return [images]
    raise UnsupportedInputError(
        f"images must be an image, an ovfast.Video or a list of them, not {type(images).__name__}"
    )


def to_rgb(image: ImageLike) -> np.ndarray:
    """Decode / convert one image to an (H, W, 3) uint8 array."""
    return composite(decode(image))


def decode(image: ImageLike) -> Pixels:
    """Decode one image to its pixels, leaving grey and alpha for ``composite`` (or ovfast._C.to_rgb)."""
    if isinstance(image, PIL.Image.Image):
        pixels = _pil_pixels(image, "the PIL image")
    elif isinstance(image, (str, os.PathLike)):
        pixels = _open_encoded(image)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        pixels = _open_encoded(bytes(image))
    elif isinstance(image, torch.Tensor):
        pixels = _array_pixels(_tensor_to_hwc(image))
    elif isinstance(image, np.ndarray):
        pixels = _array_pixels(image)
    else:
        raise UnsupportedInputError(
            f"unsupported image type {type(image).__name__}: pass a PIL image, a file path, encoded bytes, "
            "a uint8 NumPy array (H, W, 3) or a uint8 torch tensor"
        )
    h, w = pixels.shape[:2]
    if h == 0 or w == 0:
        raise ImageReadError(f"the image has zero size ({h}x{w})")
    return pixels


def composite(pixels: Pixels) -> np.ndarray:
    """(H, W, 3) uint8: grey repeated, alpha composited onto white (the twin of ovfast._C.to_rgb)."""
    a = pixels.array
    if a.shape[-1] == 1:
        return np.ascontiguousarray(np.repeat(a, 3, axis=-1))
    if a.shape[-1] == 3:
        return np.ascontiguousarray(a)
    if pixels.alpha == "pil":
        white = PIL.Image.new("RGBA", (a.shape[1], a.shape[0]), (255, 255, 255, 255))
        return np.asarray(PIL.Image.alpha_composite(white, PIL.Image.fromarray(a, "RGBA")).convert("RGB"))
    # transformers' NumPy path: blend onto white in float64, then round.
    alpha = a[..., 3:4] / 255
    return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)


def local_source(ref: str, error: type[Exception] = ImageReadError, what: str = "image") -> str | bytes:
    """What a string from the Python API names: a ``data:`` URI's bytes, or a local path (a plain
    path or a ``file://`` URL). Remote URLs are not fetched here (the server fetches under its policy)."""
    parsed = media_ref.parse(ref)
    try:
        if parsed.kind == "data":
            return media_ref.data_bytes(ref)
        if parsed.kind == "file":
            return media_ref.file_path(ref)
    except media_ref.BadReference as e:
        raise error(str(e)) from None
    if parsed.kind == "http":
        raise UnsupportedInputError(f"{what} URLs are not fetched ({parsed.short}); download the {what} and pass "
                                    "the file or its bytes")
    if "\x00" in ref:
        raise error(f"the {what} path holds a NUL byte")
    return ref


def _open_encoded(source: str | os.PathLike | bytes) -> Pixels:
    if isinstance(source, str):
        source = local_source(source)
    what = "the encoded image" if isinstance(source, bytes) else f"image file {os.fspath(source)!r}"
    try:
        data = source if isinstance(source, bytes) else media_ref.open_regular_file(source)
        with warnings.catch_warnings():
            # Pillow warns above its own limit; ovfast's limit (Pillow's by default) raises just below.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            im = PIL.Image.open(io.BytesIO(data))
        with im:
            if _max_image_pixels and im.width * im.height > _max_image_pixels:
                raise ImageTooLargeError(
                    f"{what} is {im.width}x{im.height}, above the limit of {_max_image_pixels} pixels "
                    "(ovfast.set_max_image_pixels changes it)"
                )
            return _pil_pixels(im, what)
    except FileNotFoundError as e:
        raise ImageReadError(f"{what} does not exist") from e
    except IsADirectoryError as e:
        raise ImageReadError(f"{what} is a directory") from e
    except media_ref.BadReference as e:
        raise ImageReadError(f"{what} cannot be read: {e}") from None
    except PIL.UnidentifiedImageError as e:
        raise ImageReadError(f"{what} is not an image PIL can read") from e
    except PIL.Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{what} is too large to decode safely: {e}") from e
    except OSError as e:
        raise ImageReadError(f"{what} could not be read: {e.strerror or e}") from e


def _pil_pixels(im: PIL.Image.Image, what: str) -> Pixels:
    try:
        im.load()  # decode now: truncated or corrupt files fail here, not halfway through a request
        if "A" in im.getbands() or im.info.get("transparency") is not None:
            return Pixels(np.asarray(im if im.mode == "RGBA" else im.convert("RGBA")), "pil")
        if im.mode == "L":
            return Pixels(np.asarray(im)[:, :, None])
        return Pixels(np.asarray(im if im.mode == "RGB" else im.convert("RGB")))
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{what} is corrupt or truncated: {e}") from e


def _tensor_to_hwc(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)  # torchvision's (C, H, W)
    return t.contiguous().numpy()


def _array_pixels(a: np.ndarray) -> Pixels:
    if a.dtype != np.uint8:
        raise UnsupportedInputError(
            f"image arrays must be uint8 (0-255), got dtype {a.dtype}; convert with (x * 255).round().astype(np.uint8)"
        )
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise UnsupportedInputError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {a.shape}")
    return Pixels(np.ascontiguousarray(a), "numpy")
