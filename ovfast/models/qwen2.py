"""Qwen2 decoder over ovfast's static KV cache (docs/reference-behaviour.md section 8).

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
from ..distributed import ShardPlan, TensorParallel, plan_shards


@dataclass
class ForwardBatch:
    """Where each row of a forward pass lives in the paged KV cache, and how it attends.

    ``slot_mapping`` holds each row's flat cache index (page * block_size + offset), where its
    K/V are written. Prefill: rows are one sequence's positions ``context``.. (a chunk), attending
    causally to the sequence's cached pages (``block_table``) and themselves. Decode: row b is
    one new token of sequence b, attending to its first ``seq_lens[b]`` positions through row b
    of ``block_tables``.
    """

    positions: torch.Tensor  # (T,) int64: position of each row in its sequence
    slot_mapping: torch.Tensor  # (T,) int64: flat cache index of each row's K/V
    cu_seqlens: torch.Tensor | None = None  # prefill: (2,) int32 bounds of the chunk
    max_seqlen: int = 0
    context: int = 0  # prefill: positions of the sequence already cached before these rows
    block_table: torch.Tensor | None = None  # prefill: (max_blocks,) int32 pages of the sequence
    block_tables: torch.Tensor | None = None  # decode: (B, max_blocks) int32 pages of each row
    seq_lens: torch.Tensor | None = None  # decode: (B,) int32 valid positions per row, this token included

    @property
    def is_prefill(self) -> bool:
        return self.cu_seqlens is not None

    @classmethod
    def prefill(cls, block_table: torch.Tensor, block_size: int, length: int, start: int = 0) -> "ForwardBatch":
        """Positions start..start+length-1 of the sequence whose pages are ``block_table`` (a device
        int32 tensor); start > 0: a later chunk, or a prompt whose prefix came from the cache."""
        device = block_table.device
        positions = torch.arange(start, start + length, device=device)
        return cls(
            positions=positions,
            slot_mapping=flat_slots(block_table[None].expand(length, -1), positions, block_size),
            cu_seqlens=torch.tensor([0, length], dtype=torch.int32, device=device),
            max_seqlen=length,
            context=start,
            block_table=block_table,
        )

    @classmethod
    def decode(cls, positions: torch.Tensor, block_tables: torch.Tensor, block_size: int,
               seq_lens: torch.Tensor | None = None) -> "ForwardBatch":
        """One token for each of rows 0..B-1 at ``positions`` (by default every row active)."""
        b = positions.shape[0]
        seq_lens = (positions + 1).to(torch.int32) if seq_lens is None else seq_lens
        # An idle row (length 0) writes to the null page, whatever its table holds: a sequence
        # still prefilling has its pages in its row already, and they may be shared.
        slots = torch.where(seq_lens > 0, flat_slots(block_tables[:b], positions, block_size), 0)
        return cls(positions=positions, slot_mapping=slots, block_tables=block_tables, seq_lens=seq_lens)


def flat_slots(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache index of each row's position: tables (T, max_blocks) row t the pages of row t's
    sequence. On the device, no host reads: it runs inside a captured decode step."""
    pages = tables.gather(1, (positions // block_size)[:, None]).squeeze(1).long()
    return pages * block_size + positions % block_size


class Qwen2DecoderLayer(nn.Module):
    """One decoder layer, or this rank's share of it: ``plan``'s query heads, key/value heads and
    MLP columns. Column-parallel q/k/v and gate/up, row-parallel o and down, one all-reduce after
    each of the two (Megatron); with one rank the plan is everything and nothing is reduced."""

    def __init__(self, cfg: TextConfig, plan: ShardPlan, tp: TensorParallel | None = None):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg, self.tp = cfg, tp
        self.heads, self.kv_heads, inter = len(plan.q_heads), len(plan.kv_heads), len(plan.intermediate)
        self.q_size, self.kv_size = self.heads * hd, self.kv_heads * hd
        self.input_layernorm = nn.Parameter(torch.empty(d))
        self.qkv_weight = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, d))
        self.qkv_bias = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size))
        self.o_weight = nn.Parameter(torch.empty(d, self.q_size))
        self.post_attention_layernorm = nn.Parameter(torch.empty(d))
        self.gate_up_weight = nn.Parameter(torch.empty(2 * inter, d))
        self.down_weight = nn.Parameter(torch.empty(d, inter))

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch,
        k_cache: torch.Tensor, v_cache: torch.Tensor, cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if residual is None:
            residual, x = h, ops.rms_norm(h, self.input_layernorm, cfg.rms_norm_eps)
        else:
            x, residual = ops.rms_norm(h, self.input_layernorm, cfg.rms_norm_eps, residual)
        qkv = ops.linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        n = h.shape[0]
        q = q.view(n, self.heads, cfg.head_dim)
        k = k.view(n, self.kv_heads, cfg.head_dim)
        v = v.view(n, self.kv_heads, cfg.head_dim)
        ops.rope(q, k, batch.positions, cos_sin)
        k_cache.view(-1, self.kv_heads, cfg.head_dim).index_copy_(0, batch.slot_mapping, k)
        v_cache.view(-1, self.kv_heads, cfg.head_dim).index_copy_(0, batch.slot_mapping, v)
        scale = cfg.head_dim**-0.5
        if batch.is_prefill and batch.context:
            attn = ops.attention_chunk(q, k_cache, v_cache, batch.block_table, batch.context, scale=scale)
        elif batch.is_prefill:
            attn = ops.attention_prefill(q, k, v, batch.cu_seqlens, batch.max_seqlen, causal=True, scale=scale)
        else:
            attn = ops.attention_decode(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, scale=scale)
        h = self._reduce(ops.linear(attn.reshape(n, self.q_size), self.o_weight))
        x, residual = ops.rms_norm(h, self.post_attention_layernorm, cfg.rms_norm_eps, residual)
        h = self._reduce(ops.linear(ops.silu_mul(ops.linear(x, self.gate_up_weight)), self.down_weight))
        return h, residual

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return partial if self.tp is None else self.tp.all_reduce(partial)


class Qwen2ForCausalLM(nn.Module):
    """The decoder, or this rank's share of it (see ``ovfast.distributed.plan``): vocabulary-parallel
    embedding and lm_head over the padded vocabulary, sharded layers, replicated norms."""

    def __init__(self, cfg: TextConfig, plan: ShardPlan | None = None, tp: TensorParallel | None = None):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.plan = plan = plan or plan_shards(cfg)
        rows = len(plan.vocab)
        self.embed_tokens = nn.Parameter(torch.empty(rows, cfg.hidden_size))
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, plan, tp) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size))
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else nn.Parameter(torch.empty(rows, cfg.hidden_size))
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def tie_and_zero_padding(self) -> None:
        """After ``to_empty``: tie the head again and zero the padding rows past the real vocabulary."""
        if self.cfg.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        pad = len(self.plan.vocab) - len(self.plan.vocab_rows)
        if pad:
            with torch.no_grad():
                self.embed_tokens[-pad:].zero_()
                self.lm_head[-pad:].zero_()  # (the same rows again when tied)

    def set_max_positions(self, n: int) -> None:
        """Precompute the RoPE table for positions 0..n-1 (fp32, on the model's device)."""
        self.cos_sin = ops.rope_cos_sin_cache(self.cfg.head_dim, self.cfg.rope_theta, n, device=self.embed_tokens.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(ids, self.embed_tokens)
        # Vocabulary-parallel: each rank looks up the ids in its rows, zeros elsewhere, and the sum is the row.
        local = ids - self.plan.vocab.start
        mine = (local >= 0) & (local < len(self.plan.vocab))
        h = F.embedding(torch.where(mine, local, 0), self.embed_tokens) * mine[:, None].to(self.embed_tokens.dtype)
        return self.tp.all_reduce(h)

    def forward(self, h: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """h (T, D) input embeddings -> (T, D) final-normed hidden states; writes the cache in place.

        k_cache and v_cache are (layers, num_blocks, block_size, kv_heads, head_dim) (this rank's kv heads).
        """
        fused = None
        if not batch.is_prefill and self.tp is None and len(self.layers) and ops.fused_decode(h.device):
            # CPU: the whole layer stack in one kernel call (ovfast.ops.cpu_native.decode_layers)
            fused = ops.cpu_native.decode_layers(self.layers, h, batch, k_cache, v_cache, self.cos_sin)
        if fused is not None:
            h, residual = fused
        else:
            residual = None
            for i, layer in enumerate(self.layers):
                h, residual = layer(h, residual, batch, k_cache[i], v_cache[i], self.cos_sin)
        h, _ = ops.rms_norm(h, self.norm, self.cfg.rms_norm_eps, residual)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the (padded) vocabulary; under tensor parallelism gathered from every rank."""
        x = ops.linear(h, self.lm_head)
        if self.tp is not None:
            x = self.tp.gather_columns(x)[:, : self.cfg.vocab_size]
        return x.float()

    def weight_destinations(self) -> dict[str, tuple[torch.Tensor, slice | None, tuple | None]]:
        """Canonical name -> (parameter, its row slice or None, the index into the checkpoint tensor
        this rank reads, or None for all of it). Each rank reads only its own slices."""
        t, p = self.cfg, self.plan
        hd = t.head_dim
        full = p.size == 1

        def rows(r: range, scale: int = 1) -> tuple | None:
            return None if full else (slice(r.start * scale, r.stop * scale),)

        def cols(r: range) -> tuple | None:
            return None if full else (slice(None), slice(r.start, r.stop))

        q, kv, inter = self.layers[0].q_size if self.layers else 0, len(p.kv_heads) * hd, len(p.intermediate)
        vocab = p.vocab_rows
        vocab_index = None if full else (slice(vocab.start, vocab.stop),)
        dest = {"lm.embed_tokens.weight": (self.embed_tokens, slice(0, len(vocab)), vocab_index),
                "lm.norm.weight": (self.norm, None, None)}
        if not t.tie_word_embeddings:
            dest["lm_head.weight"] = (self.lm_head, slice(0, len(vocab)), vocab_index)
        for i, layer in enumerate(self.layers):
            pre = f"lm.layers.{i}."
            for proj, where, heads in (("q_proj", slice(0, q), p.q_heads), ("k_proj", slice(q, q + kv), p.kv_heads),
                                       ("v_proj", slice(q + kv, q + 2 * kv), p.kv_heads)):
                dest[pre + f"self_attn.{proj}.weight"] = (layer.qkv_weight, where, rows(heads, hd))
                dest[pre + f"self_attn.{proj}.bias"] = (layer.qkv_bias, where, rows(heads, hd))
            dest[pre + "self_attn.o_proj.weight"] = (layer.o_weight, None, None if full else
                                                     (slice(None), slice(p.q_heads.start * hd, p.q_heads.stop * hd)))
            dest[pre + "mlp.gate_proj.weight"] = (layer.gate_up_weight, slice(0, inter), rows(p.intermediate))
            dest[pre + "mlp.up_proj.weight"] = (layer.gate_up_weight, slice(inter, 2 * inter), rows(p.intermediate))
            dest[pre + "mlp.down_proj.weight"] = (layer.down_weight, None, cols(p.intermediate))
            dest[pre + "input_layernorm.weight"] = (layer.input_layernorm, None, None)
            dest[pre + "post_attention_layernorm.weight"] = (layer.post_attention_layernorm, None, None)
        return dest
