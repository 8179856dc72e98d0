"""One request item from what the user passed to its tiles, geometry and token count.

``open_item`` is what the request builder calls once per image or video: it decodes an image
(a video's frames decode when tiled), picks the item's kind from the request (a lone image is
anyres, one of several a padded square, a video one squashed tile per frame) and counts its
placeholder tokens from the AnyRes geometry. ``OpenedItem.tile`` then cuts the tiles: natively
(csrc/, through ``native``) by default, in Python (``processing``) as the fallback and test
oracle, both giving the same uint8 tiles; or leaves the RGB pixels for the device kernels
(``device_tiles``). Counting comes first so an over-long request is refused before any resizing.
"""
from __future__ import annotations

from dataclasses import dataclass

import PIL.Image

from ..checkpoint.config import ModelConfig
from . import anyres, native
from .media import Pixels, Video, composite, decode
from .processing import ProcessingConfig, VisualItem, anyres_tiles, padded_square_tile, video_tiles


@dataclass
class OpenedItem:
    """An item decoded and counted, not yet tiled."""

    kind: str  # "image" (alone: anyres), "image_multi" (one of several: padded square), "video"
    source: Pixels | Video
    num_tokens: int
    layout: dict | None  # anyres geometry of an "image" (``anyres.anyres_layout``), else None
    model: ModelConfig
    proc: ProcessingConfig

    def tile(self, on_device: bool = False) -> VisualItem:
        """The tiles; with ``on_device`` (and Pillow's BICUBIC, the kernels' only filter) the RGB
        pixels for ``device_tiles`` instead, counted but not tiled."""
        if on_device and self.proc.resample == PIL.Image.Resampling.BICUBIC:
            return self._untiled()
        fast = self.proc.resample == PIL.Image.Resampling.BICUBIC and native.enabled()  # csrc/ has BICUBIC only
        model, proc = self.model, self.proc
        if self.kind == "video":
            frames = self._frames()
            if fast:
                return native.video_tiles(frames, model, proc)
            return video_tiles([composite(f) for f in frames], model, proc)
        if self.kind == "image_multi":
            return native.padded_square_tile(self.source, model, proc) if fast else padded_square_tile(
                composite(self.source), model, proc)
        return native.anyres_tiles(self.source, model, proc) if fast else anyres_tiles(composite(self.source), model, proc)

    def _frames(self) -> list[Pixels]:
        return [_colour(f, self.model) for f in self.source.pixel_frames()]

    def _untiled(self) -> VisualItem:
        rgb = native.to_rgb if native.enabled() else composite
        if self.kind == "video":
            return VisualItem("video", None, self.num_tokens, rgb=[rgb(f) for f in self._frames()])
        image = rgb(self.source)
        if self.kind == "image_multi":
            return VisualItem("image_multi", None, self.num_tokens, rgb=[image])
        return VisualItem("image", None, self.num_tokens, image.shape[:2], rgb=[image], layout=self.layout)


def open_item(item, n_images: int, model: ModelConfig, proc: ProcessingConfig) -> OpenedItem:
    """Decode and count one item of a request that holds ``n_images`` images (videos aside)."""
    g = model.vision.grid
    if isinstance(item, Video):
        return OpenedItem("video", item, anyres.video_num_tokens(item.num_frames, g), None, model, proc)
    pixels = _colour(decode(item), model)
    if n_images > 1:
        return OpenedItem("image_multi", pixels, anyres.multi_image_num_tokens(g), None, model, proc)
    h, w = pixels.shape[:2]
    layout = anyres.image_layout(h, w, model, proc.tile)
    return OpenedItem("image", pixels, layout["num_tokens"], layout, model, proc)


def _colour(pixels: Pixels, model: ModelConfig) -> Pixels:
    """Alpha as the semantics has it: dropped (original) or composited onto white later (transformers)."""
    return pixels.without_alpha() if model.semantics == "original" else pixels
