"""Request media: turning what users pass into RGB uint8 arrays, and the ``Video`` item.

Accepted images: a PIL image, a file path, encoded bytes (or a ``data:`` URI), a uint8 NumPy
array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), or a uint8 torch tensor in the same layouts or
channels-first (C, H, W). Colour handling follows transformers 5.x: any alpha channel is
composited onto white, grey is repeated to three channels.
"""
from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import PIL.Image
import torch

from .errors import EmptyVideoError, ImageReadError, UnsupportedInputError

ImageLike = Union[PIL.Image.Image, str, os.PathLike, bytes, np.ndarray, torch.Tensor]


class Video:
    """A video item: its frames, in order.

    ``frames`` is a sequence of images (anything ``ovfast`` accepts as an image) or a uint8
    array / tensor of shape (T, H, W, 3). Each frame becomes 196 tokens (27x27 features pooled to
    14x14) and the whole video one newline token more. Frames are decoded lazily, when a request
    is prepared, so a bad frame raises there with its index.
    """

    def __init__(self, frames: Sequence[ImageLike] | np.ndarray | torch.Tensor):
        if isinstance(frames, (str, os.PathLike, bytes)):
            raise UnsupportedInputError(
                "ovfast.Video takes decoded frames (a list of images or a (T, H, W, 3) uint8 array); "
                "decoding video files is not supported yet: sample the frames yourself and pass them"
            )
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
                f"ovfast.Video takes a list of frames or a (T, H, W, 3) uint8 array, not {type(frames).__name__}"
            )
        if len(self._frames) == 0:
            raise EmptyVideoError("the video has no frames")

    @property
    def num_frames(self) -> int:
        return len(self._frames)

    def rgb_frames(self) -> list[np.ndarray]:
        """The frames as (H, W, 3) uint8 arrays."""
        out = []
        for i, frame in enumerate(self._frames):
            try:
                out.append(to_rgb(frame))
            except ImageReadError as e:
                raise type(e)(f"video frame {i}: {e}") from e.__cause__
            except UnsupportedInputError as e:
                raise type(e)(f"video frame {i}: {e}") from None
        return out

    def __repr__(self) -> str:
        return f"Video(num_frames={self.num_frames})"


def to_rgb(image: ImageLike) -> np.ndarray:
    """Decode / convert one image to an (H, W, 3) uint8 array."""
    if isinstance(image, PIL.Image.Image):
        rgb = _pil_to_rgb(image, "the PIL image")
    elif isinstance(image, (str, os.PathLike)):
        rgb = _open_encoded(image)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        rgb = _open_encoded(bytes(image))
    elif isinstance(image, torch.Tensor):
        rgb = _array_to_rgb(_tensor_to_hwc(image))
    elif isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image)
    else:
        raise UnsupportedInputError(
            f"unsupported image type {type(image).__name__}: pass a PIL image, a file path, encoded bytes, "
            "a uint8 NumPy array (H, W, 3) or a uint8 torch tensor"
        )
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageReadError(f"the image has zero size ({rgb.shape[0]}x{rgb.shape[1]})")
    return rgb


def _open_encoded(source: str | os.PathLike | bytes) -> np.ndarray:
    if isinstance(source, str) and source.startswith("data:"):
        try:
            source = base64.b64decode(source.split(",", 1)[1], validate=True)
        except (IndexError, ValueError) as e:
            raise ImageReadError("the data: URI does not hold base64 image data") from e
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise UnsupportedInputError(f"image URLs are not fetched ({source}); download the image and pass the file or bytes")
    what = "the image bytes" if isinstance(source, bytes) else f"image file {os.fspath(source)!r}"
    try:
        with PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return _pil_to_rgb(im, what)
    except FileNotFoundError as e:
        raise ImageReadError(f"{what} does not exist") from e
    except IsADirectoryError as e:
        raise ImageReadError(f"{what} is a directory") from e
    except PIL.UnidentifiedImageError as e:
        raise ImageReadError(f"{what} is not an image PIL can read") from e
    except PIL.Image.DecompressionBombError as e:
        raise ImageReadError(f"{what} is too large to decode safely: {e}") from e
    except OSError as e:
        raise ImageReadError(f"{what} could not be read: {e}") from e


def _pil_to_rgb(im: PIL.Image.Image, what: str) -> np.ndarray:
    try:
        im.load()  # decode now: truncated or corrupt files fail here, not halfway through a request
        if "A" in im.getbands() or im.info.get("transparency") is not None:
            rgba = im.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = PIL.Image.alpha_composite(white, rgba)
        return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{what} is corrupt or truncated: {e}") from e


def _tensor_to_hwc(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)  # torchvision's (C, H, W)
    return t.contiguous().numpy()


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        raise UnsupportedInputError(
            f"image arrays must be uint8 (0-255), got dtype {a.dtype}; convert with (x * 255).round().astype(np.uint8)"
        )
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise UnsupportedInputError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {a.shape}")
    if a.shape[-1] == 1:
        return np.ascontiguousarray(np.repeat(a, 3, axis=-1))
    if a.shape[-1] == 4:
        # transformers' NumPy path: blend onto white in float64, then round.
        alpha = a[..., 3:4] / 255
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(a)
