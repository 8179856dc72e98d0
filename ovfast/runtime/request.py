"""From (images, prompt, parameters) to a validated, tokenised request: everything host-side.

Every check that can reject a request runs here, before the request touches the model or the
KV cache, so a rejected request leaves the engine exactly as it was.
"""
from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import jinja2
import numpy as np

from ..checkpoint.config import ModelConfig
from ..checkpoint.prompts import IMAGE_MARKER, VIDEO_MARKER, render_qwen_1_5
from ..checkpoint.tokenizer import ChatTemplate, Tokenizer
from ..errors import (
    ContextLengthError,
    GenerationParamsError,
    PlaceholderError,
    PromptError,
    StructuredOutputsUnavailableError,
    TooManyImagesError,
    UnsupportedInputError,
)
from ..inputs.items import open_item
from ..inputs.media import Video, as_items
from ..inputs.processing import ProcessingConfig, VisualItem
from . import constraints
from .constraints import CompiledConstraint, Constraint, Grammars
from .sampling import MAX_LOGPROBS

_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


def _number(name: str, x, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not lo <= x <= hi \
            or (lo_open and x == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise GenerationParamsError(f"{name} must be a number in {bound}, got {x!r}")
    return float(x)


SEED_MIN, SEED_END = -(1 << 63), 1 << 64  # signed or unsigned 64-bit: the seed is keyed as its 64 bits
TOP_K_MAX = 1 << 31


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int | None = 256  # None: up to the end of the context (set once the prompt is counted)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers' (prompt and output tokens); 1 = off
    presence_penalty: float = 0.0  # OpenAI's (output tokens); 0 = off
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; n: the chosen token's log-probability and the n most likely
    constraint: Constraint | None = None  # structured outputs: what the answer must match (``constraints``)

    NAMES = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "min_p",
             "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs",
             "response_format", "regex", "choice", "grammar")

    @classmethod
    def make(cls, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=None,
             ignore_eos=False, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
             logprobs=None, response_format=None, regex=None, choice=None, grammar=None) -> "SamplingParams":
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 1):
            raise GenerationParamsError(f"max_new_tokens must be a positive integer or None, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise GenerationParamsError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise GenerationParamsError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise GenerationParamsError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed < SEED_END):
            raise GenerationParamsError(f"seed must be None or a 64-bit integer in [-2**63, 2**64), got {seed!r}")
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
        min_p = _number("min_p", min_p, 0.0, 1.0)
        repetition_penalty = _number("repetition_penalty", repetition_penalty, 0.0, 100.0, lo_open=True)
        presence_penalty = _number("presence_penalty", presence_penalty, -2.0, 2.0)
        frequency_penalty = _number("frequency_penalty", frequency_penalty, -2.0, 2.0)
        if logprobs is False:
            logprobs = None
        elif logprobs is True:
            logprobs = 0
        elif logprobs is not None and (not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS):
            raise GenerationParamsError(f"logprobs must be None, a bool or an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}")
        top_k = min(top_k, TOP_K_MAX)  # more than the vocabulary is all of it; keeps int64 device tensors whole
        constraint = constraints.parse(response_format, regex, choice, grammar)
        return cls(max_new_tokens, float(temperature), float(top_p), top_k, seed, stop, bool(ignore_eos), min_p,
                   repetition_penalty, presence_penalty, frequency_penalty, logprobs, constraint)

    @property
    def penalised(self) -> bool:
        return (self.repetition_penalty, self.presence_penalty, self.frequency_penalty) != (1.0, 0.0, 0.0)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalties and no log-probabilities: the decode step's fast variant (a
        constraint only adds its mask)."""
        return self.temperature == 0 and not self.penalised and self.logprobs is None


@dataclass
class PreparedRequest:
    items: list[VisualItem]
    input_ids: list[int]  # placeholders already expanded to one id per feature row
    params: SamplingParams
    preprocess_ms: float
    spans: list[tuple[int, int]] = field(default_factory=list)  # each item's (start, stop) prompt positions
    grammar: CompiledConstraint | None = None  # params.constraint, compiled


@dataclass(frozen=True)
class Limits:
    max_seq_len: int
    max_images: int
    max_video_frames: int


class RequestBuilder:
    def __init__(self, model: ModelConfig, proc: ProcessingConfig, tokenizer: Tokenizer,
                 template: ChatTemplate | None, limits: Limits, grammars: Grammars | None = None):
        self.model, self.proc, self.tokenizer, self.template, self.limits = model, proc, tokenizer, template, limits
        self.grammars = grammars
        self.original = model.semantics == "original"  # prompts in LLaVA-NeXT's qwen_1_5 format

    def prepare(self, images, prompt: str, chat: bool, params: SamplingParams,
                device_tiling: bool = False) -> PreparedRequest:
        """Validate, decode, count and tile; with ``device_tiling`` the items keep their RGB pixels
        for the GPU kernels to tile (``ovfast.inputs.device_tiles``) instead of being tiled here."""
        t0 = time.perf_counter()
        if not isinstance(prompt, str):
            raise UnsupportedInputError(f"prompt must be a string, not {type(prompt).__name__}")
        items = as_items(images)
        self._check_counts(items)
        if chat:
            placed = IMAGE_MARKER in prompt or VIDEO_MARKER in prompt
            content = [{"type": "video" if isinstance(x, Video) else "image"} for x in items]
            if self.original:  # LLaVA-NeXT: the caller's markers stay; without any, one per item before the text
                content = [] if placed else content
            elif placed:
                raise PlaceholderError(
                    "the prompt contains <image>/<video>: with chat=True the chat template places the media; "
                    "remove them, or pass chat=False and a fully formatted prompt"
                )
            else:
                content.sort(key=lambda part: part["type"] == "video")  # images first, then videos, then the text
            text = self._render([{"role": "user", "content": content + [{"type": "text", "text": prompt}]}])
        else:
            text = prompt
        return self._build(items, text, params, device_tiling, t0)

    def prepare_messages(self, messages, params: SamplingParams, device_tiling: bool = False) -> PreparedRequest:
        """OpenAI-style chat ``messages`` (see ``chat_messages``), rendered with the chat template."""
        t0 = time.perf_counter()
        conversation, items = chat_messages(messages)
        self._check_counts(items)
        return self._build(items, self._render(conversation), params, device_tiling, t0)

    def _check_counts(self, items: list) -> None:
        n_images = sum(not isinstance(x, Video) for x in items)
        n_frames = sum(x.num_frames for x in items if isinstance(x, Video))
        if n_images > self.limits.max_images:
            raise TooManyImagesError(f"{n_images} images in one request; this engine allows at most {self.limits.max_images}")
        if n_frames > self.limits.max_video_frames:
            raise TooManyImagesError(
                f"{n_frames} video frames in one request; this engine allows at most {self.limits.max_video_frames}"
            )

    def _render(self, conversation: list[dict]) -> str:
        if self.original:
            return render_qwen_1_5(conversation)
        if self.template is None:
            raise PlaceholderError("this checkpoint has no chat template; pass chat=False with a formatted prompt")
        try:
            return self.template.render(conversation, add_generation_prompt=True, tools=None, documents=None,
                                        **self.tokenizer.special_tokens_map)
        except jinja2.TemplateError as e:
            raise PlaceholderError(f"the checkpoint's chat template rejected the request: {e}") from e

    def _build(self, items: list, text: str, params: SamplingParams, device_tiling: bool, t0: float) -> PreparedRequest:
        """Tokenise, check placeholders against items, count (rejecting over-long requests before
        any resizing), tile, expand the placeholders; compile the constraint."""
        grammar = self._compile(params.constraint)
        n_images = sum(not isinstance(x, Video) for x in items)
        n_videos = len(items) - n_images
        _check_text(text)
        ids = self._tokenize(text, items)
        if not ids:  # nothing to prefill: the first step would read whatever the slot held before
            raise PromptError("the prompt is empty: it has no tokens to generate from")
        opened = [open_item(x, n_images, self.model, self.proc) for x in items]
        prompt_tokens = len(ids) - n_images - n_videos + sum(o.num_tokens for o in opened)
        if params.max_new_tokens is None:  # the rest of the context
            params = replace(params, max_new_tokens=max(self.limits.max_seq_len - prompt_tokens, 1))
        if prompt_tokens + params.max_new_tokens > self.limits.max_seq_len:
            raise ContextLengthError(
                f"the prompt is {prompt_tokens} tokens (media included) and max_new_tokens is {params.max_new_tokens}: "
                f"{prompt_tokens + params.max_new_tokens} > this engine's context of {self.limits.max_seq_len}"
            )
        visual = [with_key(o.tile(on_device=device_tiling), self.proc, self.model) for o in opened]
        ids, spans = self._expand(ids, visual)
        return PreparedRequest(visual, ids, params, (time.perf_counter() - t0) * 1e3, spans, grammar)

    def _compile(self, constraint: Constraint | None) -> CompiledConstraint | None:
        if constraint is None:
            return None
        if self.grammars is None:
            raise StructuredOutputsUnavailableError("this engine was built without structured outputs")
        return self.grammars.compile(constraint)

    def _tokenize(self, text: str, items: list) -> list[int]:
        """Token ids of ``text`` with one placeholder id per ``<image>`` / ``<video>`` marker.

        The text between markers is tokenised piece by piece, as LLaVA-NeXT's
        ``tokenizer_image_token`` does and as a tokenizer that knows the markers as added tokens
        splits on them anyway, so a vocabulary without them (lmms-lab) works too. Under the
        transformers semantics the k-th ``<image>`` is the k-th image and the k-th ``<video>``
        the k-th video; under the original one marker stands for the next item, whatever its kind.
        """
        pieces = _MARKERS.split(text)
        markers = pieces[1::2]
        kinds = ["video" if isinstance(x, Video) else "image" for x in items]
        if self.original:
            if len(markers) != len(items):
                raise PlaceholderError(
                    f"the prompt has {len(markers)} <image>/<video> markers but {len(items)} images and videos "
                    "were passed; put one marker per item, or none (chat=True places them before the text)"
                )
        else:
            kinds_found = ["video" if m == VIDEO_MARKER else "image" for m in markers]
            found = (kinds_found.count("image"), kinds_found.count("video"))
            if found != (kinds.count("image"), kinds.count("video")):
                raise PlaceholderError(
                    f"the prompt has {found[0]} <image> and {found[1]} <video> placeholders but "
                    f"{kinds.count('image')} images and {kinds.count('video')} videos were passed; "
                    "with chat=False put one placeholder per item"
                )
            kinds = kinds_found
        placeholder = {"image": self.model.image_token_id, "video": self.model.video_token_id}
        ids: list[int] = []
        for i, piece in enumerate(pieces[::2]):
            if piece:
                ids.extend(self.tokenizer.encode(piece))
            if i < len(kinds):
                ids.append(placeholder[kinds[i]])
        return ids

    def _expand(self, ids: list[int], visual: list[VisualItem]) -> tuple[list[int], list[tuple[int, int]]]:
        """Replace the k-th <image> (<video>) id with as many ids as the k-th image (video) has
        tokens; also each item's (start, stop) positions, in item order."""
        image_id, video_id = self.model.image_token_id, self.model.video_token_id
        images = iter([i for i, v in enumerate(visual) if v.kind != "video"])
        videos = iter([i for i, v in enumerate(visual) if v.kind == "video"])
        out: list[int] = []
        spans: list[tuple[int, int]] = [(0, 0)] * len(visual)
        for t in ids:
            if t == image_id or t == video_id:
                i = next(images if t == image_id else videos)
                spans[i] = (len(out), len(out) + visual[i].num_tokens)
                out.extend([t] * visual[i].num_tokens)
            else:
                out.append(t)
        return out, spans


def with_key(item: VisualItem, proc: ProcessingConfig, model: ModelConfig) -> VisualItem:
    """``item`` with its ``key``: a hash of its pixels (tiles, or the frames the device will tile)
    and of everything that turns them into feature rows (kind, token count, size, layout, the
    processing settings, the semantics). Equal keys: equal features; the prefix and vision caches
    rely on it, so two images of the same size never share an entry. Runs on a preprocessing worker."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((item.kind, item.num_tokens, item.image_size, item.layout, proc, model.semantics,
                   model.vision_layers_used)).encode())
    for a in ([item.tiles] if item.tiles is not None else item.rgb):
        h.update(repr((a.shape, str(a.dtype))).encode())
        h.update(np.ascontiguousarray(a).data)
    return replace(item, key=h.digest())


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"the prompt is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                          f"{e.start} (JSON escapes such as \\ud800 must come in pairs)") from None


_ROLES = ("system", "user", "assistant")


def chat_messages(messages) -> tuple[list[dict], list]:
    """OpenAI-style messages -> (the conversation the chat template renders, the media in prompt order).

    Each message is ``{"role": "system" | "user" | "assistant", "content": ...}`` with content a
    string or a list of parts: ``{"type": "text", "text": ...}``, ``{"type": "image", "image": x}``
    or ``{"type": "image_url", "image_url": {"url": x}}`` (x: anything ``complete`` takes as an
    image, e.g. a path or a ``data:`` URI), ``{"type": "video", "video": ovfast.Video | frames}``.
    Media keep their place in the turn; the template puts their placeholders there.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise UnsupportedInputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    conversation, items = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or "content" not in m:
            raise UnsupportedInputError(f"messages[{i}] must be a dict with a role in {_ROLES} and a content")
        content = m["content"]
        if isinstance(content, str):
            conversation.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, Sequence):
            raise UnsupportedInputError(f"messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages[{i}].content[{j}]"
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "image_url"):
                if m["role"] != "user":
                    raise UnsupportedInputError(f"{where}: media belong in user turns")
                image = part.get("image") if kind == "image" else part.get("image_url")
                if kind == "image_url" and isinstance(image, dict):
                    image = image.get("url")
                if image is None:
                    raise UnsupportedInputError(f"{where}: an {kind} part needs its {kind!r} field")
                items.append(image)
                parts.append({"type": "image"})
            elif kind == "video":
                if m["role"] != "user":
                    raise UnsupportedInputError(f"{where}: media belong in user turns")
                video = part.get("video")
                items.append(video if isinstance(video, Video) else Video(video))
                parts.append({"type": "video"})
            else:
                raise UnsupportedInputError(f"{where}: unknown part {part!r}; use text, image, image_url or video")
        conversation.append({"role": m["role"], "content": parts})
    return conversation, items
