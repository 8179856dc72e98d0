"""From (images, prompt, parameters) to a validated, tokenised request: everything host-side.

Every check that can reject a request runs here, before the request touches the model or the
KV cache, so a rejected request leaves the engine exactly as it was.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2

from ..checkpoint.config import ModelConfig
from ..checkpoint.tokenizer import ChatTemplate, Tokenizer
from ..errors import (
    ContextLengthError,
    GenerationParamsError,
    PlaceholderError,
    TooManyImagesError,
    UnsupportedInputError,
)
from ..inputs.items import open_item
from ..inputs.media import Video, as_items
from ..inputs.processing import ProcessingConfig, VisualItem

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens

    @classmethod
    def make(cls, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=None,
             ignore_eos=False) -> "SamplingParams":
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationParamsError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise GenerationParamsError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise GenerationParamsError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise GenerationParamsError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise GenerationParamsError(f"seed must be an integer or None, got {seed!r}")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
            stop = tuple(stop)
        else:
            raise GenerationParamsError(f"stop must be a string or a list of strings, got {stop!r}")
        if any(s == "" for s in stop):
            raise GenerationParamsError("stop strings must not be empty")
        return cls(max_new_tokens, float(temperature), float(top_p), top_k, seed, stop, bool(ignore_eos))


@dataclass
class PreparedRequest:
    items: list[VisualItem]
    input_ids: list[int]  # placeholders already expanded to one id per feature row
    params: SamplingParams
    preprocess_ms: float


@dataclass(frozen=True)
class Limits:
    max_seq_len: int
    max_images: int
    max_video_frames: int


class RequestBuilder:
    def __init__(self, model: ModelConfig, proc: ProcessingConfig, tokenizer: Tokenizer,
                 template: ChatTemplate | None, limits: Limits):
        self.model, self.proc, self.tokenizer, self.template, self.limits = model, proc, tokenizer, template, limits

    def prepare(self, images, prompt: str, chat: bool, params: SamplingParams,
                device_tiling: bool = False) -> PreparedRequest:
        """Validate, decode, count and tile; with ``device_tiling`` the items keep their RGB pixels
        for the GPU kernels to tile (``ovfast.inputs.device_tiles``) instead of being tiled here."""
        t0 = time.perf_counter()
        if not isinstance(prompt, str):
            raise UnsupportedInputError(f"prompt must be a string, not {type(prompt).__name__}")
        items = as_items(images)
        n_images = sum(not isinstance(x, Video) for x in items)
        videos = [x for x in items if isinstance(x, Video)]
        n_frames = sum(v.num_frames for v in videos)
        if n_images > self.limits.max_images:
            raise TooManyImagesError(f"{n_images} images in one request; this engine allows at most {self.limits.max_images}")
        if n_frames > self.limits.max_video_frames:
            raise TooManyImagesError(
                f"{n_frames} video frames in one request; this engine allows at most {self.limits.max_video_frames}"
            )
        ids = self._prompt_ids(prompt, chat, n_images, len(videos))
        opened = [open_item(x, n_images, self.model, self.proc) for x in items]
        # Reject over-long requests before the costly resizing.
        prompt_tokens = len(ids) - n_images - len(videos) + sum(o.num_tokens for o in opened)
        if prompt_tokens + params.max_new_tokens > self.limits.max_seq_len:
            raise ContextLengthError(
                f"the prompt is {prompt_tokens} tokens (media included) and max_new_tokens is {params.max_new_tokens}: "
                f"{prompt_tokens + params.max_new_tokens} > this engine's context of {self.limits.max_seq_len}"
            )
        visual = [o.tile(on_device=device_tiling) for o in opened]
        ids = self._expand(ids, visual)
        return PreparedRequest(visual, ids, params, (time.perf_counter() - t0) * 1e3)

    def _prompt_ids(self, prompt: str, chat: bool, n_images: int, n_videos: int) -> list[int]:
        if chat:
            if IMAGE_TOKEN in prompt or VIDEO_TOKEN in prompt:
                raise PlaceholderError(
                    "the prompt contains <image>/<video>: with chat=True the chat template places the media; "
                    "remove them, or pass chat=False and a fully formatted prompt"
                )
            if self.template is None:
                raise PlaceholderError("this checkpoint has no chat template; pass chat=False with a formatted prompt")
            content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": prompt}]
            try:
                text = self.template.render(
                    [{"role": "user", "content": content}], add_generation_prompt=True,
                    tools=None, documents=None, **self.tokenizer.special_tokens_map,
                )
            except jinja2.TemplateError as e:
                raise PlaceholderError(f"the checkpoint's chat template rejected the request: {e}") from e
        else:
            text = prompt
        ids = self.tokenizer.encode(text)
        found_images, found_videos = ids.count(self.model.image_token_id), ids.count(self.model.video_token_id)
        if (found_images, found_videos) != (n_images, n_videos):
            raise PlaceholderError(
                f"the prompt has {found_images} <image> and {found_videos} <video> placeholders but "
                f"{n_images} images and {n_videos} videos were passed; with chat=False put one placeholder per item"
            )
        return ids

    def _expand(self, ids: list[int], visual: list[VisualItem]) -> list[int]:
        """Replace the k-th <image> (<video>) id with as many ids as the k-th image (video) has tokens."""
        image_id, video_id = self.model.image_token_id, self.model.video_token_id
        images = iter([v for v in visual if v.kind != "video"])
        videos = iter([v for v in visual if v.kind == "video"])
        out: list[int] = []
        for t in ids:
            if t == image_id:
                out.extend([image_id] * next(images).num_tokens)
            elif t == video_id:
                out.extend([video_id] * next(videos).num_tokens)
            else:
                out.append(t)
        return out
