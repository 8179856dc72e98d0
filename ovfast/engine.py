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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import Checkpoint, open_checkpoint
from .config import ModelConfig
from .errors import ConfigError, OvfastError, UnsupportedInputError
from .generation import Completion, Sequence, TextAssembler, Timings
from .kv_cache import KVCache, round_up
from .models.llava_onevision import LlavaOnevision
from .models.qwen2 import ForwardBatch
from .ops import sample
from .preprocess import PixelNormalizer, ProcessingConfig
from .media import Video
from .request import Limits, PreparedRequest, RequestBuilder, SamplingParams, as_items
from .tokenizer import ChatTemplate, Tokenizer
from .weights import load_weights

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

    def __init__(self, ckpt: Checkpoint, device=None, dtype=None, config: EngineConfig = EngineConfig()):
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
        load_weights(model, ckpt.weight_files)
        model.language_model.set_max_positions(max_seq_len)
        self.model = model.eval().requires_grad_(False)
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.cache = KVCache(cfg.text, config.max_batch_size, round_up(max_seq_len, 16), self.dtype, self.device)
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
            req = self.requests.prepare(images, prompt, chat, params)
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
            req = self.requests.prepare(images, prompt, chat, params)
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
                    prepared.append(self.requests.prepare(r[0], r[1], chat_i, SamplingParams.make(**kw)))
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
            req = self.requests.prepare(items, placeholders, False, SamplingParams.make(max_new_tokens=1))
            return self._encode_items(req.items) if req.items else []

    def logits(self, images, prompt: str, *, chat: bool = True) -> torch.Tensor:
        """fp32 next-token logits at every prompt position, (prompt_tokens, vocab_size)."""
        with self._exclusive(), torch.inference_mode():
            req = self.requests.prepare(images, prompt, chat, SamplingParams.make(max_new_tokens=1))
            hidden = self._prefill(req, slot=0)
            return self.model.language_model.logits(hidden)

    # --- internals ----------------------------------------------------------------------------

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
        """Run requests to completion; yields a sequence after each token it gains (and once finished)."""
        pending = deque(enumerate(reqs))
        width = min(self.cache.slots, len(reqs))  # decode rows are slots 0..width-1
        active: dict[int, Sequence] = {}
        while pending or active:
            for slot in range(width):
                if slot in active or not pending:
                    continue
                seq = self._start(*pending.popleft(), slot)
                yield seq
                if not seq.finish_reason:
                    active[slot] = seq
            if not active:
                continue
            rows = max(active) + 1
            t0 = time.perf_counter()
            stepped = self._decode_step(active, rows)
            step_ms = (time.perf_counter() - t0) * 1e3
            for seq in stepped:
                seq.timings.decode_ms += step_ms
                seq.timings.decode_tokens += 1
                yield seq
                if seq.finish_reason:
                    del active[seq.slot]

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
        token = self._sample(self.model.language_model.logits(hidden[-1:]), [seq])[0]  # syncs: .tolist()
        seq.timings.prefill_ms += (time.perf_counter() - t0) * 1e3  # the first token is part of prefill
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
        from . import backends
        from .device_tiles import pixel_affine

        model = self.model
        tiles = torch.from_numpy(np.concatenate([it.tiles for it in items]))  # (N, T, T, 3) uint8
        if self.device.type == "cuda":
            tiles = tiles.pin_memory().to(self.device, non_blocking=True)
        if self.device.type == "cuda" or backends.use_triton(self.device):
            # The normalisation folds into the patch embedding, which reads the HWC bytes in
            # place; x * scale + shift can differ from the CPU table by a few ulps, so the CPU
            # default path below keeps the table (bit-exact with the processor).
            scale, shift = pixel_affine(self.requests.proc, self.device)
            feats = model.encode_tiles(tiles.permute(0, 3, 1, 2), self.config.vision_chunk, scale, shift)
        else:
            feats = model.encode_tiles(self.normalizer(tiles, self.dtype), self.config.vision_chunk)
        feats = feats.split([len(it.tiles) for it in items])
        packers = {"video": model.pack_video, "image_multi": model.pack_multi}
        return [
            model.pack_anyres(f, item.image_size) if item.kind == "image" else packers[item.kind](f)
            for item, f in zip(items, feats)
        ]

    def _merge_visual(self, h: torch.Tensor, ids: torch.Tensor, req: PreparedRequest) -> None:
        """Write each item's packed features over its placeholder rows (images and videos in prompt order)."""
        feats = self._encode_items(req.items)
        cfg = self.model_config
        for is_video, token in ((False, cfg.image_token_id), (True, cfg.video_token_id)):
            rows = [f for it, f in zip(req.items, feats) if (it.kind == "video") == is_video]
            if rows:
                h[ids == token] = torch.cat(rows).to(h.dtype)

    @torch.inference_mode()
    def _decode_step(self, active: dict[int, Sequence], rows: int) -> list[Sequence]:
        """One token for every active slot among rows 0..rows-1; idle rows compute on a dummy."""
        tokens = torch.zeros(rows, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        for slot, seq in active.items():
            tokens[slot], positions[slot] = seq.tokens[-1], seq.length
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        lm = self.model.language_model
        out = lm(lm.embed(tokens), ForwardBatch.decode(positions), self.cache.k, self.cache.v)
        row_seqs = [active.get(r) for r in range(rows)]
        next_tokens = self._sample(lm.logits(out), row_seqs)
        stepped = []
        for slot, seq in active.items():
            seq.length += 1
            seq.add_token(next_tokens[slot], self.eos_ids)
            stepped.append(seq)
        return stepped

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence | None]) -> list[int]:
        """Next token of each row (None rows are idle and decode greedily)."""
        params = [s.request.params if s else None for s in seqs]
        dev = logits.device
        temperature = torch.tensor([p.temperature if p else 0.0 for p in params], device=dev)
        top_p = torch.tensor([p.top_p if p else 1.0 for p in params], device=dev)
        top_k = torch.tensor([p.top_k if p else 0 for p in params], device=dev)
        return sample(logits, temperature, top_p, top_k, [s.generator if s else None for s in seqs]).tolist()

def load(model: str | os.PathLike, *, device=None, dtype=None, max_batch_size: int = 4, max_seq_len: int | None = None,
         max_images: int = 16, max_video_frames: int = 64) -> Engine:
    """Load a LLaVA-OneVision checkpoint: a local Hugging Face directory or a Hub id.

    Defaults: CUDA when available, else CPU; bfloat16 on a GPU, float32 on the CPU.
    """
    config = EngineConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_images=max_images,
                          max_video_frames=max_video_frames)
    return Engine(open_checkpoint(model), device=device, dtype=dtype, config=config)
