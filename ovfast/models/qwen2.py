"""Qwen2 decoder over ovfast's static KV cache (REFERENCE.md section 8).

Pre-norm layers with fused q/k/v (with bias) and fused gate/up projections. Every forward pass,
prefill or decode, reads and writes one preallocated cache in place; what kind of pass it is and
where each row goes is described by a ``ForwardBatch``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..checkpoint.config import TextConfig


@dataclass
class ForwardBatch:
    """Where each row of a forward pass lives in the KV cache, and how it attends.

    Prefill: rows are whole prompts packed back to back (``cu_seqlens``), attending causally to
    their own prompt. Decode: row b is one new token of the sequence in cache slot b, attending
    to that slot's first ``seq_lens[b]`` positions.
    """

    positions: torch.Tensor  # (T,) int64: position of each row in its sequence
    slots: torch.Tensor  # (T,) int64: cache slot of each row
    cu_seqlens: torch.Tensor | None = None  # prefill: (B+1,) int32 sequence bounds
    max_seqlen: int = 0
    seq_lens: torch.Tensor | None = None  # decode: (B,) int32 valid positions per slot, this token included
    context: int = 0  # chunked prefill of one sequence: its positions already cached before these rows
    slot: int = 0  # ... and its slot

    @property
    def is_prefill(self) -> bool:
        return self.cu_seqlens is not None

    @classmethod
    def prefill(cls, slot: int, length: int, device, start: int = 0) -> "ForwardBatch":
        """Prompt positions start..start+length-1 of the sequence in ``slot`` (start > 0: a later chunk)."""
        positions = torch.arange(start, start + length, device=device)
        return cls(
            positions=positions,
            slots=torch.full((length,), slot, dtype=torch.int64, device=device),
            cu_seqlens=torch.tensor([0, length], dtype=torch.int32, device=device),
            max_seqlen=length,
            context=start,
            slot=slot,
        )

    @classmethod
    def decode(cls, positions: torch.Tensor) -> "ForwardBatch":
        """One token for each of slots 0..B-1 at the given positions."""
        return cls(
            positions=positions,
            slots=torch.arange(positions.shape[0], device=positions.device),
            seq_lens=(positions + 1).to(torch.int32),
        )


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_size, self.kv_size = cfg.num_heads * hd, cfg.num_kv_heads * hd
        self.input_layernorm = nn.Parameter(torch.empty(d))
        self.qkv_weight = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, d))
        self.qkv_bias = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size))
        self.o_weight = nn.Parameter(torch.empty(d, self.q_size))
        self.post_attention_layernorm = nn.Parameter(torch.empty(d))
        self.gate_up_weight = nn.Parameter(torch.empty(2 * cfg.intermediate_size, d))
        self.down_weight = nn.Parameter(torch.empty(d, cfg.intermediate_size))

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
        k_cache: torch.Tensor, v_cache: torch.Tensor, cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if residual is None:
            residual, x = h, ops.rms_norm(h, self.input_layernorm, cfg.rms_norm_eps)
        else:
            x, residual = ops.rms_norm(h, self.input_layernorm, cfg.rms_norm_eps, residual)
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        n = h.shape[0]
        q = q.view(n, cfg.num_heads, cfg.head_dim)
        k = k.view(n, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(n, cfg.num_kv_heads, cfg.head_dim)
        ops.rope(q, k, batch.positions, cos_sin)
        k_cache[batch.slots, batch.positions] = k
        v_cache[batch.slots, batch.positions] = v
        scale = cfg.head_dim**-0.5
        if batch.is_prefill and batch.context:
            attn = ops.attention_chunk(q, k_cache[batch.slot], v_cache[batch.slot], batch.context, scale=scale)
        elif batch.is_prefill:
            attn = ops.attention_prefill(q, k, v, batch.cu_seqlens, batch.max_seqlen, causal=True, scale=scale)
        else:
            attn = ops.attention_decode(q, k_cache, v_cache, batch.seq_lens, scale=scale)
        h = F.linear(attn.reshape(n, self.q_size), self.o_weight)
        x, residual = ops.rms_norm(h, self.post_attention_layernorm, cfg.rms_norm_eps, residual)
        h = F.linear(ops.silu_mul(F.linear(x, self.gate_up_weight)), self.down_weight)
        return h, residual


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size))
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else nn.Parameter(
            torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def set_max_positions(self, n: int) -> None:
        """Precompute the RoPE table for positions 0..n-1 (fp32, on the model's device)."""
        self.cos_sin = ops.rope_cos_sin_cache(self.cfg.head_dim, self.cfg.rope_theta, n, device=self.embed_tokens.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_tokens)

    def forward(self, h: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """h (T, D) input embeddings -> (T, D) final-normed hidden states; writes the cache in place.

        k_cache and v_cache are (layers, slots, max_len, kv_heads, head_dim).
        """
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, batch, k_cache[i], v_cache[i], self.cos_sin)
        h, _ = ops.rms_norm(h, self.norm, self.cfg.rms_norm_eps, residual)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the (padded) vocabulary."""
        return F.linear(h, self.lm_head).float()
