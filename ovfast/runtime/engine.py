"""The engine: one loaded model, its static KV cache, and the request loop.

A request goes: prepare (host: media, tiles, prompt ids) -> vision (tiles -> packed features)
-> prefill (prompt into a cache slot, first token) -> decode steps (one token per active slot per
step, all slots in one batch) -> Completion. Several requests share the cache: each is prefilled
alone, and freed slots are refilled while the others keep decoding.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint.config import ModelConfig
from ..checkpoint.files import Checkpoint, open_checkpoint
from ..checkpoint.tokenizer import ChatTemplate, Tokenizer
from ..checkpoint.weights import load_weights, mapping_tensors, safetensors_tensors
from ..errors import ConfigError, OvfastError, UnsupportedInputError
from ..inputs.device_tiles import device_tiles, pixel_affine
from ..inputs.media import Video
from ..inputs.preprocess import pixel_values
from ..inputs.processing import PixelNormalizer, ProcessingConfig
from ..models.llava_onevision import LlavaOnevision
from ..models.qwen2 import ForwardBatch
from ..ops import report, sample
from ..ops.backends import use_triton
from .decode import DecodeRunner
from .generation import Completion, Sequence, TextAssembler, Timings
from .kv_cache import KVCache, round_up
from .request import Limits, PreparedRequest, RequestBuilder, SamplingParams, as_items

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class EngineBusyError(OvfastError):
    """This thread already has an unfinished stream on the engine; finish or close it first."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 4  # KV-cache slots: requests decoded together
    max_seq_len: int | None = None  # per slot; default min(16384, the model's max positions)
    max_images: int = 16  # images in one request
    max_video_frames: int = 64  # video frames in one request (all videos)
    vision_chunk: int = 16  # tiles through the vision tower at a time


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")


class Engine:
    """A loaded LLaVA-OneVision model. Create with ``ovfast.load``. Thread-safe: calls run one at a time."""

    def __init__(self, ckpt: Checkpoint, device=None, dtype=None, config: EngineConfig = EngineConfig(),
                 weights: Mapping[str, torch.Tensor] | None = None):
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _resolve_dtype(dtype, self.device)
        self.checkpoint = ckpt
        self.model_config = ModelConfig.from_dict(ckpt.config)
        self.config = config
        cfg = self.model_config
        proc = ProcessingConfig.from_dict(ckpt.preprocessor_config, cfg)
        self.tokenizer = Tokenizer(ckpt.tokenizer_file, ckpt.tokenizer_config)
        for token, want in (("<image>", cfg.image_token_id), ("<video>", cfg.video_token_id)):
            if self.tokenizer.token_id(token) != want:
                raise ConfigError(f"tokenizer.json maps {token} to {self.tokenizer.token_id(token)}, config.json to {want}")
        max_seq_len = config.max_seq_len or min(16384, cfg.text.max_position_embeddings)
        if max_seq_len > cfg.text.max_position_embeddings:
            raise ConfigError(f"max_seq_len {max_seq_len} exceeds the model's {cfg.text.max_position_embeddings} positions")
        self.max_seq_len = max_seq_len
        self.eos_ids = frozenset(self._eos_ids())
        self.requests = RequestBuilder(
            cfg, proc, self.tokenizer, ChatTemplate(ckpt.chat_template) if ckpt.chat_template else None,
            Limits(max_seq_len, config.max_images, config.max_video_frames),
        )
        self.normalizer = PixelNormalizer(proc)

        t0 = time.perf_counter()
        with torch.device("meta"):
            model = LlavaOnevision(cfg)
        model = model.to(self.dtype).to_empty(device=self.device)
        if cfg.text.tie_word_embeddings:  # to_empty re-creates parameters: tie them again
            model.language_model.lm_head = model.language_model.embed_tokens
        load_weights(model, mapping_tensors(weights) if weights is not None else safetensors_tensors(ckpt.weight_files))
        model.language_model.set_max_positions(max_seq_len)
        self.model = model.eval().requires_grad_(False)
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.cache = KVCache(cfg.text, config.max_batch_size, round_up(max_seq_len, 16), self.dtype, self.device)
        self.runner = DecodeRunner(self.model.language_model, self.cache, self.device)
        # Two host buffers for the sampled tokens: one being read while the next step fills the other.
        pin = self.device.type == "cuda"
        self._host_tokens = [torch.zeros(config.max_batch_size, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        self._lock = threading.Lock()
        self._owner: int | None = None

    # --- public API ---------------------------------------------------------------------------

    @property
    def random_weights(self) -> bool:
        """True for checkpoints written by ``ovfast.build_checkpoint``: their answers mean nothing."""
        return self.checkpoint.random_weights is not None

    def complete(self, images, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop=None, chat: bool = True,
                 ignore_eos: bool = False) -> Completion:
        """Answer one request. ``images``: an image, an ``ovfast.Video``, a list of them, or None.

        Greedy when temperature is 0; otherwise temperature, top-k (0 = off) and top-p sampling,
        reproducible under ``seed``. Generation ends at the checkpoint's eos ids (unless
        ``ignore_eos``, for benchmarks), at any ``stop`` string (cut from the text), or after
        ``max_new_tokens``.
        """
        params = SamplingParams.make(max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        with self._exclusive():
            req = self._prepare(images, prompt, chat, params)
            return self._run([req])[0]

    def generate(self, images, prompt: str, **kw) -> str:
        """The answer's text (see ``complete`` for the arguments)."""
        return self.complete(images, prompt, **kw).text

    def stream(self, images, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop=None, chat: bool = True,
               ignore_eos: bool = False) -> Iterator[str]:
        """Yield the answer's text in pieces as tokens arrive; the pieces join to ``complete(...).text``.

        Pieces hold whole characters only. The engine is reserved until the iterator is exhausted
        or closed.
        """
        params = SamplingParams.make(max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        # Validate eagerly so bad input raises at the call, not at the first next().
        with self._exclusive():
            req = self._prepare(images, prompt, chat, params)
        return self._stream(req)

    def complete_many(self, requests, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                      top_k: int = 0, seed: int | None = None, stop=None, chat: bool = True,
                      ignore_eos: bool = False) -> list[Completion]:
        """Answer several requests together through the shared cache; completions come back in order.

        Each request is ``(images, prompt)`` or ``(images, prompt, overrides)`` where ``overrides``
        is a dict of ``complete``'s keyword arguments for that request alone. Up to
        ``max_batch_size`` decode in one batch, and a finished request's slot goes to the next
        waiting one. Under greedy decoding each gets exactly what ``complete`` gives it alone.
        """
        shared = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      seed=seed, stop=stop, chat=chat, ignore_eos=ignore_eos)
        with self._exclusive():
            prepared = []
            for i, r in enumerate(requests):
                try:
                    if not isinstance(r, (tuple, list)) or len(r) not in (2, 3):
                        raise UnsupportedInputError("expected (images, prompt) or (images, prompt, overrides)")
                    kw = {**shared, **(r[2] if len(r) == 3 else {})}
                    if set(kw) != set(shared):
                        raise UnsupportedInputError(f"unknown overrides {sorted(set(kw) - set(shared))}")
                    chat_i = kw.pop("chat")
                    prepared.append(self._prepare(r[0], r[1], chat_i, SamplingParams.make(**kw)))
                except OvfastError as e:
                    raise type(e)(f"request {i}: {e}") from e
            return self._run(prepared)

    def encode_media(self, images) -> list[torch.Tensor]:
        """The feature rows each item puts in the prompt, (num_tokens, hidden) per item, as the decoder sees them.

        Several images are packed as in a several-image prompt, one image with AnyRes.
        """
        items = as_items(images)
        placeholders = "".join("<video>" if isinstance(x, Video) else "<image>" for x in items)
        with self._exclusive(), torch.inference_mode():
            req = self._prepare(items, placeholders, False, SamplingParams.make(max_new_tokens=1))
            return self._encode_items(req.items) if req.items else []

    def logits(self, images, prompt: str, *, chat: bool = True) -> torch.Tensor:
        """fp32 next-token logits at every prompt position, (prompt_tokens, vocab_size)."""
        with self._exclusive(), torch.inference_mode():
            req = self._prepare(images, prompt, chat, SamplingParams.make(max_new_tokens=1))
            hidden = self._prefill(req, slot=0)
            return self.model.language_model.logits(hidden)

    def info(self) -> dict:
        """What runs where: device, dtype, each op's backend, CUDA graphs, KV-cache size."""
        return {
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "ops": report(self.device), "cuda_graphs": self.runner.use_graphs,
            "graph_capture_ms": self.runner.capture_ms, "kv_cache_gib": self.cache.nbytes / 2**30,
            "max_batch_size": self.cache.slots, "max_seq_len": self.max_seq_len,
        }

    def preprocess(self, images, *, dtype: torch.dtype | None = None, pin_memory: bool | None = None) -> list[torch.Tensor]:
        """Normalised pixel values of each item with this engine's settings (see ``ovfast.preprocess``).

        Runs without reserving the engine, so other threads can preprocess while it generates.
        Defaults: the engine's dtype; pinned memory when the engine is on a GPU.
        """
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        return pixel_values(images, self.requests.model, self.requests.proc, self.normalizer, dtype or self.dtype, pin)

    # --- internals ----------------------------------------------------------------------------

    def _prepare(self, images, prompt: str, chat: bool, params: SamplingParams) -> PreparedRequest:
        # With the Triton kernels on (CUDA by default), images go to the device untiled, as uint8.
        return self.requests.prepare(images, prompt, chat, params, device_tiling=use_triton(self.device))

    def _eos_ids(self) -> list[int]:
        eos = self.checkpoint.generation_config.get("eos_token_id")
        if eos is None:
            eos_token = self.tokenizer.special_tokens_map.get("eos_token")
            eos = self.tokenizer.token_id(eos_token) if eos_token else None
        if eos is None:
            eos = self.checkpoint.config.get("text_config", {}).get("eos_token_id")
        return [eos] if isinstance(eos, int) else list(eos or [])

    @contextmanager
    def _exclusive(self):
        me = threading.get_ident()
        if self._owner == me:
            raise EngineBusyError("this thread is still iterating a stream from this engine; exhaust or close() it first")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _stream(self, req: PreparedRequest) -> Iterator[str]:
        with self._exclusive():
            for seq in self._generate([req]):
                piece = seq.text.pending()
                if piece:
                    yield piece

    def _run(self, reqs: list[PreparedRequest]) -> list[Completion]:
        done: list[Completion | None] = [None] * len(reqs)
        for seq in self._generate(reqs):
            if seq.finish_reason:
                done[seq.index] = seq.completion()
        return done

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _generate(self, reqs: list[PreparedRequest]) -> Iterator[Sequence]:
        """Run requests to completion; yields a sequence after each token it gains (and once finished).

        Decode steps are queued one ahead: while the device computes step t+1, the host turns
        step t's tokens into text and checks the stop conditions, synchronising once per step. A
        sequence found finished at step t already had step t+1 computed; that token is dropped.
        """
        pending = deque(enumerate(reqs))
        width = min(self.cache.slots, len(reqs))  # decode rows are slots 0..width-1
        active: dict[int, Sequence] = {}
        in_flight = None
        try:
            while pending or active or in_flight:
                for slot in range(width):
                    if slot in active or not pending:
                        continue
                    seq = self._start(*pending.popleft(), slot)
                    yield seq
                    if not seq.finish_reason:
                        active[slot] = seq
                        p = seq.request.params
                        self.runner.admit(slot, seq.tokens[-1], seq.length, p.temperature, p.top_p, p.top_k)
                queued = self._queue_step(active) if active else None
                if in_flight is not None:
                    for seq in self._collect(*in_flight):
                        yield seq
                        if seq.finish_reason:
                            del active[seq.slot]
                            self.runner.retire(seq.slot)
                in_flight = queued
        finally:  # also on errors and abandoned streams: no row keeps advancing into the next call
            for slot in range(width):
                self.runner.retire(slot)

    def _queue_step(self, active: dict[int, Sequence]):
        """Launch one decode step for the active slots; returns what ``_collect`` needs to read it."""
        sampling = any(s.request.params.temperature > 0 for s in active.values())
        if sampling:
            for slot, seq in active.items():
                if seq.request.params.temperature > 0:
                    self.runner.fill_noise(slot, seq.generator)
        out = self.runner.step(max(active) + 1, sampling)
        self._flip ^= 1
        host = self._host_tokens[self._flip][: out.shape[0]]
        host.copy_(out, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return host, event, dict(active)

    def _collect(self, host: torch.Tensor, event, stepped: dict[int, Sequence]) -> list[Sequence]:
        """Wait for a queued step and hand each of its still-running sequences its token."""
        if event is not None:
            event.synchronize()
        tokens = host.tolist()
        now = time.perf_counter()
        out = []
        for slot, seq in stepped.items():
            if seq.finish_reason:  # finished at the previous step: this token is surplus
                continue
            seq.length += 1
            seq.add_token(tokens[slot], self.eos_ids)
            seq.timings.decode_ms = (now - seq.decode_start) * 1e3
            seq.timings.decode_tokens = len(seq.tokens) - 1
            out.append(seq)
        return out

    @torch.inference_mode()
    def _start(self, index: int, req: PreparedRequest, slot: int) -> Sequence:
        """Vision and prefill of one request into ``slot``; the returned sequence holds its first token."""
        p = req.params
        gen = None
        if p.seed is not None and p.temperature > 0:
            gen = torch.Generator(device=self.device).manual_seed(p.seed)
        seq = Sequence(index, req, slot, TextAssembler(self.tokenizer, p.stop), gen, Timings(preprocess_ms=req.preprocess_ms))
        hidden = self._prefill(req, slot, seq.timings)
        t0 = time.perf_counter()
        logits = self.model.language_model.logits(hidden[-1:])
        if p.temperature > 0:
            dev = logits.device
            noise = torch.empty_like(logits).exponential_(generator=gen)
            token = sample(logits, torch.tensor([p.temperature], device=dev), torch.tensor([p.top_p], device=dev),
                           torch.tensor([p.top_k], device=dev), noise)
        else:
            token = logits.argmax(dim=-1)
        token = int(token)  # synchronises: the first token is part of prefill
        seq.decode_start = time.perf_counter()
        seq.timings.prefill_ms += (seq.decode_start - t0) * 1e3
        seq.length = len(req.input_ids)
        seq.add_token(token, self.eos_ids)
        return seq

    def _prefill(self, req: PreparedRequest, slot: int, timings: Timings | None = None) -> torch.Tensor:
        """Embed the prompt, merge the media features, run the decoder into ``slot``: final hidden (T, D)."""
        t0 = time.perf_counter()
        ids = torch.tensor(req.input_ids, dtype=torch.long, device=self.device)
        h = self.model.language_model.embed(ids)
        if req.items:
            self._merge_visual(h, ids, req)
            self._sync()
        t1 = time.perf_counter()
        batch = ForwardBatch.prefill(slot, len(req.input_ids), self.device)
        hidden = self.model.language_model(h, batch, self.cache.k, self.cache.v)
        self._sync()
        if timings is not None:
            timings.vision_ms, timings.prefill_ms = (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
        return hidden

    def _encode_items(self, items) -> list[torch.Tensor]:
        """Packed features (num_tokens, D) of each visual item: tiles -> SigLIP -> projector -> packing."""
        model = self.model
        if use_triton(self.device) or self.device.type == "cuda":
            # uint8 all the way to the patch embedding, which folds the normalisation in as
            # x * scale + shift (a few ulps from the CPU table, invisible after the cast to bf16)
            # and reads the tiles in place. The CPU default keeps the table: bit-exact.
            per_item = [self._device_tiles(it) for it in items]  # each (n, 3, T, T) uint8
            scale, shift = pixel_affine(self.requests.proc, self.device)
            feats = model.encode_tiles(torch.cat(per_item), self.config.vision_chunk, scale, shift)
        else:
            per_item = [it.tiles for it in items]  # each (n, T, T, 3) uint8
            pixels = self.normalizer(torch.from_numpy(np.concatenate(per_item)), self.dtype)
            feats = model.encode_tiles(pixels, self.config.vision_chunk)
        feats = feats.split([len(t) for t in per_item])
        packers = {"video": model.pack_video, "image_multi": model.pack_multi}
        return [
            model.pack_anyres(f, item.layout) if item.kind == "image" else packers[item.kind](f)
            for item, f in zip(items, feats)
        ]

    def _device_tiles(self, item) -> torch.Tensor:
        """One item's uint8 tiles (n, 3, T, T) on the device: the pixels cross once, as uint8."""
        def upload(a: np.ndarray) -> torch.Tensor:
            if self.device.type != "cuda":
                return torch.from_numpy(a if a.flags.writeable else a.copy())
            staged = torch.empty(a.shape, dtype=torch.uint8, pin_memory=True)  # one host copy, pinned
            staged.numpy()[...] = a
            return staged.to(self.device, non_blocking=True)

        if item.tiles is not None:  # tiled on the CPU (device tiling off, or another filter)
            return upload(item.tiles).permute(0, 3, 1, 2)
        pixels = [upload(f) for f in item.rgb] if item.kind == "video" else upload(item.rgb[0])
        return device_tiles(pixels, item.kind, self.model_config, self.requests.proc)

    def _merge_visual(self, h: torch.Tensor, ids: torch.Tensor, req: PreparedRequest) -> None:
        """Write each item's packed features over its placeholder rows (images and videos in prompt order)."""
        feats = self._encode_items(req.items)
        cfg = self.model_config
        for is_video, token in ((False, cfg.image_token_id), (True, cfg.video_token_id)):
            rows = [f for it, f in zip(req.items, feats) if (it.kind == "video") == is_video]
            if rows:
                h[ids == token] = torch.cat(rows).to(h.dtype)


def load(model: str | os.PathLike, *, device=None, dtype=None, max_batch_size: int = 4, max_seq_len: int | None = None,
         max_images: int = 16, max_video_frames: int = 64, weights: Mapping[str, torch.Tensor] | None = None) -> Engine:
    """Load a LLaVA-OneVision checkpoint: a local Hugging Face directory or a Hub id.

    Defaults: CUDA when available, else CPU; bfloat16 on a GPU, float32 on the CPU. ``weights``
    (a name -> tensor mapping in any supported naming, e.g. a transformers state_dict) replaces
    the checkpoint's safetensors files, which then need not exist.
    """
    config = EngineConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_images=max_images,
                          max_video_frames=max_video_frames)
    return Engine(open_checkpoint(model, need_weights=weights is None), device=device, dtype=dtype, config=config,
                  weights=weights)
