"""The model runner: everything the scheduler asks of the device, and nothing else.

It owns the model, the KV cache and the decode step (``decode.DecodeRunner``), and offers the
scheduler a small surface: ``begin`` a sequence in a slot, ``advance`` it one bounded piece
(a piece of its vision, or one prefill chunk; the last chunk chooses its first token),
``start_decoding`` / ``retire`` its decode row, ``launch`` a decode step and ``collect`` it one
step later, and jobs that need no slot (``encode_media``, ``prompt_hidden``). It never calls the
scheduler; the scheduler never touches the model.

Host syncs: only where a value is needed on the host: the first token of a sequence and each
decode step's tokens (read one step late; for a step with a constrained row, before the next is
launched, since that row's next token mask depends on them). Vision pieces and non-final prefill chunks queue
work and return; their durations are taken from device events once the first token has synced.

Under tensor parallelism this class is the one mirror point: every decoder call it makes
(embedding, forward pass, logits, decode step, graph capture) is announced to the workers first,
with its inputs broadcast, so all ranks run the same call on their shards.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..distributed import TensorParallel
from ..inputs.device_tiles import device_tiles, pixel_affine
from ..inputs.processing import PixelNormalizer, ProcessingConfig, VisualItem
from ..checkpoint.config import ModelConfig
from ..checkpoint.tokenizer import Tokenizer
from ..models.llava_onevision import LlavaOnevision
from ..models.qwen2 import ForwardBatch
from ..ops.backends import kernel_for, use_triton
from .decode import DecodeRunner
from .generation import Sequence, Status, TextAssembler, TokenLogprob
from .encoder_cache import EncoderCache
from .kv_cache import KVCache, blocks_for
from .request import PreparedRequest


@dataclass
class Pending:
    """A launched decode step: where its tokens land on the host, and who it stepped."""

    tokens: torch.Tensor
    event: object | None
    stepped: dict[int, Sequence]
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    constrained: bool = False  # a row follows a grammar: collect this step before launching the next


class VisionPlan:
    """A request's media, encoded in pieces of at most ``chunk`` tiles over the request's tiles in order.

    Each piece runs its tiles through the tower and projector into ``feats``; an item whose tiles
    are all done is packed and written over its placeholder rows at once (``merged`` items so far).
    """

    def __init__(self, items: list[VisualItem], rows: list[torch.Tensor] | None = None,
                 embeds: torch.Tensor | None = None):
        self.items, self.rows, self.embeds = items, rows, embeds  # no rows: features are only returned
        self.counts = [_tile_count(it) for it in items]
        self.starts = np.cumsum([0] + self.counts).tolist()
        self.total = self.starts[-1]
        self.next = 0  # tiles encoded so far
        self.merged = 0  # items packed into the prompt rows so far
        self.feats: torch.Tensor | None = None  # (total, P, D) projected features
        self.device_tiles: dict[int, torch.Tensor] = {}  # item -> its uint8 tiles on the device

    @property
    def done(self) -> bool:
        return self.merged == len(self.items)


class ModelRunner:
    def __init__(self, model: LlavaOnevision, cache: KVCache, decode: DecodeRunner, *, model_config: ModelConfig,
                 proc: ProcessingConfig, normalizer: PixelNormalizer, tokenizer: Tokenizer, eos_ids: frozenset[int],
                 vision_chunk: int, encoder_cache: EncoderCache, tp: TensorParallel | None = None,
                 fatal: Callable[[], str | None] | None = None):
        self.model, self.cache, self.decode = model, cache, decode
        self.lm = model.language_model
        self.device, self.dtype = cache.k.device, cache.k.dtype
        self.model_config, self.proc, self.normalizer = model_config, proc, normalizer
        self.tokenizer, self.eos_ids, self.vision_chunk = tokenizer, eos_ids, vision_chunk
        self.tp, self._fatal = tp, fatal
        self.encoder_cache = encoder_cache
        self.block_size = cache.block_size
        self._affine: tuple[torch.Tensor, torch.Tensor] | None = None
        # Two host buffers for the chosen tokens: one being read while the next step fills the other.
        pin = self.device.type == "cuda"
        n, k = decode.rows, decode.top_ids.shape[1]
        self._host_tokens = [torch.zeros(n, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._host_logprobs = [(torch.zeros(n, pin_memory=pin), torch.zeros(n, k, pin_memory=pin),
                                torch.zeros(n, k, dtype=torch.long, pin_memory=pin)) for _ in range(2)]
        self._flip = 0
        # Constrained rows' next-token bitmasks, filled here by their grammars and copied to the decode step.
        self._host_mask = torch.full(tuple(decode.mask.shape), -1, dtype=torch.int32, pin_memory=pin)
        self.vision_warmup_ms = 0.0
        if self.device.type == "cpu":
            kernel_for("linear", self.device)  # builds the CPU kernels now (once per machine), not in a request

    # --- at load ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def warm_up_vision(self) -> float:
        """Autotune the vision GEMM kernels for every piece size the engine will run (1, 2, 4, ...,
        vision_chunk tiles: ``kernels._runtime.m_bucket`` keys) before the first request."""
        if self.device.type != "cuda" or not use_triton(self.device):
            return 0.0
        t0 = time.perf_counter()
        scale, shift = self._pixel_affine()
        t, n = self.proc.tile, 1
        while True:
            tiles = torch.zeros((min(n, self.vision_chunk), 3, t, t), dtype=torch.uint8, device=self.device)
            self.model.encode_tiles(tiles, self.vision_chunk, scale, shift)
            if n >= self.vision_chunk:
                break
            n *= 2
        torch.cuda.synchronize(self.device)
        self.vision_warmup_ms = (time.perf_counter() - t0) * 1e3
        return self.vision_warmup_ms

    def capture_graphs(self) -> float:
        """Capture every decode bucket now (the workers too); the milliseconds spent."""
        if self.decode.use_graphs:
            self._announce("capture")
            self.decode.capture_all()
        return self.decode.capture_ms

    @property
    def use_graphs(self) -> bool:
        return self.decode.use_graphs

    def fatal(self) -> str | None:
        """After a failed device call: why the engine cannot go on (a dead or out-of-step
        tensor-parallel rank), or None when it can."""
        return self._fatal() if self._fatal is not None else None

    # --- a sequence in its slot --------------------------------------------------------------------

    def begin(self, seq: Sequence) -> None:
        """``seq`` (prepared, with its slot and pages; its first ``prefilled`` positions already
        cached) starts: sampling state, its rows from ``prefilled`` on, the media still needed.
        A preempted sequence resumes: the same state, its answer so far part of the context."""
        req, slot = seq.request, seq.slot
        p = req.params
        if seq.text is None:  # the first admission (a resumed sequence keeps its seed, text, logprobs)
            seed = p.seed if p.seed is not None else random.getrandbits(62)
            seq.seed = seed - (1 << 64) if seed >= 1 << 63 else seed  # its 64 bits, as the device's int64
            seq.text = TextAssembler(self.tokenizer, p.stop)
            seq.timings.preprocess_ms = req.preprocess_ms
            if p.logprobs is not None:
                seq.logprobs = []
            if req.grammar is not None:
                seq.grammar = req.grammar.start()
        if seq.grammar is not None:  # (resuming: the state it had, every token so far accepted)
            self._next_mask(seq)
        context = seq.context_ids()
        ids = torch.tensor(context, dtype=torch.long, device=self.device)
        self.decode.set_params(slot, p, seq.seed, ids[: len(req.input_ids)], seq.tokens[:-1] if seq.resuming else [])
        self.decode.set_blocks(slot, 0, seq.blocks)
        seq.table = torch.tensor(seq.blocks, dtype=torch.int32).to(self.device, non_blocking=True)
        seq.embeds = self._embed(ids[seq.prefilled :])  # row i: position prefilled + i
        # Media wholly inside the cached prefix need nothing; the vision cache may hold the rest.
        items, rows = [], []
        for item, r, (_, stop) in zip(req.items, self._item_rows(req, seq.prefilled), req.spans):
            if stop <= seq.prefilled:
                continue
            feats = self.encoder_cache.get(item.key)
            if feats is not None:
                _merge(seq.embeds, r, feats)
            else:
                items.append(item)
                rows.append(r)
        seq.vision = VisionPlan(items, rows, seq.embeds) if items else None

    def set_blocks(self, seq: Sequence, first: int) -> None:
        """``seq`` gained pages ``seq.blocks[first:]`` (decoding): into its decode row."""
        self.decode.set_blocks(seq.slot, first, seq.blocks[first:])

    def advance(self, seq: Sequence, budget: int) -> bool:
        """One bounded piece of ``seq``'s prefill: a vision piece while media remain, else at most
        ``budget`` prompt positions. True once the last chunk is in: it has chosen the first token
        (or, resuming, the sequence can decode on from its last one)."""
        if seq.vision is not None:
            self._vision_piece(seq)
            return False
        return self._prefill_chunk(seq, budget)

    def start_decoding(self, seq: Sequence) -> None:
        """``seq`` has its first token: its decode row starts from there."""
        self.decode.admit(seq.slot, seq.tokens[-1], seq.length)

    def retire(self, slot: int) -> None:
        self.decode.retire(slot)

    # --- decode steps ----------------------------------------------------------------------------

    def launch(self, active: dict[int, Sequence]) -> Pending:
        """Queue one decode step for the decoding slots ``active``; ``collect`` reads it."""
        general = not all(seq.request.params.plain_greedy for seq in active.values())
        masked = any(seq.grammar is not None for seq in active.values())
        rows = max(active) + 1
        self._announce("decode", rows=rows, general=general)  # (the workers choose nothing: no mask there)
        out = self.decode.step(rows, general, masked)
        b = out.shape[0]
        self._flip ^= 1
        host = self._host_tokens[self._flip][:b]
        host.copy_(out, non_blocking=True)
        logprobs = None
        if any(seq.logprobs is not None for seq in active.values()):
            logprobs = tuple(h[:b] for h in self._host_logprobs[self._flip])
            d = self.decode
            for h, src in zip(logprobs, (d.out_logprob, d.top_logprobs, d.top_ids)):
                h.copy_(src[:b], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return Pending(host, event, dict(active), logprobs, masked)

    def collect(self, pending: Pending) -> list[Sequence]:
        """Wait for a launched step; each stepped sequence still decoding gets its token. Returns them."""
        if pending.event is not None:
            pending.event.synchronize()
        tokens = pending.tokens.tolist()
        now = time.perf_counter()
        out = []
        for slot, seq in pending.stepped.items():
            if seq.status is not Status.DECODING or seq.done_generating:  # ended meanwhile: a surplus token
                continue
            seq.length += 1
            if seq.logprobs is not None:
                self._record_logprobs(seq, tokens[slot], *pending.logprobs, slot)
            self._add_token(seq, tokens[slot])
            seq.previous_token, seq.last_token = seq.last_token, now
            seq.timings.decode_ms = (now - seq.decode_start) * 1e3
            seq.timings.decode_tokens = len(seq.tokens) - 1
            out.append(seq)
        return out

    # --- jobs that need no slot ----------------------------------------------------------------------

    def encode_media(self, items: list[VisualItem]) -> list[torch.Tensor]:
        """Packed features (num_tokens, D) of each item: tiles -> SigLIP -> projector -> packing
        (or the vision cache)."""
        out = [self.encoder_cache.get(item.key) for item in items]
        missing = [i for i, feats in enumerate(out) if feats is None]
        plan = VisionPlan([items[i] for i in missing])
        packed = []
        while plan.next < plan.total:
            packed += self._encode_piece(plan, plan.total - plan.next)
        for i, feats in zip(missing, packed):
            out[i] = feats
        return out

    def prompt_hidden(self, req: PreparedRequest, cache: KVCache | None = None,
                      table: torch.Tensor | None = None) -> torch.Tensor:
        """The whole prompt in one pass: final hidden states (T, D). Into a scratch cache of its own
        (pages 1..) unless ``cache`` and ``table`` are given (a test decoding on from there), so it
        never waits for pages or a slot."""
        n = len(req.input_ids)
        if cache is None:
            cache = self.cache.sized(blocks_for(n, self.block_size) + 1)
        if table is None:
            table = torch.arange(1, blocks_for(n, self.block_size) + 1, dtype=torch.int32, device=self.device)
        ids = torch.tensor(req.input_ids, dtype=torch.long, device=self.device)
        h = self._embed(ids)
        for rows, feats in zip(self._item_rows(req), self.encode_media(req.items)):
            _merge(h, rows, feats)
        pages = table.tolist() if self.tp is not None else None
        return self._forward(h, ForwardBatch.prefill(table, self.block_size, n), cache, pages)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 next-token logits of hidden states (the workers take part)."""
        self._announce("logits", shape=tuple(hidden.shape), dtype=_name(hidden.dtype))
        return self.lm.logits(self._share(hidden))

    # --- pieces -------------------------------------------------------------------------------------

    def _vision_piece(self, seq: Sequence) -> None:
        start = self._clock()
        plan = seq.vision
        self._encode_piece(plan, self.vision_chunk)
        seq.marks.append(("vision", start, self._clock()))
        if plan.done:
            seq.vision = None

    def _encode_piece(self, plan: VisionPlan, budget: int) -> list[torch.Tensor]:
        """The next ``budget`` tiles of ``plan`` through the tower; each item completed by them is
        packed and, where the plan has rows for it, written over them. Returns the packed items."""
        a = plan.next
        b = min(plan.total, a + budget)
        if plan.feats is None:
            w2 = self.model.projector_w2
            plan.feats = torch.empty((plan.total, self.model_config.vision.num_positions, w2.shape[0]),
                                     dtype=w2.dtype, device=w2.device)
        plan.feats[a:b] = self._encode_tiles(plan, a, b)
        plan.next = b
        packed = []
        while plan.merged < len(plan.items) and plan.starts[plan.merged + 1] <= b:
            i = plan.merged
            item, feats = plan.items[i], plan.feats[plan.starts[i] : plan.starts[i + 1]]
            out = self._pack(item, feats)
            self.encoder_cache.put(item.key, out)
            if plan.rows is not None:
                _merge(plan.embeds, plan.rows[i], out)
            packed.append(out)
            plan.device_tiles.pop(i, None)
            plan.merged += 1
        if plan.done:
            plan.feats = None
        return packed

    def _encode_tiles(self, plan: VisionPlan, a: int, b: int) -> torch.Tensor:
        """Projected features (b - a, P, D) of the plan's tiles a..b-1 (they may span items)."""
        # Read at each piece, as the kernel mode is (a test may switch it); items prepared for
        # device tiling have no host tiles at all.
        items = [i for i, (s, e) in enumerate(zip(plan.starts, plan.starts[1:])) if max(a, s) < min(b, e)]
        on_device = use_triton(self.device) or self.device.type == "cuda" or \
            any(plan.items[i].tiles is None for i in items)
        parts = []
        for i in items:
            s, e = plan.starts[i], plan.starts[i + 1]
            parts.append(self._item_tiles(plan, i, on_device)[max(a, s) - s : min(b, e) - s])
        if on_device:
            # uint8 all the way to the patch embedding, which folds the normalisation in as
            # x * scale + shift (a few ulps from the CPU table, invisible after the cast to bf16).
            # The CPU default keeps the table: bit-exact.
            scale, shift = self._pixel_affine()
            return self.model.encode_tiles(torch.cat(parts), self.vision_chunk, scale, shift)
        pixels = self.normalizer(torch.from_numpy(np.concatenate(parts)), self.dtype)
        return self.model.encode_tiles(pixels, self.vision_chunk)

    def _item_tiles(self, plan: VisionPlan, i: int, on_device: bool):
        """Item ``i``'s tiles: (n, T, T, 3) uint8 on the host, or (n, 3, T, T) uint8 on the device."""
        item = plan.items[i]
        if not on_device:
            return item.tiles
        if i not in plan.device_tiles:
            plan.device_tiles[i] = self._device_tiles(item)
        return plan.device_tiles[i]

    def _pack(self, item: VisualItem, feats: torch.Tensor) -> torch.Tensor:
        model = self.model
        if item.kind == "image":
            return model.pack_anyres(feats, item.layout)
        return model.pack_video(feats) if item.kind == "video" else model.pack_multi(feats)

    def _device_tiles(self, item: VisualItem) -> torch.Tensor:
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
        return device_tiles(pixels, item.kind, self.model_config, self.proc)

    def _pixel_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._affine is None:
            self._affine = pixel_affine(self.proc, self.device)
        return self._affine

    def _prefill_chunk(self, seq: Sequence, budget: int) -> bool:
        start_mark = self._clock()
        total, start = len(seq.context_ids()), seq.prefilled
        n = min(budget, total - start)
        rows = seq.embeds[: n]
        seq.embeds = seq.embeds[n:]
        batch = ForwardBatch.prefill(seq.table, self.block_size, n, start=start)
        hidden = self._forward(rows, batch, self.cache, seq.blocks)
        seq.prefilled += n
        if seq.prefilled < total:  # no sync: the next chunk queues behind this one
            seq.marks.append(("prefill", start_mark, self._clock()))
            return False
        seq.embeds = None
        if seq.resuming:  # the answer so far is back in the cache; its last token is the next input
            seq.length = total
            seq.marks.clear()
            return True
        p = seq.request.params
        rows = slice(seq.slot, seq.slot + 1)
        logits = self.logits(hidden[-1:])
        chosen = self.decode.choose(logits, rows, torch.tensor([total - 1], device=self.device), not p.plain_greedy,
                                    seq.grammar is not None)
        token = int(chosen)  # the one sync of a prefill: the first token is needed on the host
        seq.marks.append(("prefill", start_mark, self._clock()))
        self._read_spans(seq)
        if seq.logprobs is not None:
            d = self.decode
            self._record_logprobs(seq, token, d.out_logprob[rows], d.top_logprobs[rows], d.top_ids[rows], 0)
        seq.decode_start = seq.last_token = time.perf_counter()
        seq.length = total
        self._add_token(seq, token)
        return True

    def _add_token(self, seq: Sequence, token: int) -> None:
        """``seq``'s next token; a constrained sequence's grammar takes it and gives the next mask,
        or ends the answer when nothing but its end can follow."""
        seq.add_token(token, self.eos_ids)
        if seq.grammar is None or seq.done_generating:
            return
        seq.grammar.accept(token)
        self._next_mask(seq)

    def _next_mask(self, seq: Sequence) -> None:
        if seq.grammar.fill(self._host_mask, seq.slot):
            self.decode.set_mask(seq.slot, self._host_mask[seq.slot])
        else:
            seq.end("stop")

    def _record_logprobs(self, seq: Sequence, token: int, chosen, top_lp, top_ids, row: int) -> None:
        n = seq.request.params.logprobs
        ids = top_ids[row, :n].tolist()
        values = top_lp[row, :n].tolist()
        decode = lambda i: self.tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
        seq.logprobs.append(TokenLogprob(token, decode(token), float(chosen[row]),
                                         tuple((i, decode(i), v) for i, v in zip(ids, values))))

    def _item_rows(self, req: PreparedRequest, offset: int = 0) -> list[torch.Tensor]:
        """Each item's rows in an embedding tensor that starts at prompt position ``offset``
        (positions before it are cached already and have no rows)."""
        return [torch.arange(max(start, offset) - offset, max(stop, offset) - offset, device=self.device)
                for start, stop in req.spans]

    # --- timing without syncs ----------------------------------------------------------------------

    def _clock(self):
        """A point in the device's timeline: a recorded CUDA event, or (CPU) the time itself."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _read_spans(self, seq: Sequence) -> None:
        """(After the first token's sync) the vision and prefill milliseconds from the pieces' marks."""
        totals = {"vision": 0.0, "prefill": 0.0}
        for kind, a, b in seq.marks:
            if isinstance(a, float):
                totals[kind] += (b - a) * 1e3
            else:
                b.synchronize()
                totals[kind] += a.elapsed_time(b)
        seq.marks.clear()
        seq.timings.vision_ms, seq.timings.prefill_ms = totals["vision"], totals["prefill"]

    # --- the decoder calls, mirrored on the tensor-parallel workers --------------------------------------

    def _announce(self, op: str, **meta) -> None:
        if self.tp is not None:
            self.tp.send((op, meta))

    def _share(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.broadcast(x.contiguous()) if self.tp is not None else x

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        self._announce("embed", n=ids.shape[0])
        return self.lm.embed(self._share(ids))

    def _forward(self, h: torch.Tensor, batch: ForwardBatch, cache: KVCache, pages: list[int] | None) -> torch.Tensor:
        """A prefill pass; ``pages`` (the block table as a host list) go to the workers with it."""
        scratch = None if cache is self.cache else cache.num_blocks
        self._announce("forward", shape=tuple(h.shape), dtype=_name(h.dtype), start=batch.context,
                       table=pages, scratch=scratch)
        return self.lm(self._share(h), batch, cache.k, cache.v)


def _merge(embeds: torch.Tensor, rows: torch.Tensor, feats: torch.Tensor) -> None:
    """An item's packed features over its rows; with fewer rows (the head of the item is in the
    cached prefix) its last ones."""
    embeds.index_copy_(0, rows, feats[feats.shape[0] - rows.shape[0] :].to(embeds.dtype))


def _tile_count(item: VisualItem) -> int:
    if item.tiles is not None:
        return len(item.tiles)
    if item.kind == "video":
        return len(item.rgb)
    if item.kind == "image_multi":
        return 1
    gh, gw = item.layout["grid"]
    return 1 + gh * gw


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
