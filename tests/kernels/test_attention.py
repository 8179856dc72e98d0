"""Attention kernels (varlen prefill; paged split-KV decode and paged chunked prefill) and the
backend routing in front of them.

Kernels are compared with ``ovfast.ops.attention_*.reference`` (SDPA) under the flash-attention
rule: error against the fp32 reference at most twice the error of the same reference computed in
fp16/bf16, plus the dtype's rounding noise; fp32 within 1e-5. On the CPU they run in Triton's
interpreter with 32 x 16 prefill tiles, 16-key decode tiles and 16 x 16 chunk tiles, so the short,
awkward lengths below cross tile, page and split boundaries.

Paged caches (decode, chunks) are (num_blocks, block_size, Hkv, d) views of one buffer holding k
and v interleaved (so not contiguous), read through block tables whose page ids are shuffled (a
sequence's pages are scattered and out of order); every element an op must not read (other
sequences' pages, the null block 0 that padding entries point to, spare pages, positions past a
sequence's length in its last page) is NaN, so any stray read shows up.

Precision: the paged tests run fp32 and fp16 (and bf16 once per op). Triton 3.9's interpreter
returns garbage from ``tl.dot`` on bf16 operands, so under the interpreter the kernels upcast bf16
dot operands to fp32 (``DOT_FP32``): an interpreted bf16 test checks that workaround, not the
compiled bf16 path, which only the GPU tests below exercise.

flash-attn cannot run here: a fake ``flash_attn`` module that records its calls and computes with
the references tests the selection and the argument plumbing.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types

import pytest
import torch
from decoder_checks import DEVICE, DTYPE_IDS, DTYPES, assert_attention_close, assert_close

from ovfast import ops
from ovfast.ops import backends

kernels = importlib.import_module("ovfast.kernels")
routing = importlib.import_module("ovfast.kernels.attention")
prefill_mod = importlib.import_module("ovfast.kernels.prefill_attention")
decode_mod = importlib.import_module("ovfast.kernels.decode_attention")
chunk_mod = importlib.import_module("ovfast.kernels.chunk_attention")

# fp32 and fp16 for the paged kernels (see the module docstring on bf16 under the interpreter).
PAGED_DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 2.0**-10)]
PAGED_DTYPE_IDS = ["fp32", "fp16"]

# --- inputs -------------------------------------------------------------------------------------


def _packed_qkv(total, hq, hkv, d, dtype, seed):
    """q (T, Hq, d), k, v (T, Hkv, d) as strided views of one fused projection, like the models'."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(total, (hq + 2 * hkv) * d, generator=g).to(dtype).to(DEVICE)
    q = qkv[:, : hq * d].view(total, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(total, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(total, hkv, d)
    return q, k, v


def _cu(seqlens):
    return torch.tensor([0] + torch.tensor(seqlens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _paged_kv(lengths, bs, hkv, d, dtype, seed, spare=2, table_pad=1):
    """A paged cache holding one sequence per entry of ``lengths``, and its block tables.

    k_cache and v_cache (num_blocks, bs, Hkv, d) are strided views of one (num_blocks, bs, 2, Hkv, d)
    buffer. Page ids are a random permutation of 1..num_blocks-1 (block 0 is the null block), so a
    sequence's pages are scattered and out of order; ``spare`` pages belong to nobody. Table row i:
    sequence i's pages, then null entries (0) up to max pages + ``table_pad`` columns. Every
    element outside the sequences' valid positions is NaN.
    """
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // bs) for n in lengths]
    num_blocks = 1 + sum(pages) + spare
    ids = 1 + torch.randperm(num_blocks - 1, generator=g)
    tables = torch.zeros(len(lengths), max(pages, default=0) + table_pad, dtype=torch.int32)
    valid = torch.zeros(num_blocks, bs, dtype=torch.bool)
    used = 0
    for row, (n, p) in enumerate(zip(lengths, pages)):
        mine = ids[used: used + p]
        used += p
        tables[row, :p] = mine.to(torch.int32)
        valid[mine] = (torch.arange(p * bs) < n).view(p, bs)
    gd = torch.Generator(device=DEVICE).manual_seed(seed)
    kv = torch.randn(num_blocks, bs, 2, hkv, d, generator=gd, device=DEVICE).to(dtype)
    kv[~valid.to(DEVICE)] = float("nan")
    return kv[:, :, 0], kv[:, :, 1], tables.to(DEVICE)


def _decode_inputs(hq, hkv, d, bs, seq_lens, dtype, seed, extra_rows=2):
    """q (B, Hq, d) strided, the paged caches, block_tables (B + extra_rows, max_blocks) (the
    engine's table has a row per slot; the extra rows are null) and seq_lens (B,) int32."""
    bsz = len(seq_lens)
    kc, vc, tables = _paged_kv(seq_lens, bs, hkv, d, dtype, seed)
    tables = torch.cat([tables, torch.zeros(extra_rows, tables.shape[1], dtype=torch.int32, device=DEVICE)])
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    qkv = torch.randn(bsz, (hq + 2 * hkv) * d, generator=g, device=DEVICE).to(dtype)
    q = qkv[:, : hq * d].view(bsz, hq, d)
    return q, kc, vc, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)


def _decode_reference(q, kc, vc, tables, lens, dt, scale=None):
    """The reference row by row (each reads only its own pages, so the NaN elsewhere stays out);
    idle rows (length 0) are zeros, as the kernels write them."""
    out = torch.zeros(q.shape, dtype=dt, device=q.device)
    for b, n in enumerate(lens.tolist()):
        if n:
            out[b] = ops.attention_decode.reference(q[b: b + 1].to(dt), kc.to(dt), vc.to(dt), tables[b: b + 1],
                                                    lens[b: b + 1], scale=scale)[0]
    return out


def _chunk_inputs(t, start, hq, hkv, d, bs, dtype, seed, table_pad=1):
    """q (T, Hq, d) strided at positions start..start+T-1, the paged caches holding the sequence's
    start + T positions, and its block table (its pages, then ``table_pad`` null entries)."""
    kc, vc, tables = _paged_kv([start + t], bs, hkv, d, dtype, seed, table_pad=table_pad)
    q, _, _ = _packed_qkv(t, hq, hkv, d, dtype, seed + 1)
    return q, kc, vc, tables[0]


# --- prefill ------------------------------------------------------------------------------------

# (sequence lengths, Hq, Hkv, head_dim): GQA groups 3, 7, 1; SigLIP-like equal lengths with d = 72;
# an empty sequence in the middle of a pack.
PREFILL_CASES = [
    ([7], 3, 1, 16),
    ([1, 33, 7], 7, 1, 64),
    ([129, 1], 2, 2, 8),
    ([33, 33, 33], 4, 4, 72),
    ([5, 0, 12], 6, 2, 16),
    ([300, 77], 2, 1, 72),  # > 256 tokens: the interpreter's big tiles (128 x 128)
]


def _check_prefill(seqlens, hq, hkv, d, causal, dtype, seed=0, max_seqlen=None, scale=None):
    q, k, v = _packed_qkv(sum(seqlens), hq, hkv, d, dtype, seed)
    cu = _cu(seqlens)
    max_seqlen = max_seqlen or max(seqlens)
    out = prefill_mod.attention_prefill(q, k, v, cu, max_seqlen, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype

    def reference(dt):
        return ops.attention_prefill.reference(q.to(dt), k.to(dt), v.to(dt), cu, max(seqlens), causal=causal,
                                               scale=scale)

    assert_attention_close(out, reference, dtype)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seqlens,hq,hkv,d", PREFILL_CASES, ids=lambda x: str(x).replace(" ", ""))
def test_prefill_matches_reference(seqlens, hq, hkv, d, causal, dtype, atol, rtol):
    _check_prefill(seqlens, hq, hkv, d, causal, dtype, seed=sum(seqlens) + d)


def test_prefill_grid_from_an_upper_bound_and_custom_scale():
    """max_seqlen only sizes the grid: a larger bound changes nothing; scale is honoured."""
    _check_prefill([9, 20], 4, 2, 16, True, torch.float32, max_seqlen=70)
    _check_prefill([9, 20], 4, 2, 16, False, torch.float32, scale=0.3)


def test_prefill_contiguous_inputs_and_blocks_equal(monkeypatch):
    """Contiguous q/k/v, and BLOCK_M == BLOCK_N (the causal diagonal is then a single key block)."""
    q, k, v = (x.contiguous() for x in _packed_qkv(40, 6, 2, 16, torch.float16, seed=4))
    cu = _cu([17, 23])
    monkeypatch.setattr(prefill_mod, "_config", lambda d, n, e: (16, 16, 4, 1))
    for causal in (True, False):
        out = prefill_mod.attention_prefill(q, k, v, cu, 23, causal=causal)
        assert_attention_close(out, lambda dt: ops.attention_prefill.reference(
            q.to(dt), k.to(dt), v.to(dt), cu, 23, causal=causal), torch.float16)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_prefill_with_the_gpu_tiles(causal, monkeypatch):
    """The H100 tiles (128 x 64) on sequences that cross them, SigLIP's head dim."""
    monkeypatch.setattr(prefill_mod, "_config", lambda d, n, e: (128, 64, 4, 2))
    _check_prefill([300, 77, 129], 2, 1, 72, causal, torch.bfloat16, seed=7)


def test_prefill_causality_and_packing():
    """Row i of a sequence ignores later rows and other sequences (changing them leaves it alone)."""
    q, k, v = _packed_qkv(30, 2, 1, 16, torch.float32, seed=5)
    cu = _cu([10, 20])
    out = prefill_mod.attention_prefill(q, k, v, cu, 20, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[15:], v2[15:] = k2[15:] * 3 + 1, v2[15:] - 2  # rows 15.. of the second sequence
    out2 = prefill_mod.attention_prefill(q, k2, v2, cu, 20, causal=True)
    assert torch.equal(out[:15], out2[:15])
    assert not torch.allclose(out[15:], out2[15:])


def test_prefill_rejects_bad_input():
    q, k, v = _packed_qkv(8, 4, 2, 16, torch.float32, seed=6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefill_mod.attention_prefill(q, k, v, _cu([8]).long(), 8)
    with pytest.raises(ValueError, match="multiple"):
        prefill_mod.attention_prefill(q, k[:, :1].expand(8, 3, 16), v[:, :1].expand(8, 3, 16), _cu([8]), 8)


# --- paged decode -------------------------------------------------------------------------------

# (Hq, Hkv, head_dim, block_size, seq_lens): idle rows (0), lengths exactly on a page boundary
# (16, 64; 96), one-position rows, GQA groups 1, 3 and 7. The interpreter's split count (8 "SMs")
# comes out 1, 2 and 8 for these batches.
DECODE_CASES = [
    (4, 4, 64, 16, [0, 16, 37, 1, 64]),
    (6, 2, 128, 32, [45, 0, 96, 3]),
    (7, 1, 64, 32, [33, 100]),
]


def _decode_id(case):
    hq, hkv, d, bs, lens = case
    return f"{hq}x{hkv}x{d}-p{bs}-" + ",".join(map(str, lens))


def _check_decode(case, dtype, seed=0, scale=None):
    hq, hkv, d, bs, seq_lens = case
    q, kc, vc, tables, lens = _decode_inputs(hq, hkv, d, bs, seq_lens, dtype, seed)
    out = decode_mod.attention_decode(q, kc, vc, tables, lens, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    idle = [b for b, n in enumerate(seq_lens) if n == 0]
    assert torch.equal(out[idle], torch.zeros_like(out[idle])), "idle rows must be zeros"
    assert_attention_close(out, lambda dt: _decode_reference(q, kc, vc, tables, lens, dt, scale=scale), dtype)


@pytest.mark.parametrize("dtype,atol,rtol", PAGED_DTYPES, ids=PAGED_DTYPE_IDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=_decode_id)
def test_decode_matches_reference(case, dtype, atol, rtol):
    _check_decode(case, dtype, seed=sum(case[4]))


def test_decode_bf16_under_the_interpreter_workaround():
    """bf16 through the interpreter's fp32-dot workaround (see the module docstring)."""
    _check_decode(DECODE_CASES[1], torch.bfloat16, seed=5)


@pytest.mark.parametrize("block_n,splits,case", [
    (64, 3, DECODE_CASES[0]),  # a key tile gathers 4 pages of 16
    (16, 12, DECODE_CASES[1]),  # tiles are half pages; more splits than tiles (some empty)
    (32, 1, DECODE_CASES[2]),  # one split: no combine pass
], ids=["tile4pages-3splits", "halfpage-12splits", "1split"])
def test_decode_tiles_and_splits(block_n, splits, case, monkeypatch):
    monkeypatch.setattr(decode_mod, "_config", lambda d, cap: (block_n, 1, 1))
    monkeypatch.setattr(decode_mod, "num_splits", lambda *a: splits)
    _check_decode(case, torch.float32, seed=splits, scale=0.2)
    _check_decode(case, torch.float16, seed=splits)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_idle_rows_give_zeros_and_poison_nothing(splits, monkeypatch):
    """An idle row (seq_len 0) with a NaN query and a table row of null entries writes zeros and
    leaves the other rows exact; int64 seq_lens and tables work too."""
    monkeypatch.setattr(decode_mod, "num_splits", lambda *a: splits)
    q, kc, vc, tables, lens = _decode_inputs(4, 2, 64, 16, [5, 0, 40], torch.float32, seed=7)
    q[1] = float("nan")
    out = decode_mod.attention_decode(q, kc, vc, tables.long(), lens.long())
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = [0, 2]
    assert_close(out[keep], _decode_reference(q, kc, vc, tables, lens, torch.float32)[keep], 1e-5, 1e-5)


def test_decode_split_heuristic():
    cpu = torch.device("cpu")  # 8 "SMs" when interpreting: 16 programs wanted
    assert decode_mod.num_splits(1, 1, 4096, 16, cpu) == 16
    assert decode_mod.num_splits(3, 2, 4096, 16, cpu) == 3
    assert decode_mod.num_splits(8, 4, 4096, 16, cpu) == 1
    assert decode_mod.num_splits(1, 1, 40, 16, cpu) == 3  # never more splits than key tiles
    assert decode_mod.num_splits(1, 1, 1 << 20, 16, cpu) <= decode_mod.MAX_SPLITS


class _Recorder:
    """Stands in for a @triton.jit kernel: records grid and meta-parameters instead of launching."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append((tuple(grid), {k: v for k, v in meta.items()}))
        return launch


def test_decode_launch_is_graph_safe(monkeypatch):
    """No host read of a device tensor, and grid/config independent of seq_lens' and the block
    tables' values (the grid comes from the tables' width).

    The kernels are replaced by recorders and every Tensor->host conversion raises, so the launcher
    runs as it would during a CUDA-graph capture; very different seq_lens and tables must give the
    same launches.
    """
    stage1, combine = _Recorder(), _Recorder()
    monkeypatch.setattr(decode_mod, "_attention_decode_kernel", stage1)
    monkeypatch.setattr(decode_mod, "_attention_decode_combine_kernel", combine)
    q, kc, vc, tables, lens = _decode_inputs(6, 2, 16, 16, [300, 5], torch.float16, seed=8)
    other_tables = tables.flip(1).contiguous()

    def forbidden(*a, **k):
        raise AssertionError("host synchronisation in attention_decode")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
            m.setattr(torch.Tensor, name, forbidden)
        decode_mod.attention_decode(q, kc, vc, tables, lens)
        decode_mod.attention_decode(q, kc, vc, other_tables, torch.zeros_like(lens))
    assert len(stage1.launches) == 2 and stage1.launches[0] == stage1.launches[1]
    assert len(combine.launches) == 2 and combine.launches[0] == combine.launches[1]
    grid, meta = stage1.launches[0]
    assert grid[:2] == (2, 2) and grid[2] > 1 and not meta["SINGLE_SPLIT"] and meta["PAGE"] == 16


def test_decode_rejects_bad_input():
    q, kc, vc, tables, lens = _decode_inputs(4, 2, 16, 16, [3, 4], torch.float32, seed=9)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_mod.attention_decode(q, kc, vc, tables, lens[:1])
    with pytest.raises(ValueError, match="block_tables"):
        decode_mod.attention_decode(q, kc, vc, tables[:1], lens)
    with pytest.raises(ValueError, match="block_tables"):
        decode_mod.attention_decode(q, kc, vc, tables.float(), lens)
    with pytest.raises(ValueError, match="num_blocks, block_size"):
        decode_mod.attention_decode(q, kc[0], vc[0], tables, lens)
    with pytest.raises(ValueError, match="multiple"):
        decode_mod.attention_decode(q[:, :3], kc, vc, tables, lens)


# --- paged chunked prefill ----------------------------------------------------------------------

# (T, start, Hq, Hkv, head_dim, block_size, table_pad): single-row chunks at position 0 and in the
# middle of a page; chunks longer than a page from 0, from a page boundary and from mid-page; GQA
# groups 1, 3 and 7; tables exactly as long as the sequence's pages (table_pad 0) or longer.
CHUNK_CASES = [
    (1, 0, 4, 4, 64, 16, 1),
    (1, 37, 6, 2, 128, 32, 0),
    (40, 0, 6, 2, 64, 16, 2),
    (37, 21, 7, 1, 64, 32, 0),
    (20, 32, 4, 4, 128, 16, 1),
]


def _chunk_id(case):
    t, start, hq, hkv, d, bs, pad = case
    return f"T{t}-start{start}-{hq}x{hkv}x{d}-p{bs}-pad{pad}"


def _check_chunk(case, dtype, seed=0, scale=None):
    t, start, hq, hkv, d, bs, pad = case
    q, kc, vc, table = _chunk_inputs(t, start, hq, hkv, d, bs, dtype, seed, table_pad=pad)
    out = chunk_mod.attention_chunk(q, kc, vc, table, start, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_attention_close(out, lambda dt: ops.attention_chunk.reference(
        q.to(dt), kc.to(dt), vc.to(dt), table, start, scale=scale), dtype)


@pytest.mark.parametrize("dtype,atol,rtol", PAGED_DTYPES, ids=PAGED_DTYPE_IDS)
@pytest.mark.parametrize("case", CHUNK_CASES, ids=_chunk_id)
def test_chunk_matches_reference(case, dtype, atol, rtol):
    _check_chunk(case, dtype, seed=case[0] + case[1])


def test_chunk_bf16_under_the_interpreter_workaround():
    """bf16 through the interpreter's fp32-dot workaround (see the module docstring)."""
    _check_chunk(CHUNK_CASES[3], torch.bfloat16, seed=3)


@pytest.mark.parametrize("tiles", [(32, 64), (64, 16), (16, 32)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_chunk_with_other_tiles(tiles, monkeypatch):
    """Key tiles wider than the query tile, several pages per key tile, half pages; a start that
    is no multiple of either, so the unmasked and masked loops both run."""
    monkeypatch.setattr(chunk_mod, "_config", lambda d, rows, total, e: (*tiles, 4, 2))
    _check_chunk((50, 70, 6, 2, 64, 16, 1), torch.float16, seed=tiles[0])
    _check_chunk((50, 70, 6, 2, 64, 16, 1), torch.float32, seed=tiles[1], scale=0.3)


def test_chunk_gpu_tiles(monkeypatch):
    """Compiled configs: the prefill kernel's tiles, the query tile shrunk for short chunks."""
    monkeypatch.setattr(chunk_mod, "INTERPRET", False)
    assert chunk_mod._config(128, 2048, 9000, 2) == (128, 64, 8, 5)
    assert chunk_mod._config(64, 2048, 9000, 2) == (128, 64, 4, 5)
    assert chunk_mod._config(128, 1, 9000, 2) == (16, 64, 4, 5)  # a one-row chunk: 16 rows, not 128
    assert chunk_mod._config(128, 40, 9000, 2) == (64, 64, 4, 5)
    assert chunk_mod._config(128, 2048, 9000, 4) == (64, 32, 4, 3)
    assert chunk_mod._config(256, 2048, 9000, 2) == (64, 32, 8, 3)


def test_chunks_in_turn_equal_one_causal_prefill():
    """A prompt run as three chunks over its pages gives the rows of one causal pass over it."""
    t, hq, hkv, d, bs = 45, 6, 2, 64, 16
    q, k, v = _packed_qkv(t, hq, hkv, d, torch.float32, seed=21)
    kc, vc, tables = _paged_kv([t], bs, hkv, d, torch.float32, seed=22)
    table = tables[0]
    pages = table[: -(-t // bs)].long()
    kc[pages] = torch.cat([k, k.new_zeros(pages.numel() * bs - t, hkv, d)]).view(-1, bs, hkv, d)
    vc[pages] = torch.cat([v, v.new_zeros(pages.numel() * bs - t, hkv, d)]).view(-1, bs, hkv, d)
    whole = ops.attention_prefill.reference(q, k, v, _cu([t]), t, causal=True)
    parts = [chunk_mod.attention_chunk(q[a:b], kc, vc, table, a) for a, b in ((0, 13), (13, 29), (29, 45))]
    assert_close(torch.cat(parts), whole, 1e-5, 1e-5)


def test_chunk_rejects_bad_input():
    q, kc, vc, table = _chunk_inputs(5, 30, 4, 2, 16, 16, torch.float32, seed=23, table_pad=0)
    with pytest.raises(ValueError, match="fewer than"):
        chunk_mod.attention_chunk(q, kc, vc, table[:1], 30)
    with pytest.raises(ValueError, match="block_table"):
        chunk_mod.attention_chunk(q, kc, vc, table[None], 30)
    with pytest.raises(ValueError, match="start"):
        chunk_mod.attention_chunk(q, kc, vc, table, -1)
    with pytest.raises(TypeError, match="share a dtype"):
        chunk_mod.attention_chunk(q.half(), kc, vc, table, 30)


# --- backend routing ------------------------------------------------------------------------------


class FakeFlashAttn(types.ModuleType):
    """flash_attn's two entry points with its documented signatures and checks, computed with the
    ovfast references; it records each call's arguments."""

    def __init__(self):
        super().__init__("flash_attn")
        self.calls = []

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        self.calls.append(("varlen", dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                          max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                          softmax_scale=softmax_scale, causal=causal, dropout_p=dropout_p)))
        assert q.dtype in (torch.float16, torch.bfloat16) and q.stride(-1) == 1
        assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        return ops.attention_prefill.reference(q, k, v, cu_seqlens_q, max_seqlen_q, causal=causal, scale=softmax_scale)

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
        """Paged: q (B, Tq, Hq, d); row b's causal mask is bottom-right aligned (query i sees cache
        positions <= cache_seqlens[b] - Tq + i); a row of length 0 gives zeros."""
        self.calls.append(("kvcache", dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                                           cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
                                           block_table=block_table, softmax_scale=softmax_scale, causal=causal)))
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        assert block_table is not None and block_table.dtype == torch.int32 and block_table.stride(-1) == 1
        assert k_cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256"
        bsz, tq = q.shape[:2]
        assert q.dim() == 4 and block_table.shape[0] == bsz
        assert isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.shape == (bsz,)
        assert cache_seqlens.dtype == torch.int32
        out = torch.zeros_like(q)
        for b, n in enumerate(cache_seqlens.tolist()):
            if n:
                out[b] = ops.attention_chunk.reference(q[b], k_cache, v_cache, block_table[b], n - tq,
                                                       scale=softmax_scale)
        return out


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """A fake flash_attn importable, and the CPU treated as an sm80+ GPU by the support check."""
    fake = FakeFlashAttn()
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(routing, "_sm80_or_newer", lambda device: True)
    routing.flash_attn_module.cache_clear()
    yield fake
    routing.flash_attn_module.cache_clear()


@pytest.fixture
def no_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    routing.flash_attn_module.cache_clear()
    yield
    routing.flash_attn_module.cache_clear()


def test_backend_choice_auto(fake_flash_attn):
    with routing.attention_mode("auto"):
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64) == "flash_attn"
        assert kernels.attention_backend(DEVICE, torch.float16, 72) == "flash_attn"  # SigLIP's head
        assert kernels.attention_backend(DEVICE, torch.float32, 64) == "triton"  # flash-attn: 16-bit only
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 12) == "triton"  # not a multiple of 8
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 512) == "triton"
        # Paged ops: flash-attn reads pages of a multiple of 256 positions only.
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64, block_size=256) == "flash_attn"
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64, block_size=512) == "flash_attn"
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64, block_size=16) == "triton"
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64, block_size=128) == "triton"


def test_backend_choice_without_flash_attn(no_flash_attn):
    with routing.attention_mode("auto"):
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64) == "triton"
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64, block_size=256) == "triton"
    with routing.attention_mode("flash_attn"), pytest.raises(RuntimeError, match="not importable"):
        kernels.attention_backend(DEVICE, torch.bfloat16, 64)


def test_backend_choice_real_device_check():
    """Unpatched, a CPU tensor never goes to flash-attn, whatever is installed."""
    assert not routing.flash_attn_supports("cpu", torch.bfloat16, 64)


def test_forced_backends(fake_flash_attn, monkeypatch):
    with routing.attention_mode("torch"):
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64) == "torch"
    with routing.attention_mode("triton"):
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64) == "triton"
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64, block_size=256) == "triton"
    with routing.attention_mode("flash_attn"):
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64, block_size=256) == "flash_attn"
        with pytest.raises(RuntimeError, match="cannot run"):
            kernels.attention_backend(DEVICE, torch.float32, 64)
        with pytest.raises(RuntimeError, match="16-position pages.*multiple of 256"):
            kernels.attention_backend(DEVICE, torch.bfloat16, 64, block_size=16)
    monkeypatch.setattr(routing, "INTERPRET", False)  # a CPU tensor without the interpreter
    with routing.attention_mode("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.attention_backend("cpu", torch.float32, 64)
    with routing.attention_mode("auto"):
        assert kernels.attention_backend("cpu", torch.float32, 64) == "torch"
    with pytest.raises(ValueError):
        routing.set_attention_mode("sdpa")


def test_preferred_block_size(fake_flash_attn):
    """256 exactly when flash-attn would run the paged ops, else 16."""
    with backends.kernel_mode("triton"):
        with routing.attention_mode("auto"):
            assert kernels.preferred_block_size(DEVICE, torch.bfloat16, 128) == 256
            assert kernels.preferred_block_size(DEVICE, torch.float16, 64) == 256
            assert kernels.preferred_block_size(DEVICE, torch.float32, 64) == 16  # flash-attn: 16-bit only
            assert kernels.preferred_block_size(DEVICE, torch.bfloat16, 12) == 16
        with routing.attention_mode("flash_attn"):
            assert kernels.preferred_block_size(DEVICE, torch.bfloat16, 64) == 256
        for mode in ("triton", "torch"):
            with routing.attention_mode(mode):
                assert kernels.preferred_block_size(DEVICE, torch.bfloat16, 64) == 16
    with backends.kernel_mode("torch"), routing.attention_mode("auto"):  # no kernels: flash-attn never runs
        assert kernels.preferred_block_size(DEVICE, torch.bfloat16, 64) == 16


def test_preferred_block_size_without_flash_attn(no_flash_attn):
    with backends.kernel_mode("triton"), routing.attention_mode("auto"):
        assert kernels.preferred_block_size(DEVICE, torch.bfloat16, 64) == 16


def test_flash_attn_prefill_plumbing(fake_flash_attn):
    q, k, v = _packed_qkv(20, 6, 2, 16, torch.bfloat16, seed=10)
    cu = _cu([8, 12])
    with backends.kernel_mode("triton"), routing.attention_mode("auto"):
        out = ops.attention_prefill(q, k, v, cu, 12, causal=False, scale=0.25)
    ((kind, args),) = fake_flash_attn.calls
    assert kind == "varlen"
    assert args["q"] is q and args["k"] is k and args["v"] is v  # strided views passed as they are
    assert args["cu_seqlens_q"] is cu and args["cu_seqlens_k"] is cu
    assert (args["max_seqlen_q"], args["max_seqlen_k"], args["softmax_scale"], args["causal"]) == (12, 12, 0.25, False)
    assert args["dropout_p"] == 0.0
    assert torch.equal(out, ops.attention_prefill.reference(q, k, v, cu, 12, causal=False, scale=0.25))


def test_flash_attn_decode_plumbing(fake_flash_attn):
    q, kc, vc, tables, lens = _decode_inputs(6, 2, 16, 256, [300, 0, 256], torch.bfloat16, seed=11)
    with backends.kernel_mode("triton"), routing.attention_mode("auto"):
        out = ops.attention_decode(q, kc, vc, tables, lens, scale=0.125)
    ((kind, args),) = fake_flash_attn.calls
    assert kind == "kvcache"
    assert args["q"].shape == (3, 1, 6, 16) and args["q"].data_ptr() == q.data_ptr()
    # The whole paged caches as they are, and no new k/v: they are already written.
    assert args["k_cache"] is kc and args["v_cache"] is vc and args["k"] is None and args["v"] is None
    # The batch's table rows, as a view (no copy; a graph replay sees the engine's updates).
    assert args["block_table"].shape == (3, tables.shape[1]) and args["block_table"].data_ptr() == tables.data_ptr()
    assert torch.equal(args["cache_seqlens"], lens) and args["cache_batch_idx"] is None
    assert args["causal"] is True and args["softmax_scale"] == 0.125
    assert out.shape == q.shape
    assert torch.equal(out, _decode_reference(q, kc, vc, tables, lens, torch.bfloat16, scale=0.125))


def test_flash_attn_chunk_plumbing(fake_flash_attn):
    q, kc, vc, table = _chunk_inputs(30, 250, 6, 2, 16, 256, torch.bfloat16, seed=12)
    with backends.kernel_mode("triton"), routing.attention_mode("auto"):
        out = ops.attention_chunk(q, kc, vc, table, 250, scale=0.2)
    ((kind, args),) = fake_flash_attn.calls
    assert kind == "kvcache"
    assert args["q"].shape == (1, 30, 6, 16) and args["q"].data_ptr() == q.data_ptr()
    assert args["k_cache"] is kc and args["v_cache"] is vc and args["k"] is None and args["v"] is None
    assert args["block_table"].shape == (1, table.numel()) and args["block_table"].data_ptr() == table.data_ptr()
    assert args["cache_seqlens"].tolist() == [280]  # bottom-right causal: row i sees <= 250 + i
    assert args["causal"] is True and args["softmax_scale"] == 0.2
    assert torch.equal(out, ops.attention_chunk.reference(q, kc, vc, table, 250, scale=0.2))


def test_small_pages_run_triton_beside_flash_attn(fake_flash_attn, monkeypatch):
    """With flash-attn present, 16-position pages still reach the Triton kernels (through the ops'
    dispatch), and with the arguments as given."""
    seen = []
    monkeypatch.setattr(routing, "_triton_decode", lambda *a, **k: seen.append(("decode", a, k)) or a[0])
    monkeypatch.setattr(routing, "_triton_chunk", lambda *a, **k: seen.append(("chunk", a, k)) or a[0])
    q, kc, vc, tables, lens = _decode_inputs(6, 2, 16, 16, [20, 3], torch.bfloat16, seed=13)
    with backends.kernel_mode("triton"), routing.attention_mode("auto"):
        ops.attention_decode(q, kc, vc, tables, lens, scale=0.5)
        ops.attention_chunk(q, kc, vc, tables[0], 18)
    assert not fake_flash_attn.calls
    (_, dec_args, dec_kw), (_, chunk_args, chunk_kw) = seen
    assert all(a is b for a, b in zip(dec_args, (q, kc, vc, tables, lens))) and dec_kw == {"scale": 0.5}
    assert torch.equal(chunk_args[3], tables[0]) and chunk_args[4] == 18 and chunk_kw == {"scale": None}


def test_torch_backend_runs_the_reference(fake_flash_attn, monkeypatch):
    q, k, v = _packed_qkv(9, 2, 1, 16, torch.bfloat16, seed=12)
    cu = _cu([9])
    monkeypatch.setattr(prefill_mod, "_attention_prefill_kernel", None)  # would fail if reached
    with routing.attention_mode("torch"):
        out = kernels.attention_prefill(q, k, v, cu, 9)
    assert not fake_flash_attn.calls
    assert torch.equal(out, ops.attention_prefill.reference(q, k, v, cu, 9))
    qc, kc, vc, table = _chunk_inputs(4, 10, 2, 1, 16, 16, torch.bfloat16, seed=14)
    monkeypatch.setattr(chunk_mod, "_attention_chunk_kernel", None)
    with routing.attention_mode("torch"):
        out = kernels.attention_chunk(qc, kc, vc, table, 10)
    assert torch.equal(out, ops.attention_chunk.reference(qc, kc, vc, table, 10))


def test_environment_variable_forces_the_backend():
    code = ("import torch, ovfast.kernels as k; "
            "print(k.attention.get_attention_mode(), k.attention_backend('cpu', torch.bfloat16, 64))")
    env = dict(os.environ, OVFAST_ATTENTION="torch")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["torch", "torch"]
    env["OVFAST_ATTENTION"] = "bogus"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "OVFAST_ATTENTION" in done.stderr




# --- GPU: real sizes and CUDA graphs ------------------------------------------------------------

GPU_PREFILL = [
    ([3000], 14, 2, 64, True),
    ([1000, 2000, 17], 28, 4, 128, True),
    ([729] * 37, 16, 16, 72, False),  # SigLIP: 37 tiles of 729 tokens, 16 heads of 72
    ([4096], 64, 8, 128, True),
]
GPU_HEADS = [(14, 2, 64), (28, 4, 128), (64, 8, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("seqlens,hq,hkv,d,causal", GPU_PREFILL, ids=["0.5b-3k", "7b-packed", "siglip", "72b-4k"])
def test_prefill_real_sizes(seqlens, hq, hkv, d, causal, dtype, atol, rtol):
    _check_prefill(seqlens, hq, hkv, d, causal, dtype, seed=len(seqlens))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bs", [16, 256])
@pytest.mark.parametrize("context", [1024, 4096, 32768])
@pytest.mark.parametrize("bsz", [1, 8])
@pytest.mark.parametrize("hq,hkv,d", GPU_HEADS, ids=["0.5b", "7b", "72b"])
def test_decode_real_sizes(hq, hkv, d, bsz, context, bs, dtype):
    lens = [max(1, context - 37 * i) for i in range(bsz)]
    _check_decode((hq, hkv, d, bs, lens), dtype, seed=context)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bs", [16, 256])
@pytest.mark.parametrize("t,start", [(1, 8191), (512, 0), (1024, 3000), (2048, 14000)])
@pytest.mark.parametrize("hq,hkv,d", GPU_HEADS, ids=["0.5b", "7b", "72b"])
def test_chunk_real_sizes(hq, hkv, d, t, start, bs, dtype):
    _check_chunk((t, start, hq, hkv, d, bs, 3), dtype, seed=t + start)


@pytest.mark.gpu
def test_decode_cuda_graph_replay_matches_eager():
    """Capture once, then change q, seq_lens and the block tables in place: replays follow them."""
    hq, hkv, d, bs = 28, 4, 128, 16
    q, kc, vc, tables, lens = _decode_inputs(hq, hkv, d, bs, [8192, 100, 4000, 1], torch.bfloat16, seed=13)
    kc.nan_to_num_(0.0), vc.nan_to_num_(0.0)
    static_q, static_tables, static_lens = q.clone(), tables.clone(), lens.clone()
    decode_mod.attention_decode(static_q, kc, vc, static_tables, static_lens)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = decode_mod.attention_decode(static_q, kc, vc, static_tables, static_lens)
    num_blocks = kc.shape[0]
    for new_lens in ([17, 8192, 1, 2048], [1, 1, 0, 1], [5000, 6000, 7000, 8000]):
        static_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        static_tables.copy_(torch.randint(1, num_blocks, static_tables.shape, dtype=torch.int32))
        static_q.copy_(torch.randn_like(static_q))
        graph.replay()
        eager = decode_mod.attention_decode(static_q, kc, vc, static_tables, static_lens)
        assert torch.equal(static_out, eager)
