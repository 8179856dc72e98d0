"""The decode step over static buffers, captured as CUDA graphs per batch bucket.

One step takes, for rows 0..b-1 (row r = KV-cache slot r), the input token and its position,
runs the decoder (embedding lookup through sampling) and writes the next token. Every tensor it
reads or writes lives at a fixed address: the input tokens, positions, sequence lengths,
sampling parameters and noise, the output tokens and the KV cache. The step also feeds its output
back: an active row's next input is the token it just sampled, one position further. So the host
only writes a row when a sequence enters its slot (``admit``) or leaves it (``retire``), and steps
can be queued back to back while the host reads the tokens of the previous one.

On CUDA, with the Triton attention kernel available (the torch attention reads ``seq_lens`` on the
host), each bucket (1, 2, 4, ... up to the slot count) is captured once, on first use or by
``capture_all``, in a greedy and a sampling variant; steps replay the graph. Elsewhere, and with
``OVFAST_CUDA_GRAPHS=0``, the same step runs eagerly.
"""
from __future__ import annotations

import os
import time

import torch

from ..models.qwen2 import ForwardBatch, Qwen2ForCausalLM
from ..ops import sample
from ..ops.backends import kernel_for
from .kv_cache import KVCache


def buckets(max_batch: int) -> list[int]:
    """Batch widths a step is compiled for: powers of two, and the slot count itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class DecodeRunner:
    def __init__(self, lm: Qwen2ForCausalLM, cache: KVCache, device: torch.device):
        self.lm, self.cache, self.device = lm, cache, device
        n = cache.slots
        self.buckets = buckets(n)
        long = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(n, **long)  # input token of each row
        self.positions = torch.zeros(n, **long)  # its position in the sequence
        self.active = torch.zeros(n, dtype=torch.bool, device=device)  # rows that advance
        self.slots = torch.arange(n, **long)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.temperature = torch.zeros(n, dtype=torch.float32, device=device)
        self.top_p = torch.ones(n, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(n, **long)
        self.noise = torch.ones(n, lm.cfg.vocab_size, dtype=torch.float32, device=device)
        self.out = torch.zeros(n, **long)  # the sampled tokens
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.capture_ms = 0.0
        self.use_graphs = (
            device.type == "cuda"
            and os.environ.get("OVFAST_CUDA_GRAPHS", "1") != "0"
            and kernel_for("attention_decode", device) is not None
        )
        self._pool = None

    # --- host-side row updates (between steps) ---------------------------------------------------

    def admit(self, slot: int, token: int, position: int, temperature: float, top_p: float, top_k: int) -> None:
        """A sequence enters ``slot``: its next input is ``token`` at ``position``."""
        self.tokens[slot] = token
        self.positions[slot] = position
        self.temperature[slot] = temperature
        self.top_p[slot] = top_p
        self.top_k[slot] = top_k
        self.active[slot] = True

    def retire(self, slot: int) -> None:
        """The slot's sequence is done: the row stops advancing (it idles on its last position)."""
        self.active[slot] = False

    def fill_noise(self, row: int, generator: torch.Generator | None) -> None:
        """Exponential noise for a sampling row's next draw, from that request's own generator."""
        self.noise[row].exponential_(generator=generator)

    # --- the step ---------------------------------------------------------------------------------

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def step(self, rows: int, sampling: bool) -> torch.Tensor:
        """Queue one step for rows 0..rows-1; returns the (bucket,) view of the output tokens."""
        b = self.bucket(rows)
        if not self.use_graphs:
            self._forward(b, sampling)
        else:
            graph = self.graphs.get((b, sampling)) or self._capture(b, sampling)
            graph.replay()
        return self.out[:b]

    def capture_all(self) -> float:
        """Capture every bucket in both variants now (largest first); returns the milliseconds spent."""
        if self.use_graphs:
            for b in reversed(self.buckets):
                for sampling in (False, True):
                    if (b, sampling) not in self.graphs:
                        self._capture(b, sampling)
        return self.capture_ms

    @torch.inference_mode()
    def _forward(self, b: int, sampling: bool) -> None:
        lm = self.lm
        tokens, positions, active = self.tokens[:b], self.positions[:b], self.active[:b]
        self.seq_lens[:b].copy_(positions + 1)
        batch = ForwardBatch(positions=positions, slots=self.slots[:b], seq_lens=self.seq_lens[:b])
        logits = lm.logits(lm(lm.embed(tokens), batch, self.cache.k, self.cache.v))
        if sampling:
            nxt = sample(logits, self.temperature[:b], self.top_p[:b], self.top_k[:b], self.noise[:b])
        else:
            nxt = logits.argmax(dim=-1)
        self.out[:b].copy_(nxt)
        tokens.copy_(torch.where(active, nxt, tokens))
        positions.add_(active.long())

    def _capture(self, b: int, sampling: bool) -> torch.cuda.CUDAGraph:
        t0 = time.perf_counter()
        # Warm up on a side stream (first-call allocations and autotuning stay out of the graph),
        # then capture into a pool shared by all buckets. The warm-up and capture steps compute on
        # whatever the buffers hold, so inactive rows are frozen and active ones are restored after.
        saved = (self.tokens.clone(), self.positions.clone())
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(b, sampling)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self._forward(b, sampling)
        self.tokens.copy_(saved[0])
        self.positions.copy_(saved[1])
        torch.cuda.synchronize(self.device)
        self.graphs[(b, sampling)] = graph
        self.capture_ms += (time.perf_counter() - t0) * 1e3
        return graph
