"""The engine: one loaded model and the runtime every caller shares. A facade.

``Engine`` loads (``loading``), then hands the device to a ``ModelRunner`` driven by one
``Scheduler`` loop; its public calls (``submit`` and the thin clients of it: ``complete``,
``stream``, ``generate``, ``complete_many``, ``chat``; the scoring calls; ``info``, ``stats``,
``close``) only check arguments, queue work and wait. The request's path is in
docs/request-lifecycle.md; the options are ``EngineConfig``'s (docs/configuration.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping

import torch

from ..checkpoint import original
from ..checkpoint.files import Checkpoint, open_checkpoint
from ..checkpoint.prompts import LLAVA_OV_CHAT_TEMPLATE
from ..checkpoint.tokenizer import ChatTemplate, Tokenizer
from ..distributed import plan_shards
from ..errors import ConfigError, EngineBusyError, GenerationParamsError, OvfastError, UnsupportedInputError
from ..inputs.media import Video
from ..inputs.preprocess import pixel_values
from ..inputs.processing import PixelNormalizer, ProcessingConfig
from ..ops import cpu_native, report
from ..ops.backends import use_triton
from . import loading, scoring
from .config import EngineConfig, resolve_dtype, resolve_prefill_chunk
from .constraints import Grammars
from .decode import DecodeRunner
from .devices import resolve_device
from .generation import Completion
from .handle import RequestHandle
from .block_pool import BlockPool
from .encoder_cache import EncoderCache
from .kv_cache import KVCache, blocks_for
from .model_runner import ModelRunner
from .request import Limits, PreparedRequest, RequestBuilder, SamplingParams, as_items
from .scheduler import Scheduler

__all__ = ["Engine", "EngineBusyError", "EngineConfig", "RequestHandle", "load"]


class Engine:
    """A loaded LLaVA-OneVision model. Create with ``ovfast.load``.

    Thread-safe and shared: any number of threads and asyncio tasks submit requests; one
    background loop batches them (continuous batching, chunked prefill, vision in pieces). Use as
    a context manager or call ``close()`` to stop the loop.
    """

    def __init__(self, ckpt: Checkpoint, config: EngineConfig = EngineConfig(),
                 weights: Mapping[str, torch.Tensor] | None = None):
        config.check()
        self.device = resolve_device(config.device)  # ConfigError for a device this torch cannot use
        self.dtype = resolve_dtype(config.dtype, self.device)
        config = dataclasses.replace(config, prefill_chunk=resolve_prefill_chunk(config.prefill_chunk, self.device))
        if self.device.type == "cpu":
            # A prefill's large temporaries come back from a cache instead of fresh pages faulted
            # in every layer (docs/cpu.md); process-wide, OVFAST_CPU_BLOCK_CACHE_MB=0 turns it off.
            cpu_native.default_block_cache()
        self.checkpoint, self.config = ckpt, config
        self.tokenizer = Tokenizer.from_checkpoint(ckpt)
        self.model_config, self.family = original.model_config(ckpt.config, ckpt.path, self.tokenizer,
                                                               config.semantics)
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
        self.eos_ids = loading.eos_ids(ckpt, self.tokenizer, cfg)
        self.normalizer = PixelNormalizer(proc)

        # The paged KV cache: its page size and budget are fixed before any process starts (every
        # tensor-parallel rank holds the same pages of its own heads).
        self.device = loading.rank_device(config.tensor_parallel_size, self.device)
        plan = plan_shards(cfg.text, 0, config.tensor_parallel_size) if config.tensor_parallel_size > 1 else None
        block_size = config.kv_block_size or _preferred_block_size(self.device, self.dtype, cfg.text.head_dim)
        num_blocks, self.kv_info = loading.kv_budget(config, cfg, self.device, self.dtype, plan, max_seq_len, block_size)
        rows, max_blocks = config.max_batch_size, blocks_for(max_seq_len + 2, block_size)
        self._scheduler: Scheduler | None = None
        parallel = loading.start_tensor_parallel(
            config.tensor_parallel_size, ckpt, cfg, self.device, self.dtype, config.semantics, weights is not None,
            dict(rows=rows, num_blocks=num_blocks, block_size=block_size, max_blocks=max_blocks,
                 max_positions=max_seq_len + 2), self._worker_died)
        self.tp, self._workers, num_blocks = parallel.tp, parallel.workers, parallel.num_blocks
        self.kv_info["kv_cache_tokens"] = (num_blocks - 1) * block_size
        # A request must fit the whole cache: prompt + answer + the position written ahead.
        self.context_limit = min(max_seq_len, (num_blocks - 1) * block_size - 1)
        # Structured outputs: xgrammar and its vocabulary table come at the first constrained request.
        self.grammars = Grammars(self.tokenizer, cfg.text.vocab_size, self.eos_ids)
        self.requests = RequestBuilder(
            cfg, proc, self.tokenizer, ChatTemplate(template) if template else None,
            Limits(self.context_limit, config.max_images, config.max_video_frames), self.grammars,
        )
        with self._on_device():
            built = loading.build_model(ckpt, cfg, self.device, self.dtype, parallel, weights)
            self.skipped_tensors, self._rank_reports, self.load_ms = built.skipped_tensors, built.rank_reports, built.load_ms
            model = built.model
            model.language_model.set_max_positions(max_seq_len + 2)
            # CPU: oneDNN's blocked copies of the prompt GEMMs' weights, within OVFAST_CPU_PACKED_WEIGHTS_MB
            self.packed_weight_bytes = (cpu_native.pack_weights(model.prompt_gemm_weights())
                                        if self.device.type == "cpu" and parallel.tp is None else 0)
            cache = KVCache(cfg.text, num_blocks, block_size, self.dtype, self.device,
                            len(plan.kv_heads) if plan else None)
            decode = DecodeRunner(model.language_model, cache, self.device, rows=rows, max_blocks=max_blocks,
                                  tp=self.tp, graphs=config.cuda_graphs)
            self.runner = ModelRunner(
                model, cache, decode, model_config=cfg, proc=proc, normalizer=self.normalizer,
                tokenizer=self.tokenizer, eos_ids=self.eos_ids, vision_chunk=config.vision_chunk,
                encoder_cache=EncoderCache(config.encoder_cache_tokens), tp=self.tp, fatal=self._fatal)
            # Warm up at load, not on the first request: vision GEMM autotuning, then every graph.
            self.runner.warm_up_vision()
            self.runner.capture_graphs()
        self._scheduler = Scheduler(
            self.runner, slots=rows, pool=BlockPool(num_blocks, block_size), prefix_caching=config.prefix_caching,
            max_queue=config.max_queue, prefill_chunk=config.prefill_chunk,
            preprocess_workers=config.preprocess_workers, max_prepared=config.prepared_limit, device=self.device)

    @property
    def max_batch_size(self) -> int:
        """Sequences decoded together (the KV cache is shared by pages, not split among them)."""
        return self.config.max_batch_size

    @property
    def model(self):
        return self.runner.model

    @property
    def cache(self) -> KVCache:
        return self.runner.cache

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
        if self._scheduler is not None:  # (while loading, ``ready`` reports it)
            self._scheduler.abort(reason)
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
        how many alternatives, up to 20, beside each chosen token's log-probability), and at most
        one constraint on the answer (structured outputs, docs/serving.md): ``response_format``
        (OpenAI's: ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name",
        "schema", "strict"}}``), ``regex``, ``choice`` (a list of strings) or ``grammar`` (EBNF).
        A constrained answer holds only tokens its grammar allows and ends (finish_reason "stop")
        when the grammar is complete; it needs xgrammar (``pip install 'ovfast[structured]'``).

        Parameters are checked here; media errors arrive on the handle (``result()`` raises them).
        Beyond ``max_queue`` waiting requests this raises ``EngineOverloadedError`` before any
        preprocessing.
        """
        p = _params(params)
        if p.constraint is not None:
            self.grammars.require()  # compiled on the worker; a missing xgrammar is the caller's error now
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
        return self._scheduler.run_job(lambda: self.runner.encode_media(req.items))

    def logits(self, images, prompt: str, *, chat: bool = True) -> torch.Tensor:
        """fp32 next-token logits at every prompt position, (prompt_tokens, vocab_size)."""
        req = self._prepare(images, prompt, chat, SamplingParams.make(max_new_tokens=1))
        runner = self.runner
        return self._scheduler.run_job(lambda: runner.logits(runner.prompt_hidden(req)))

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
        runner = self.runner
        return self._scheduler.run_job(
            lambda: scoring.score(runner.logits(runner.prompt_hidden(req)[start : start + len(cont)]), cont))

    def info(self) -> dict:
        """What runs where: device, dtype, each op's backend, CUDA graphs, KV-cache size, scheduler limits."""
        return {
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "ops": report(self.device), "cuda_graphs": self.runner.use_graphs,
            "graph_capture_ms": self.runner.decode.capture_ms, "vision_warmup_ms": self.runner.vision_warmup_ms,
            "kv_cache_gib": self.cache.nbytes / 2**30, **self.kv_info,
            **({"cpu_block_cache": cpu_native.block_cache_stats(),
                "cpu_packed_weights_mib": self.packed_weight_bytes / 2**20} if self.device.type == "cpu" else {}),
            "gpu_memory_utilization": self.config.gpu_memory_utilization,
            "prefix_caching": self.config.prefix_caching, "encoder_cache_tokens": self.config.encoder_cache_tokens,
            "max_batch_size": self.max_batch_size, "max_seq_len": self.max_seq_len,
            "context_limit": self.context_limit,
            "max_queue": self.config.max_queue, "prefill_chunk": self.config.prefill_chunk,
            "vision_chunk": self.config.vision_chunk,
            "skipped_tensors": list(self.skipped_tensors),
            "family": self.family, "semantics": self.model_config.semantics,
            **self._parallel_info(),
            "defects": self._scheduler.defects(),  # recent unexpected failures, newest last (also logged to "ovfast")
        }

    def _parallel_info(self) -> dict:
        """Per-rank memory: rank 0 holds the vision tower and projector beside its decoder share."""
        return {"tensor_parallel_size": self.tp.size if self.tp else 1,
                "weight_bytes_per_rank": [r["weight_bytes"] for r in self._rank_reports],
                "kv_cache_bytes_per_rank": [self.cache.nbytes] + [r["kv_cache_bytes"] for r in self._rank_reports[1:]]}

    def stats(self) -> dict:
        """Now: running / waiting requests, free slots, KV positions and pages used of the budget;
        so far: prefix-cache hit and looked-up tokens, vision-cache hits and misses, preemptions,
        requests finished, tokens generated, time-to-first-token and inter-token latency
        percentiles (ms). docs/serving.md lists every key."""
        enc = self.runner.encoder_cache.stats()
        return {**self._scheduler.stats(), "encoder_cache_hits": enc["hits"], "encoder_cache_misses": enc["misses"],
                "encoder_cache_tokens": enc["tokens"]}

    def reset_caches(self) -> None:
        """Forget every cached prompt prefix and media feature (the next requests run cold, as for a
        benchmark of uncached requests); requests running meanwhile are not disturbed."""
        self._scheduler.reset_caches()

    def preprocess(self, images, *, dtype: torch.dtype | None = None, pin_memory: bool | None = None) -> list[torch.Tensor]:
        """Normalised pixel values of each item with this engine's settings (see ``ovfast.preprocess``).

        Runs on the caller's thread, beside whatever the engine is generating.
        Defaults: the engine's dtype; pinned memory when the engine is on a GPU.
        """
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        return pixel_values(images, self.requests.model, self.requests.proc, self.normalizer, dtype or self.dtype, pin)

    def close(self) -> None:
        """Stop accepting requests, cancel what is running or waiting, and stop the loop (and the
        tensor-parallel workers). Returns promptly however many requests are queued."""
        self._scheduler.close()
        if self._workers is not None:
            self._workers.stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prepare(self, images, prompt: str, chat: bool, params: SamplingParams) -> PreparedRequest:
        # With the Triton kernels on (CUDA by default), images go to the device untiled, as uint8.
        return self.requests.prepare(images, prompt, chat, params, device_tiling=use_triton(self.device))

    def _on_device(self):
        """Every launch and capture on the engine's GPU, whatever the calling thread's current device."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()


def _preferred_block_size(device: torch.device, dtype: torch.dtype, head_dim: int) -> int:
    """Where the kernels run, their choice (flash-attn's paged path wants 256-position pages);
    else 16: small pages waste little of a sequence's last page and share prefixes finely."""
    if use_triton(device):
        from ..kernels import preferred_block_size  # Triton is imported only where kernels run

        return preferred_block_size(device, dtype, head_dim)
    return 16


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



def load(model: str | os.PathLike, *, weights: Mapping[str, torch.Tensor] | None = None, **options) -> Engine:
    """Load a LLaVA-OneVision checkpoint: a local Hugging Face directory or a Hub id.

    ``options`` are ``EngineConfig``'s fields, no others (docs/configuration.md): ``device``
    (default CUDA when available, else CPU), ``dtype`` (bfloat16 on a GPU, float32 on the CPU),
    ``max_batch_size`` requests decoding together, ``max_queue`` more waiting, ``prefill_chunk``
    prompt tokens and ``vision_chunk`` tiles per loop turn (running streams keep flowing while a
    long prompt or video is read), ``semantics``, ``tensor_parallel_size``, and the rest.
    ``weights`` (a name -> tensor mapping in any supported naming, e.g. a transformers
    state_dict) replaces the checkpoint's safetensors files, which then need not exist.

    Both checkpoint families load: llava-hf (and transformers 5.x saves) and the original lmms-lab
    ``LlavaQwenForCausalLM`` repositories. ``semantics`` picks whose reference the engine
    reproduces where the two differ (prompt format, unpad rounding, alpha): "original"
    (LLaVA-NeXT, the default for lmms-lab checkpoints) or "transformers" (the default for llava-hf).

    ``tensor_parallel_size`` N > 1 cuts the decoder across N ranks (one GPU each from ``device``,
    NCCL; or N CPU processes, gloo): this process is rank 0 and starts the other N - 1, or, under
    ``torchrun``, is whichever rank torchrun made it (a rank > 0 serves and exits in here).
    """
    config = EngineConfig.from_options(options)
    return Engine(open_checkpoint(model, need_weights=weights is None), config, weights)
