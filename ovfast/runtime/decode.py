"""The decode step over static buffers, captured as CUDA graphs per batch bucket.

One step takes, for rows 0..b-1 (row r: the sequence in slot r), the input token and its
position, runs the decoder (embedding lookup through token choice) and writes the next token.
Every tensor it reads or writes lives at a fixed address: input tokens, positions, block tables,
lengths, sampling and penalty parameters, token counts, the output tokens and log-probabilities,
and the paged KV cache. The step also feeds its output back: an active row's next input is the
token it just chose, one position further, its K/V written through its block table (the page
and offset computed on the device). So the host only writes a row when a sequence enters its
slot (``admit``), gains pages (``set_blocks``: the new entries only) or leaves (``retire``), and
steps can be queued back to back while the host reads the previous.

Rows that are not active (retired, never admitted, or padding of a bucket) have length 0, sit on
position 0 and point at the null page: their attention reads nothing and their K/V go to a page
no sequence owns, so they can never index past the cache or the RoPE table.

Two variants per bucket: plain greedy (argmax) and general (penalties, temperature, top-k/p,
min-p, keyed draws and log-probabilities; see ``sampling``); each also masked, for steps with a
constrained row (structured outputs): each row's token bitmask (``mask``, filled by the host
between steps; all ones for unconstrained rows) bans tokens before penalties and sampling. Steps
without a constrained row run exactly as before, and a masked step leaves an unconstrained row's
choice bit-identical. On CUDA, when the decode attention is a kernel (flash-attn or Triton: the
torch reference reads lengths on the host), every bucket (1, 2, 4, ... up to max_batch_size) is
captured in all four variants by ``capture_all``, which the engine calls at load (not at first
use: under tensor parallelism every rank must capture together); elsewhere, and with ``cuda_graphs=False`` (``OVFAST_CUDA_GRAPHS=0``), the
same step runs eagerly.
"""
from __future__ import annotations

import time

import torch

from ..distributed import TensorParallel
from ..models.qwen2 import ForwardBatch, Qwen2ForCausalLM
from ..ops.backends import kernel_for
from ..settings import environment
from . import sampling
from .kv_cache import KVCache
from .request import SamplingParams


def buckets(max_batch: int) -> list[int]:
    """Batch widths a step is compiled for: powers of two, and the slot count itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def _decode_attention_is_a_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    if kernel_for("attention_decode", device) is None:
        return False
    from ..kernels import attention_backend  # Triton is imported only where kernels run

    return attention_backend(device, dtype, head_dim) != "torch"


class DecodeRunner:
    """The decode step of one engine; under tensor parallelism, of one rank (``tp``).

    Rank 0's model runner announces each step (and each capture) to the workers; the step
    broadcasts its inputs (tokens, positions, which rows are active) at its start, inside the
    graph; every rank
    then runs the same sharded forward pass and gathers the logits; only rank 0 chooses tokens.
    """

    def __init__(self, lm: Qwen2ForCausalLM, cache: KVCache, device: torch.device, rows: int, max_blocks: int,
                 tp: TensorParallel | None = None, graphs: bool | None = None):
        self.lm, self.cache, self.device, self.tp = lm, cache, device, tp
        self.worker = tp is not None and tp.rank > 0
        n, vocab = rows, lm.cfg.vocab_size
        self.rows, self.max_blocks, self.block_size = n, max_blocks, cache.block_size
        self.buckets = buckets(n)
        long = dict(dtype=torch.long, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.tokens = torch.zeros(n, **long)  # input token of each row
        self.positions = torch.zeros(n, **long)  # its position in the sequence (idle rows: 0, on the null page)
        self.active = torch.zeros(n, dtype=torch.bool, device=device)  # rows that advance
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)  # row r: its pages
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.temperature = torch.zeros(n, **f32)
        self.top_p = torch.ones(n, **f32)
        self.top_k = torch.zeros(n, **long)
        self.min_p = torch.zeros(n, **f32)
        self.repetition = torch.ones(n, **f32)
        self.presence = torch.zeros(n, **f32)
        self.frequency = torch.zeros(n, **f32)
        self.seeds = torch.zeros(n, **long)
        self.counts = torch.zeros(n, vocab, dtype=torch.int32, device=device)  # output tokens so far
        self.seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)  # prompt and output tokens
        self.out = torch.zeros(n, **long)  # the chosen tokens
        self.out_logprob = torch.zeros(n, **f32)
        k = min(sampling.MAX_LOGPROBS, vocab)
        self.top_logprobs = torch.zeros(n, k, **f32)
        self.top_ids = torch.zeros(n, k, **long)
        # Structured outputs: each row's allowed tokens, bit j of word w standing for token 32 w + j
        # (xgrammar's layout); all ones (-1) for every row not constrained.
        self.mask = torch.full((n, (vocab + 31) // 32), -1, dtype=torch.int32, device=device)
        self._bit = torch.arange(32, dtype=torch.int32, device=device)
        self.constrained = [False] * n  # rows whose mask is set (host side: retire resets only those)
        # Tensor parallelism: tokens, positions, active and the block tables, broadcast at each step.
        self._step_inputs = torch.zeros((3 + max_blocks) * n, **long)
        self.graphs: dict[tuple[int, bool, bool], torch.cuda.CUDAGraph] = {}  # (bucket, general, masked)
        self.capture_ms = 0.0
        self.use_graphs = (
            device.type == "cuda"
            and (graphs if graphs is not None else environment.cuda_graphs())
            and _decode_attention_is_a_kernel(device, cache.k.dtype, cache.k.shape[-1])
        )
        self._pool = None

    # --- host-side row updates (between steps) ---------------------------------------------------

    def set_params(self, slot: int, p: SamplingParams, seed: int, prompt_ids: torch.Tensor,
                   answer: list[int] = ()) -> None:
        """A request takes ``slot``: its sampling parameters, its prompt as the tokens seen, and
        (resuming after a preemption) the tokens it had already generated but its last one, which
        ``admit`` counts as always."""
        self.temperature[slot] = p.temperature
        self.top_p[slot] = p.top_p
        self.top_k[slot] = p.top_k
        self.min_p[slot] = p.min_p
        self.repetition[slot] = p.repetition_penalty
        self.presence[slot] = p.presence_penalty
        self.frequency[slot] = p.frequency_penalty
        self.seeds[slot] = seed
        self.counts[slot].zero_()
        self.seen[slot].zero_()
        if p.repetition_penalty != 1.0:
            self.seen[slot, prompt_ids.to(self.device)] = True
        if answer:
            ids = torch.tensor(list(answer), dtype=torch.long).to(self.device)
            self.counts[slot].index_put_((ids,), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
            self.seen[slot, ids] = True

    def admit(self, slot: int, token: int, position: int) -> None:
        """The slot's sequence starts decoding: its next input is its first ``token`` at ``position``."""
        self.tokens[slot] = token
        self.positions[slot] = position
        self.counts[slot, token] += 1
        self.seen[slot, token] = True
        self.active[slot] = True

    def retire(self, slot: int) -> None:
        """The slot's sequence is done: the row stops, parks on position 0 and points at the null page."""
        self.active[slot] = False
        self.positions[slot] = 0
        self.block_tables[slot].zero_()
        if self.constrained[slot]:
            self.mask[slot].fill_(-1)
            self.constrained[slot] = False

    def set_mask(self, slot: int, words: torch.Tensor) -> None:
        """The row's allowed next tokens (a host int32 bitmask row; pinned on CUDA). Written only
        after a sync that follows the row's previous copy, so the host row is never in flight."""
        self.mask[slot].copy_(words, non_blocking=True)
        self.constrained[slot] = True

    def set_blocks(self, slot: int, start: int, blocks: list[int]) -> None:
        """Entries start.. of the row's block table (a sequence's pages, appended as it grows).

        From a pinned host copy, without a sync; torch's pinned-memory cache keeps that copy
        until the transfer has run, so a later update cannot overwrite it in flight."""
        if not blocks:
            return
        host = torch.tensor(blocks, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self.block_tables[slot, start : start + len(blocks)].copy_(host, non_blocking=True)

    # --- token choice (shared by the step and a prefill's first token) ----------------------------

    def choose(self, logits: torch.Tensor, rows: slice, positions: torch.Tensor, general: bool,
               masked: bool = False):
        """Next token of ``rows`` from fp32 ``logits``; with ``general`` also penalties and log-probabilities
        (written to ``out_logprob`` / ``top_logprobs`` / ``top_ids``); with ``masked`` only tokens the
        rows' ``mask`` allows (the log-probabilities stay the model's own). Sync-free."""
        x = self._allowed_only(logits, rows) if masked else logits
        if not general:
            return x.argmax(dim=-1)
        x = sampling.apply_penalties(x, self.counts[rows], self.seen[rows], self.repetition[rows],
                                     self.presence[rows], self.frequency[rows])
        noise = sampling.keyed_noise(self.seeds[rows], positions, x.shape[-1])
        nxt = sampling.choose(x, self.temperature[rows], self.top_p[rows], self.top_k[rows], self.min_p[rows], noise)
        chosen, top_lp, top_ids = sampling.token_logprobs(logits, nxt, self.top_ids.shape[1])
        self.out_logprob[rows].copy_(chosen)
        self.top_logprobs[rows].copy_(top_lp)
        self.top_ids[rows].copy_(top_ids)
        return nxt

    def _allowed_only(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """``logits`` with every token the rows' bitmask bans at -inf (all-ones rows: unchanged)."""
        bits = (self.mask[rows, :, None] >> self._bit) & 1  # arithmetic shift: bit 31 comes out right too
        allowed = bits.flatten(1)[:, : logits.shape[-1]].bool()
        return logits.masked_fill(~allowed, float("-inf"))

    # --- the step ---------------------------------------------------------------------------------

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def step(self, rows: int, sampling: bool, masked: bool = False) -> torch.Tensor:
        """Queue one step for rows 0..rows-1; returns the (bucket,) view of the output tokens.

        ``sampling``: the general variant (needed when any row samples, is penalised or wants
        log-probabilities); ``masked``: some row is constrained."""
        b = self.bucket(rows)
        if not self.use_graphs:
            self._forward(b, sampling, masked)
        else:
            graph = self.graphs.get((b, sampling, masked)) or self._capture(b, sampling, masked)
            graph.replay()
        return self.out[:b]

    def capture_all(self) -> float:
        """Capture every bucket in every variant now (largest first); returns the milliseconds spent."""
        if self.use_graphs:
            for b in reversed(self.buckets):
                for variant in ((False, False), (True, False), (False, True), (True, True)):
                    if (b, *variant) not in self.graphs:
                        self._capture(b, *variant)
        return self.capture_ms

    @torch.inference_mode()
    def _forward(self, b: int, general: bool, masked: bool = False) -> None:
        lm = self.lm
        tokens, positions, active, tables = self.tokens[:b], self.positions[:b], self.active[:b], self.block_tables[:b]
        if self.tp is not None:
            self._share_inputs(tokens, positions, active, tables)
        self.seq_lens[:b].copy_(torch.where(active, positions + 1, 0))
        batch = ForwardBatch.decode(positions, tables, self.block_size, self.seq_lens[:b])
        logits = lm.logits(lm(lm.embed(tokens), batch, self.cache.k, self.cache.v))
        if self.worker:  # rank 0 chooses; a worker's part ends with the logits gather
            return
        nxt = self.choose(logits, slice(0, b), positions, general, masked)
        self.out[:b].copy_(nxt)
        tokens.copy_(torch.where(active, nxt, tokens))
        if general:  # the penalties' bookkeeping (only the general variant reads it)
            self.counts[:b].scatter_add_(1, nxt[:, None], active[:, None].to(torch.int32))
            self.seen[:b].scatter_(1, nxt[:, None], self.seen[:b].gather(1, nxt[:, None]) | active[:, None])
        positions.copy_(torch.where(active, positions + 1, positions))

    def _share_inputs(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor,
                      tables: torch.Tensor) -> None:
        """Rank 0's step inputs into every rank's rows (one broadcast of a fixed buffer: graph-safe)."""
        b = tokens.shape[0]
        packed = self._step_inputs[: (3 + self.max_blocks) * b]
        rows, pages = packed[: 3 * b].view(3, b), packed[3 * b :].view(b, self.max_blocks)
        if not self.worker:
            rows[0].copy_(tokens)
            rows[1].copy_(positions)
            rows[2].copy_(active)
            pages.copy_(tables)
        self.tp.broadcast(packed)
        if self.worker:
            tokens.copy_(rows[0])
            positions.copy_(rows[1])
            active.copy_(rows[2].bool())
            tables.copy_(pages)

    def _capture(self, b: int, general: bool, masked: bool) -> torch.cuda.CUDAGraph:
        t0 = time.perf_counter()
        # Warm up on a side stream (first-call allocations and autotuning stay out of the graph),
        # then capture into a pool shared by all buckets. The warm-up and capture steps compute on
        # whatever the buffers hold, so the row state they advance is restored afterwards.
        saved = [t.clone() for t in (self.tokens, self.positions, self.counts, self.seen)]
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(b, general, masked)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # thread_local: preprocessing threads pinning host memory meanwhile cannot break the capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._forward(b, general, masked)
            for t, s in zip((self.tokens, self.positions, self.counts, self.seen), saved):
                t.copy_(s)
            torch.cuda.synchronize(self.device)
        self.graphs[(b, general, masked)] = graph
        self.capture_ms += (time.perf_counter() - t0) * 1e3
        return graph
