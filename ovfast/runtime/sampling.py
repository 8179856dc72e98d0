"""Choosing each row's next token on the device: penalties, temperature, top-k / top-p / min-p,
the draw, and log-probabilities, without one host synchronisation (so it runs inside a captured
decode step).

Draws are keyed, not streamed: the Exp(1) noise of a row is a hash of (request seed, position,
token id), so a seeded request draws the same tokens whatever else shares its batch, however its
prompt was chunked, and with or without CUDA graphs, and one step fills the noise of every row at
once. The exponential race argmax(p_i / E_i) picks token i with probability p_i.

Top-k and top-p need the most likely tokens in order; instead of sorting the vocabulary per row,
the step ranks only the top ``CANDIDATES`` (a ``topk``). Probabilities keep the full softmax
denominator, so the kept set is exact whenever it lies within the candidates: always for
top_k <= CANDIDATES, and for top-p when the candidates hold top_p of the mass. Rows whose nucleus
reaches past the candidates (top_p = 1, or a very flat distribution) race over every token
instead, min-p still applied: exact for plain temperature sampling.
"""
from __future__ import annotations

import torch

CANDIDATES = 1024
MAX_LOGPROBS = 20



def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


# splitmix64 constants as signed int64 (torch has no uint64 arithmetic; products wrap modulo 2**64).
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_POSITION = _signed(0x632BE59BD9B4E019)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def keyed_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) float32 Exp(1) samples, a pure function of (seed, position, token id) per row."""
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    z = (seeds * _GOLDEN + positions * _POSITION)[:, None] + ids[None, :]
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    u = (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # 24 bits: uniform in (0, 1)
    return -torch.log(u)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, repetition: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty over prompt and output tokens (``seen``), then OpenAI's
    presence and frequency penalties over output tokens (``counts``). Neutral rows (1, 0, 0) come
    back bit-identical."""
    rep = repetition[:, None]
    x = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    c = counts.to(x.dtype)
    return x - frequency[:, None] * c - presence[:, None] * (c > 0).to(x.dtype)


def choose(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           min_p: torch.Tensor, noise: torch.Tensor, candidates: int = CANDIDATES) -> torch.Tensor:
    """Next token per row of fp32 ``logits`` (B, V); temperature 0 is the argmax (first on ties)."""
    greedy = logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    c = min(vocab, candidates)
    x = logits / temperature.clamp_min(1e-6)[:, None]
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    top_x, top_ids = x.topk(c, dim=-1)  # sorted, most likely first
    probs = (top_x - lse).exp()
    ranks = torch.arange(c, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))[:, None]
    in_k = ranks < k
    # top-p after top-k, as transformers' warpers chain them: mass renormalised over the top k.
    mass = torch.where(in_k, probs, 0.0)
    mass = mass / torch.where(k <= c, mass.sum(dim=-1, keepdim=True), 1.0)
    before = mass.cumsum(dim=-1) - mass  # mass of the tokens ranked above
    floor = min_p[:, None] * probs[:, :1]
    keep = in_k & ((before < top_p[:, None]) | (ranks == 0)) & (probs >= floor)
    race = torch.where(keep, probs / noise.gather(-1, top_ids), -1.0)
    picked = top_ids.gather(-1, race.argmax(dim=-1, keepdim=True)).squeeze(-1)
    # The nucleus reaches past the candidates: race over the whole vocabulary (min-p still holds).
    wide = (k[:, 0] > c) & (probs.sum(dim=-1) < top_p)
    full = (x - lse).exp()
    full_race = torch.where(full >= floor, full / noise, -1.0)
    picked = torch.where(wide, full_race.argmax(dim=-1), picked)
    return torch.where(temperature > 0, picked, greedy)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int = MAX_LOGPROBS):
    """Log-probabilities under the model's own distribution (before penalties and temperature):
    (chosen (B,), top values (B, n), top ids (B, n))."""
    lp = torch.log_softmax(logits, dim=-1)
    top_lp, top_ids = lp.topk(min(n, lp.shape[-1]), dim=-1)
    return lp.gather(-1, tokens[:, None]).squeeze(-1), top_lp, top_ids
