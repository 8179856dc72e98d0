"""The engine: one loaded model, its static KV cache, and the runtime every caller shares.

A request goes: ``submit`` -> preprocessing on a worker thread (media, tiles, prompt ids) -> a
KV-cache slot -> vision (tiles -> packed features, once) -> prefill in chunks -> decode steps
batched with every other running request -> a ``Completion`` on its ``RequestHandle``. The loop
that owns the device is ``scheduler.Scheduler``; ``complete``, ``stream``, ``generate``,
``complete_many`` and ``chat`` are thin clients of ``submit``.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint import original
from ..checkpoint.files import Checkpoint, open_checkpoint
from ..checkpoint.prompts import LLAVA_OV_CHAT_TEMPLATE
from ..checkpoint.tokenizer import ChatTemplate, Tokenizer
from ..checkpoint.weights import checkpoint_tensors, feature_path_skips, load_weights, mapping_tensors
from ..distributed import plan_shards
from ..distributed.plan import check_parallel_size
from ..errors import ConfigError, EngineBusyError, GenerationParamsError, OvfastError, UnsupportedInputError
from ..inputs.device_tiles import device_tiles, pixel_affine
from ..inputs.media import Video
from ..inputs.preprocess import pixel_values
from ..inputs.processing import PixelNormalizer, ProcessingConfig
from ..models.llava_onevision import LlavaOnevision
from ..models.qwen2 import ForwardBatch
from ..ops import report
from ..ops.backends import use_triton
from .decode import DecodeRunner
from .devices import resolve_device
from .generation import Completion, Sequence, TextAssembler, Timings, TokenLogprob
from .handle import RequestHandle
from .kv_cache import KVCache, round_up
from .request import Limits, PreparedRequest, RequestBuilder, SamplingParams, as_items
from .scheduler import Scheduler
from . import scoring, tensor_parallel

__all__ = ["Engine", "EngineBusyError", "EngineConfig", "RequestHandle", "load"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 4  # KV-cache slots: requests decoded together
    max_seq_len: int | None = None  # per slot; default min(16384, the model's max positions)
    max_images: int = 16  # images in one request
    max_video_frames: int = 64  # video frames in one request (all videos)
    vision_chunk: int = 16  # tiles through the vision tower at a time
    max_queue: int = 256  # requests accepted but not yet in a slot; beyond: EngineOverloadedError
    prefill_chunk: int = 1024  # prompt tokens per prefill step, interleaved with decode steps
    preprocess_workers: int = 2  # threads decoding and tiling media
    max_prepared: int | None = None  # preprocessed requests holding pixels before admission (default 2 x slots)
    tensor_parallel_size: int = 1  # ranks the decoder is cut across (one GPU each, or CPU processes)

    def check(self) -> None:
        for name in ("max_batch_size", "max_images", "max_video_frames", "vision_chunk", "max_queue",
                     "prefill_chunk", "preprocess_workers", "tensor_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


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
    """A loaded LLaVA-OneVision model. Create with ``ovfast.load``.

    Thread-safe and shared: any number of threads and asyncio tasks submit requests; one
    background loop batches them (continuous batching, chunked prefill). Use as a context manager
    or call ``close()`` to stop the loop.
    """

    def __init__(self, ckpt: Checkpoint, device=None, dtype=None, config: EngineConfig = EngineConfig(),
                 weights: Mapping[str, torch.Tensor] | None = None, semantics: str | None = None):
        config.check()
        self.device = resolve_device(device)  # ConfigError for a device this torch cannot use
        self.dtype = _resolve_dtype(dtype, self.device)
        self.checkpoint = ckpt
        self.config = config
        self.tokenizer = Tokenizer.from_checkpoint(ckpt)
        self.model_config, self.family = original.model_config(ckpt.config, ckpt.path, self.tokenizer, semantics)
        cfg = self.model_config
        # The original code ignores the lmms-lab preprocessor_config.json (its values are built in).
        proc = ProcessingConfig.from_dict(ckpt.preprocessor_config if self.family == original.LLAVA_HF else {}, cfg)
        # lmms-lab checkpoints carry no processor template (tokenizer_config.json's is the text model's):
        # under the transformers semantics they get llava-hf's, as `ovfast convert` writes it.
        template = LLAVA_OV_CHAT_TEMPLATE if self.family == original.LMMS_LAB else ckpt.chat_template
        max_seq_len = config.max_seq_len or min(16384, cfg.text.max_position_embeddings)
        if max_seq_len > cfg.text.max_position_embeddings:
            raise ConfigError(f"max_seq_len {max_seq_len} exceeds the model's {cfg.text.max_position_embeddings} positions")
        self.max_seq_len = max_seq_len
        self.eos_ids = frozenset(self._eos_ids())
        self.requests = RequestBuilder(
            cfg, proc, self.tokenizer, ChatTemplate(template) if template else None,
            Limits(max_seq_len, config.max_images, config.max_video_frames),
        )
        self.normalizer = PixelNormalizer(proc)

        # One position past max_seq_len: the scratch position idle decode rows write to.
        cache_len = round_up(max_seq_len + 1, 16)
        self.tp, self._workers = self._start_tensor_parallel(config.tensor_parallel_size, semantics, weights,
                                                             cache_len, max_seq_len)
        plan = plan_shards(cfg.text, self.tp.rank, self.tp.size) if self.tp else None
        with self._on_device():
            t0 = time.perf_counter()
            try:
                with torch.device("meta"):
                    model = LlavaOnevision(cfg, plan, self.tp)
                model = model.to(self.dtype).to_empty(device=self.device)
                model.language_model.tie_and_zero_padding()  # to_empty re-creates parameters
                tensors = mapping_tensors(weights) if weights is not None else checkpoint_tensors(ckpt, self.device)
                self.skipped_tensors = load_weights(model.weight_destinations(), tensors,
                                                    lambda name: feature_path_skips(name, cfg))
                mine = {"error": None, "weight_bytes": tensor_parallel.parameter_bytes(model)}
                self._rank_reports = tensor_parallel.ready(self.tp, mine, self._workers.launch) if self.tp else [mine]
            except BaseException:
                if self._workers:
                    self._workers.abort()
                    self._workers.stop()
                raise
            model.language_model.set_max_positions(cache_len)
            self.model = model.eval().requires_grad_(False)
            # The decoder calls the engine makes; under tensor parallelism each is mirrored on the workers.
            self.lm = tensor_parallel.MirroredLM(model.language_model, self.tp) if self.tp else model.language_model
            self.load_ms = (time.perf_counter() - t0) * 1e3
            kv_heads = len(plan.kv_heads) if plan else None
            self.cache = KVCache(cfg.text, config.max_batch_size, cache_len, self.dtype, self.device, kv_heads)
            self.runner = DecodeRunner(self.model.language_model, self.cache, self.device, scratch=max_seq_len,
                                       tp=self.tp)
            # Two host buffers for the chosen tokens: one being read while the next step fills the other.
            pin = self.device.type == "cuda"
            n = config.max_batch_size
            self._host_tokens = [torch.zeros(n, dtype=torch.long, pin_memory=pin) for _ in range(2)]
            k = self.runner.top_ids.shape[1]
            self._host_logprobs = [(torch.zeros(n, pin_memory=pin), torch.zeros(n, k, pin_memory=pin),
                                    torch.zeros(n, k, dtype=torch.long, pin_memory=pin)) for _ in range(2)]
            self._flip = 0
            # Warm up at load, not on the first request: vision GEMM autotuning, then every graph.
            self.vision_warmup_ms = self._warm_up_vision()
            self.runner.capture_all()
        self._scheduler = Scheduler(self, config.max_queue, config.prefill_chunk, config.preprocess_workers,
                                    config.max_prepared or 2 * config.max_batch_size)

    def _start_tensor_parallel(self, size: int, semantics, weights, cache_len: int, max_seq_len: int):
        """(group, workers) for ``size`` > 1, else (None, None). Every check runs before a process starts.

        Started by torchrun (RANK / WORLD_SIZE set), this process is one of the ranks: rank 0
        goes on as the engine, a rank > 0 serves rank 0 and exits when it closes.
        """
        if size == 1:
            return None, None
        check_parallel_size(self.model_config.text, size)
        if weights is not None:
            raise ConfigError("weights= cannot be combined with tensor_parallel_size > 1: each rank reads its "
                              "shard from the checkpoint's safetensors files")
        launched = tensor_parallel.from_torchrun()
        if launched is not None:
            rank, world = launched
            if world != size:
                raise ConfigError(f"tensor_parallel_size {size} but torchrun started {world} processes")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
                torch.cuda.set_device(self.device)
        tensor_parallel.check_devices(1 if launched else size, self.device)
        tensor_parallel.check_free(size)
        spec = tensor_parallel.WorkerSpec(
            checkpoint=str(self.checkpoint.path), semantics=semantics, dtype=str(self.dtype).removeprefix("torch."),
            device_type=self.device.type, first_gpu=self.device.index or 0, slots=self.config.max_batch_size,
            cache_len=cache_len, scratch=max_seq_len)
        if launched is not None:
            tp = tensor_parallel.join(launched[0], size, self.device)
            if tp.rank > 0:
                raise SystemExit(tensor_parallel.serve(tp, spec, self.device))  # returns when rank 0 closes
            return tp, tensor_parallel.Workers(tp, None, self._worker_died)
        launch = tensor_parallel.Launch(size, spec)
        try:
            launch.wait_joined()
            tp = tensor_parallel.join(0, size, self.device, launch.store)
        except BaseException:
            launch.kill()
            raise
        return tp, tensor_parallel.Workers(tp, launch, self._worker_died)

    def _fatal(self) -> str | None:
        """After a failed device step: why the engine cannot go on, or None when it can. Under
        tensor parallelism every failure is fatal (the ranks no longer agree on what runs next)."""
        if self._workers is None:
            return None
        dead = self._workers.dead(wait=2.0)
        return dead or "a tensor-parallel step failed; the ranks are out of step"

    def _worker_died(self, reason: str) -> None:
        """The monitor saw a worker exit: refuse new requests, fail the running ones, end the other
        workers (nothing may wait on the dead one)."""
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None:  # (while loading, ``ready`` reports it)
            scheduler.abort(reason)
        self._workers.abort()

    # --- public API ---------------------------------------------------------------------------

    @property
    def random_weights(self) -> bool:
        """True for checkpoints written by ``ovfast.build_checkpoint``: their answers mean nothing."""
        return self.checkpoint.random_weights is not None

    def submit(self, images=None, prompt: str | None = None, *, messages=None, chat: bool = True,
               **params) -> RequestHandle:
        """Queue one request and return at once with its ``RequestHandle``.

        Either ``images`` (an image, an ``ovfast.Video``, a list of them, or None) and ``prompt``,
        or ``messages`` (OpenAI-style chat turns, see ``chat``). ``params``: ``max_new_tokens``,
        ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``ignore_eos``,
        ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``logprobs`` (None, or
        how many alternatives, up to 20, beside each chosen token's log-probability).

        Parameters are checked here; media errors arrive on the handle (``result()`` raises them).
        Beyond ``max_queue`` waiting requests this raises ``EngineOverloadedError`` before any
        preprocessing.
        """
        p = _params(params)
        device_tiling = use_triton(self.device)
        if messages is not None:
            if images is not None or prompt is not None:
                raise UnsupportedInputError("pass either messages, or images and prompt, not both")
            return self._scheduler.submit(lambda: self.requests.prepare_messages(messages, p, device_tiling))
        if prompt is None:
            raise UnsupportedInputError("a prompt (or messages=) is required")
        return self._scheduler.submit(lambda: self.requests.prepare(images, prompt, chat, p, device_tiling))

    def complete(self, images, prompt: str, *, chat: bool = True, **params) -> Completion:
        """Answer one request. ``images``: an image, an ``ovfast.Video``, a list of them, or None.

        Greedy when temperature is 0; otherwise temperature, top-k (0 = off), top-p and min-p
        sampling, reproducible under ``seed`` whatever else runs. Generation ends at the
        checkpoint's eos ids (unless ``ignore_eos``, for benchmarks), at any ``stop`` string (cut
        from the text), or after ``max_new_tokens``. See ``submit`` for every parameter.
        """
        return self.submit(images, prompt, chat=chat, **params).result()

    def generate(self, images, prompt: str, **kw) -> str:
        """The answer's text (see ``complete`` for the arguments)."""
        return self.complete(images, prompt, **kw).text

    def chat(self, messages, **params) -> Completion:
        """Answer OpenAI-style ``messages``: ``[{"role": "system" | "user" | "assistant", "content": ...}]``,
        content a string or a list of parts (``{"type": "text", "text"}``, ``{"type": "image", "image"}``,
        ``{"type": "image_url", "image_url": {"url"}}``, ``{"type": "video", "video"}``), multi-turn,
        rendered with the checkpoint's chat template."""
        return self.submit(messages=messages, **params).result()

    def stream(self, images, prompt: str, *, chat: bool = True, **params) -> Iterator[str]:
        """Yield the answer's text in pieces as tokens arrive; the pieces join to ``complete(...).text``.

        Pieces hold whole characters only. Bad input raises here, at the call; closing the
        iterator early cancels the request.
        """
        handle = self.submit(images, prompt, chat=chat, **params)
        handle.wait_prepared()
        return _pieces(handle)

    def complete_many(self, requests, *, chat: bool = True, **shared) -> list[Completion]:
        """Answer several requests together; completions come back in order.

        Each request is ``(images, prompt)`` or ``(images, prompt, overrides)`` where ``overrides``
        is a dict of ``complete``'s keyword arguments for that request alone. Under greedy
        decoding each gets exactly what ``complete`` gives it alone.
        """
        _params(shared)
        jobs = []
        for i, r in enumerate(requests):
            try:
                if not isinstance(r, (tuple, list)) or len(r) not in (2, 3):
                    raise UnsupportedInputError("expected (images, prompt) or (images, prompt, overrides)")
                kw = {"chat": chat, **shared, **(r[2] if len(r) == 3 else {})}
                unknown = set(kw) - {"chat", *SamplingParams.NAMES}
                if unknown:
                    raise UnsupportedInputError(f"unknown overrides {sorted(unknown)}")
                jobs.append((r[0], r[1], kw))
            except OvfastError as e:
                raise type(e)(f"request {i}: {e}") from e
        handles = []
        try:
            for i, (images, prompt, kw) in enumerate(jobs):
                try:
                    handles.append(self.submit(images, prompt, **kw))
                except OvfastError as e:
                    raise type(e)(f"request {i}: {e}") from e
            out = []
            for i, h in enumerate(handles):
                try:
                    out.append(h.result())
                except OvfastError as e:
                    raise type(e)(f"request {i}: {e}") from e
            return out
        finally:
            for h in handles:
                h.cancel()  # no-op for finished ones; on an error the rest stop

    def encode_media(self, images) -> list[torch.Tensor]:
        """The feature rows each item puts in the prompt, (num_tokens, hidden) per item, as the decoder sees them.

        Several images are packed as in a several-image prompt, one image with AnyRes.
        """
        items = as_items(images)
        placeholders = "".join("<video>" if isinstance(x, Video) else "<image>" for x in items)
        req = self._prepare(items, placeholders, False, SamplingParams.make(max_new_tokens=1))
        if not req.items:
            return []
        return self._scheduler.run_on_device(lambda slot: self._encode_items(req.items), needs_slot=False)

    def logits(self, images, prompt: str, *, chat: bool = True) -> torch.Tensor:
        """fp32 next-token logits at every prompt position, (prompt_tokens, vocab_size)."""
        req = self._prepare(images, prompt, chat, SamplingParams.make(max_new_tokens=1))
        return self._scheduler.run_on_device(lambda slot: self.lm.logits(self._prefill(req, slot)))

    def loglikelihood(self, images, prompt: str, continuation, *, chat: bool = True) -> tuple[float, bool]:
        """(summed fp32 log-probability of ``continuation`` after the prompt, whether greedy decoding yields it).

        The prompt is prepared as ``logits`` prepares it (with ``chat``, the rendered template and
        its generation prompt); ``continuation`` is a string (encoded without special tokens) or a
        list of token ids, appended after it. One prefill of prompt + continuation on the device;
        ``True`` when every continuation token is the argmax at its position. Raises
        ``EmptyContinuationError`` for no tokens and ``ContextLengthError`` when both do not fit.
        """
        cfg = self.model_config
        cont = scoring.continuation_ids(self.tokenizer, continuation, cfg.text.vocab_size,
                                        (cfg.image_token_id, cfg.video_token_id))
        req = scoring.with_continuation(
            lambda n: self._prepare(images, prompt, chat, SamplingParams.make(max_new_tokens=n)), cont, self.max_seq_len)
        start = len(req.input_ids) - len(cont) - 1  # the last prompt position predicts the first continuation token
        lm = self.lm
        return self._scheduler.run_on_device(
            lambda slot: scoring.score(lm.logits(self._prefill(req, slot)[start : start + len(cont)]), cont))

    def info(self) -> dict:
        """What runs where: device, dtype, each op's backend, CUDA graphs, KV-cache size, scheduler limits."""
        return {
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "ops": report(self.device), "cuda_graphs": self.runner.use_graphs,
            "graph_capture_ms": self.runner.capture_ms, "vision_warmup_ms": self.vision_warmup_ms,
            "kv_cache_gib": self.cache.nbytes / 2**30,
            "max_batch_size": self.cache.slots, "max_seq_len": self.max_seq_len,
            "max_queue": self.config.max_queue, "prefill_chunk": self.config.prefill_chunk,
            "skipped_tensors": list(self.skipped_tensors),
            "family": self.family, "semantics": self.model_config.semantics,
            **self._parallel_info(),
        }

    def _parallel_info(self) -> dict:
        """Per-rank memory: rank 0 holds the vision tower and projector beside its decoder share."""
        return {"tensor_parallel_size": self.tp.size if self.tp else 1,
                "weight_bytes_per_rank": [r["weight_bytes"] for r in self._rank_reports],
                "kv_cache_bytes_per_rank": [self.cache.nbytes] + [r["kv_cache_bytes"] for r in self._rank_reports[1:]]}

    def stats(self) -> dict:
        """Now: running / waiting requests, free slots, KV tokens used of total; so far: requests
        finished, tokens generated, time-to-first-token and inter-token latency percentiles (ms)."""
        return self._scheduler.stats()

    def preprocess(self, images, *, dtype: torch.dtype | None = None, pin_memory: bool | None = None) -> list[torch.Tensor]:
        """Normalised pixel values of each item with this engine's settings (see ``ovfast.preprocess``).

        Runs on the caller's thread, beside whatever the engine is generating.
        Defaults: the engine's dtype; pinned memory when the engine is on a GPU.
        """
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        return pixel_values(images, self.requests.model, self.requests.proc, self.normalizer, dtype or self.dtype, pin)

    def close(self) -> None:
        """Stop accepting requests, cancel what is running or waiting, and stop the loop (and the
        tensor-parallel workers)."""
        self._scheduler.close()
        if self._workers is not None:
            self._workers.stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals: called on the scheduler's thread --------------------------------------------

    def _prepare(self, images, prompt: str, chat: bool, params: SamplingParams) -> PreparedRequest:
        # With the Triton kernels on (CUDA by default), images go to the device untiled, as uint8.
        return self.requests.prepare(images, prompt, chat, params, device_tiling=use_triton(self.device))

    def _eos_ids(self) -> list[int]:
        eos = self.checkpoint.generation_config.get("eos_token_id")
        if eos is None:
            eos_token = self.tokenizer.special_tokens_map.get("eos_token")
            eos = self.tokenizer.token_id(eos_token) if eos_token else None
        if eos is None:
            eos = self.checkpoint.config.get("text_config", self.checkpoint.config).get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        im_end = self.tokenizer.token_id("<|im_end|>")
        if self.model_config.semantics == "original" and im_end is not None and im_end not in ids:
            ids.append(im_end)  # the qwen_1_5 conversation ends each turn there (its separator)
        return ids

    def _on_device(self):
        """Every launch and capture on the engine's GPU, whatever the calling thread's current device."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else _nothing()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _cancelled_completion(self, prompt_tokens: int = 0) -> Completion:
        return Completion("", [], prompt_tokens, "cancelled", Timings())

    @torch.inference_mode()
    def _warm_up_vision(self) -> float:
        """Autotune the vision GEMM kernels for every tile batch the engine will run (1, 2, 4, ...,
        vision_chunk tiles: ``kernels._runtime.m_bucket`` keys) before the first request."""
        if self.device.type != "cuda" or not use_triton(self.device):
            return 0.0
        t0 = time.perf_counter()
        scale, shift = pixel_affine(self.requests.proc, self.device)
        t = self.requests.proc.tile
        n = 1
        while True:
            tiles = torch.zeros((min(n, self.config.vision_chunk), 3, t, t), dtype=torch.uint8, device=self.device)
            self.model.encode_tiles(tiles, self.config.vision_chunk, scale, shift)
            if n >= self.config.vision_chunk:
                break
            n *= 2
        self._sync()
        return (time.perf_counter() - t0) * 1e3

    def _begin(self, req: PreparedRequest, slot: int, submitted: float) -> Sequence:
        """A request takes ``slot``: vision once, its prompt rows ready for the prefill chunks."""
        p = req.params
        seed = p.seed if p.seed is not None else random.getrandbits(62)
        seed = seed - (1 << 64) if seed >= 1 << 63 else seed  # its 64 bits, as the device's int64
        seq = Sequence(req, slot, TextAssembler(self.tokenizer, p.stop), seed,
                       Timings(preprocess_ms=req.preprocess_ms), submitted=submitted)
        if p.logprobs is not None:
            seq.logprobs = []
        t0 = time.perf_counter()
        ids = torch.tensor(req.input_ids, dtype=torch.long, device=self.device)
        seq.embeds = self._embed(req, ids)
        self.runner.set_params(slot, p, seed, ids)
        if req.items:
            self._sync()
        seq.timings.vision_ms = (time.perf_counter() - t0) * 1e3
        return seq

    def _embed(self, req: PreparedRequest, ids: torch.Tensor) -> torch.Tensor:
        h = self.lm.embed(ids)
        if req.items:
            self._merge_visual(h, req)
        return h

    def _prefill_chunk(self, seq: Sequence, budget: int) -> None:
        """The next at most ``budget`` prompt positions of ``seq`` into its slot; after the last, its first token."""
        t0 = time.perf_counter()
        total = len(seq.request.input_ids)
        start = seq.prefilled
        n = min(budget, total - start)
        lm = self.lm
        batch = ForwardBatch.prefill(seq.slot, n, self.device, start=start)
        hidden = lm(seq.embeds[start : start + n], batch, self.cache.k, self.cache.v)
        seq.prefilled += n
        if seq.prefilling:
            self._sync()
            seq.timings.prefill_ms += (time.perf_counter() - t0) * 1e3
            return
        seq.embeds = None
        p = seq.request.params
        logits = lm.logits(hidden[-1:])
        general = not p.plain_greedy
        rows = slice(seq.slot, seq.slot + 1)
        token = int(self.runner.choose(logits, rows, torch.tensor([total - 1], device=self.device), general))
        if seq.logprobs is not None:
            self._record_logprobs(seq, token, self.runner.out_logprob[rows], self.runner.top_logprobs[rows],
                                  self.runner.top_ids[rows], 0)
        seq.decode_start = seq.last_token = time.perf_counter()
        seq.timings.prefill_ms += (seq.decode_start - t0) * 1e3
        seq.length = total
        seq.add_token(token, self.eos_ids)

    def _record_logprobs(self, seq: Sequence, token: int, chosen, top_lp, top_ids, row: int) -> None:
        n = seq.request.params.logprobs
        ids = top_ids[row, :n].tolist()
        values = top_lp[row, :n].tolist()
        decode = lambda i: self.tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
        seq.logprobs.append(TokenLogprob(token, decode(token), float(chosen[row]),
                                         tuple((i, decode(i), v) for i, v in zip(ids, values))))

    def _queue_step(self, active: dict[int, Sequence], general: bool):
        """Launch one decode step for the active slots; returns what ``_collect`` needs to read it."""
        out = self.runner.step(max(active) + 1, general)
        b = out.shape[0]
        self._flip ^= 1
        host = self._host_tokens[self._flip][:b]
        host.copy_(out, non_blocking=True)
        logprob_host = None
        if any(seq.logprobs is not None for seq in active.values()):
            logprob_host = tuple(h[:b] for h in self._host_logprobs[self._flip])
            for h, d in zip(logprob_host, (self.runner.out_logprob, self.runner.top_logprobs, self.runner.top_ids)):
                h.copy_(d[:b], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return host, event, dict(active), general, logprob_host

    def _collect(self, host: torch.Tensor, event, stepped: dict[int, Sequence], general: bool,
                 logprob_host) -> list[Sequence]:
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
            if seq.logprobs is not None:
                self._record_logprobs(seq, tokens[slot], *(logprob_host[0], logprob_host[1], logprob_host[2]), slot)
            seq.add_token(tokens[slot], self.eos_ids)
            seq.previous_token, seq.last_token = seq.last_token, now
            seq.timings.decode_ms = (now - seq.decode_start) * 1e3
            seq.timings.decode_tokens = len(seq.tokens) - 1
            out.append(seq)
        return out

    def _prefill(self, req: PreparedRequest, slot: int, timings: Timings | None = None) -> torch.Tensor:
        """The whole prompt into ``slot`` in one pass: final hidden states (T, D) (``logits``, tests)."""
        t0 = time.perf_counter()
        ids = torch.tensor(req.input_ids, dtype=torch.long, device=self.device)
        h = self._embed(req, ids)
        self._sync()
        t1 = time.perf_counter()
        batch = ForwardBatch.prefill(slot, len(req.input_ids), self.device)
        hidden = self.lm(h, batch, self.cache.k, self.cache.v)
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


    def _merge_visual(self, h: torch.Tensor, req: PreparedRequest) -> None:
        """Write each item's packed features over its placeholder rows (images and videos in prompt order).

        The rows are found on the host, from the prompt ids: no boolean-mask indexing (a sync)."""
        feats = self._encode_items(req.items)
        cfg = self.model_config
        for is_video, token in ((False, cfg.image_token_id), (True, cfg.video_token_id)):
            rows = [f for it, f in zip(req.items, feats) if (it.kind == "video") == is_video]
            if rows:
                where = [i for i, t in enumerate(req.input_ids) if t == token]
                index = torch.tensor(where, dtype=torch.long).to(self.device, non_blocking=True)
                h.index_copy_(0, index, torch.cat(rows).to(h.dtype))


def _params(params: dict) -> SamplingParams:
    unknown = set(params) - set(SamplingParams.NAMES)
    if unknown:
        raise GenerationParamsError(f"unknown generation parameters {sorted(unknown)}; known: {list(SamplingParams.NAMES)}")
    return SamplingParams.make(**params)


def _pieces(handle: RequestHandle) -> Iterator[str]:
    try:
        yield from handle
    finally:  # closed early (or abandoned): the request stops and frees its slot
        handle.cancel()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def load(model: str | os.PathLike, *, device=None, dtype=None, max_batch_size: int = 4, max_seq_len: int | None = None,
         max_images: int = 16, max_video_frames: int = 64, max_queue: int = 256, prefill_chunk: int = 1024,
         preprocess_workers: int = 2, weights: Mapping[str, torch.Tensor] | None = None,
         semantics: str | None = None, tensor_parallel_size: int = 1) -> Engine:
    """Load a LLaVA-OneVision checkpoint: a local Hugging Face directory or a Hub id.

    Defaults: CUDA when available, else CPU; bfloat16 on a GPU, float32 on the CPU. ``weights``
    (a name -> tensor mapping in any supported naming, e.g. a transformers state_dict) replaces
    the checkpoint's safetensors files, which then need not exist. ``max_batch_size`` requests
    decode together; ``max_queue`` more may wait; ``prefill_chunk`` bounds the prompt tokens one
    step prefills, so running streams keep flowing while a long prompt is read.

    Both checkpoint families load: llava-hf (and transformers 5.x saves) and the original lmms-lab
    ``LlavaQwenForCausalLM`` repositories. ``semantics`` picks whose reference the engine
    reproduces where the two differ (prompt format, unpad rounding, alpha): "original"
    (LLaVA-NeXT, the default for lmms-lab checkpoints) or "transformers" (the default for llava-hf).

    ``tensor_parallel_size`` N > 1 cuts the decoder across N ranks (one GPU each from ``device``,
    NCCL; or N CPU processes, gloo): this process is rank 0 and starts the other N - 1, or, under
    ``torchrun``, is whichever rank torchrun made it (a rank > 0 serves and exits in here).
    """
    config = EngineConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_images=max_images,
                          max_video_frames=max_video_frames, max_queue=max_queue, prefill_chunk=prefill_chunk,
                          preprocess_workers=preprocess_workers, tensor_parallel_size=tensor_parallel_size)
    return Engine(open_checkpoint(model, need_weights=weights is None), device=device, dtype=dtype, config=config,
                  weights=weights, semantics=semantics)
