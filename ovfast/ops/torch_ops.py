"""The operations optimised kernels replace, each behind one function with its plain-torch version.

Model code calls only these for the hot steps. The bodies here are the reference semantics (and
what runs on the CPU): they follow transformers' operation order and dtype casts, so the models
built on them match ``LlavaOnevisionForConditionalGeneration``. Each op is ``@dispatch``ed: with
kernels enabled (see ``ovfast.ops.backends``) the same-named function of ``ovfast.kernels`` runs
instead, and ``op.reference`` is the torch body the kernel tests compare against. Tensor layouts
are the ones the Triton and flash-attn backends use (packed [tokens, heads, head_dim]
activations, a paged KV cache of [num_blocks, block_size, kv_heads, head_dim] per layer read
through block tables).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import dispatch

DISPATCHED = (
    "patch_embed", "bilinear_resize", "projector", "rms_norm", "rope", "silu_mul", "attention_prefill",
    "attention_chunk", "attention_decode", "linear", "linear_gelu",
)


# --- vision -------------------------------------------------------------------------------------


@dispatch
def patch_embed(
    pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor,
    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-overlapping patch embedding plus learned positions.

    pixels (N, 3, H, W), any strides, float or uint8; weight (D, 3, p, p), bias (D,), pos_embed
    (P, D) -> (N, P, D) with P = (H // p) * (W // p); pixels past the last whole patch are ignored.
    Equal to conv2d(pixels * scale + shift, weight, bias, stride=p).flatten(2).transpose(1, 2)
    + pos_embed, where the optional per-channel (3,) scale and shift fold the normalisation in
    (computed in fp32) and the conv runs in the weight's dtype.
    """
    x = pixels
    if scale is not None or shift is not None:
        x = x.float()
        x = x * scale.view(1, -1, 1, 1) if scale is not None else x
        x = x + shift.view(1, -1, 1, 1) if shift is not None else x
    y = F.conv2d(x.to(weight.dtype), weight, bias, stride=weight.shape[-1])  # (N, D, H/p, W/p)
    return y.flatten(2).transpose(1, 2) + pos_embed


@dispatch
def bilinear_resize(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bilinear resize of a channels-last map, align_corners=False and no antialias.

    x (B, H, W, C) -> (B, out_h, out_w, C); computed in fp32, rounded to x's dtype.
    """
    y = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(out_h, out_w), mode="bilinear", align_corners=False)
    return y.permute(0, 2, 3, 1).to(x.dtype)


@dispatch
def projector(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
    approximate: str = "none", out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The multimodal projector: gelu(x @ w1.T + b1) @ w2.T + b2 (erf GELU for LLaVA-OneVision).

    x (..., E) -> (..., D). With ``out`` (a tensor or view of that shape) the result is written
    there and ``out`` is returned.
    """
    y = F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
    return out.copy_(y) if out is not None else y


# --- decoder ------------------------------------------------------------------------------------


@dispatch
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Qwen2 RMSNorm: normalise in fp32, cast back to x's dtype, then multiply by the weight.

    With ``residual`` the sum x + residual (in x's dtype) is normalised and returned too:
    (normed, x + residual).
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return (out, x) if residual is not None else out


def rope_cos_sin_cache(head_dim: int, theta: float, max_positions: int, device=None) -> torch.Tensor:
    """(max_positions, head_dim) fp32 table: cos of each position's angles, then their sin.

    Angles are position * theta^(-2i/d) for i < d/2, computed in fp32 as transformers does.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    angles = torch.arange(max_positions, device=device).float()[:, None] * inv_freq
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


@dispatch
def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Half-split (NeoX) rotary embedding, in place on q (T, Hq, d) and k (T, Hkv, d).

    Pairs are (i, i + d/2). cos and sin are cast to the activation dtype before use, and the
    rotation is x*cos + rotate_half(x)*sin in that dtype, as in transformers.
    """
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions].to(q.dtype)  # (T, d)
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for x in (q, k):
        x1, x2 = x[..., :half], x[..., half:]
        rotated = torch.cat((x1 * cos + (-x2) * sin, x2 * cos + x1 * sin), dim=-1)
        x.copy_(rotated)


@dispatch
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: the decoder's projections, behind one name so the CPU can run its GEMV kernel."""
    return F.linear(x, weight, bias)


@dispatch
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                approximate: str = "none") -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))``: the vision MLP's first layer and its activation, one
    name so the CPU can run the activation vectorised and fold the bias into its pass."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


@dispatch
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused gate/up projection: silu(gate_up[..., :I]) * gate_up[..., I:]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# --- attention ----------------------------------------------------------------------------------


def _expand_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Repeat each kv head ``groups`` times along ``dim`` (kv head j serves query heads [j*g, (j+1)*g))."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, heads_axis: int, **kw) -> torch.Tensor:
    """SDPA with kv heads shared by ``groups`` query heads each. On the CPU the kernel reads the
    shared heads itself (``enable_gqa``: no copies of K and V, a third faster on a prefill chunk,
    the same result); elsewhere the heads are repeated, as always."""
    if groups > 1 and q.device.type == "cpu" and _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    return F.scaled_dot_product_attention(q, _expand_kv(k, groups, heads_axis), _expand_kv(v, groups, heads_axis), **kw)


@dispatch
def attention_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    causal: bool = True, scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed sequences.

    q (T, Hq, d), k and v (T, Hkv, d); sequence i is rows cu_seqlens[i]:cu_seqlens[i+1] (int32,
    (B+1,)). Returns (T, Hq, d). With causal=False it serves the SigLIP encoder.
    """
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    lengths = {b - a for a, b in zip(bounds, bounds[1:])}
    if len(lengths) == 1:  # equal lengths (always so for vision tiles): one batched call
        n = len(bounds) - 1
        s = lengths.pop()
        qb, kb, vb = (x.view(n, s, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        out = _sdpa(qb, kb, vb, groups, 1, is_causal=causal, scale=scale)
        return out.transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    for a, b in zip(bounds, bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
        o = _sdpa(qs, ks, vs, groups, 1, is_causal=causal, scale=scale)
        out[a:b] = o[0].transpose(0, 1)
    return out


@dispatch
def attention_chunk(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, start: int,
    scale: float | None = None,
) -> torch.Tensor:
    """A prompt chunk of one sequence against everything cached before it and itself (chunked prefill).

    q (T, Hq, d) holds positions start..start+T-1; k_cache and v_cache (num_blocks, block_size,
    Hkv, d) are one layer's pages, with the chunk's k/v already written; block_table (>= ceil((start
    + T) / block_size),) int32 lists the sequence's pages in order. Causal: row i sees positions
    <= start + i. Only the pages in use are read.
    """
    t, hq, d = q.shape
    total = start + t
    k, v = gather_pages(k_cache, v_cache, block_table[None], total)
    groups = hq // k.shape[2]
    mask = torch.arange(total, device=q.device)[None, :] <= start + torch.arange(t, device=q.device)[:, None]
    if q.device.type == "cpu":  # an additive mask in q's dtype: the CPU flash kernel skips its own conversion
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
    out = _sdpa(q.transpose(0, 1)[None], k[0].transpose(0, 1)[None], v[0].transpose(0, 1)[None], groups, 1,
                attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


@dispatch
def attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float | None = None,
) -> torch.Tensor:
    """One new query per sequence against its cached keys and values, read through its block table.

    q (B, Hq, d); k_cache and v_cache (num_blocks, block_size, Hkv, d) are one layer's pages with
    the new token's k/v already written; block_tables (>= B, max_blocks) int32, row b the pages of
    sequence b in order (unused entries may point anywhere, e.g. the null block 0); seq_lens (B,)
    int32 counts the valid positions of each row (0 for an idle row). Returns (B, Hq, d).
    """
    bsz, hq, d = q.shape
    s = max(int(seq_lens.max()), 1)  # inactive rows have length 0
    k, v = gather_pages(k_cache, v_cache, block_tables[:bsz], s)  # (B, S, Hkv, d)
    hkv = k.shape[2]
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, S, d)
    # Each kv head answers its whole query group at once: the group becomes the query axis.
    qg = q.view(bsz, hkv, hq // hkv, d)
    mask = None
    if bsz > 1 or s != int(seq_lens.min()):
        mask = torch.arange(s, device=q.device)[None, :] < seq_lens[:, None].to(q.device)  # (B, S)
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # (B, Hkv, g, d)
    return out.reshape(bsz, hq, d)


def gather_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, length: int):
    """The first ``length`` positions of each table's sequence, (B, length, Hkv, d), gathering only
    the pages that hold them."""
    bs = k_cache.shape[1]
    pages = tables[:, : -(-length // bs)].long()  # (B, n)
    b, n = pages.shape
    k = k_cache[pages].reshape(b, n * bs, *k_cache.shape[2:])[:, :length]
    v = v_cache[pages].reshape(b, n * bs, *v_cache.shape[2:])[:, :length]
    return k, v


# --- sampling -----------------------------------------------------------------------------------


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, noise: torch.Tensor,
) -> torch.Tensor:
    """Next token per row of logits (B, V); no host synchronisation, so it can live in a CUDA graph.

    Rows with temperature 0 take the argmax (the first on ties, as torch and transformers do).
    Other rows: logits / temperature, then top-k (0 = off), then top-p (1.0 = off; the smallest
    set of most likely tokens whose probability reaches top_p, never empty), then a draw using
    ``noise`` (B, V) of Exp(1) samples the caller takes from each request's own generator: the
    exponential race argmax(p / E) picks token i with probability p_i.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    x = logits / temperature.clamp_min(1e-6)[:, None]
    vocab = x.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    sorted_x, order = x.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=x.device)[None, :]
    sorted_x = sorted_x.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p.
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p[:, None]) & (ranks > 0), 0.0)
    picked = order.gather(-1, (probs / noise).argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature > 0, picked, greedy)
