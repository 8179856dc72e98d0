"""Attention kernels (varlen prefill, split-KV decode) and the backend routing in front of them.

Kernels are compared with ``ovfast.ops.attention_*.reference`` (SDPA) under the flash-attention
rule: error against the fp32 reference at most twice the error of the same reference computed in
fp16/bf16, plus the dtype's rounding noise; fp32 within 1e-5. On the CPU they run in Triton's
interpreter with 32 x 16 prefill tiles and 16-key decode blocks, so the short, awkward lengths
below cross block and split boundaries; bf16 dots are upcast to fp32 there (the interpreter's bf16
``tl.dot`` is wrong). flash-attn cannot run here: a fake ``flash_attn`` module that records its
calls and computes with the references tests the selection and the argument plumbing.
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


def _decode_inputs(bsz, slots, s_max, hq, hkv, d, seq_lens, dtype, seed, layers=2):
    """q (B, Hq, d) strided; per-layer cache views (slots, S_max, Hkv, d) of a (layers, ...) cache.

    Positions in [seq_len, max(seq_lens)) hold large finite garbage (masked by the reference too);
    positions >= max(seq_lens) and the slots >= B hold NaN: reading any of them breaks the result.
    """
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = torch.randn(bsz, (hq + 2 * hkv) * d, generator=g, device=DEVICE).to(dtype)
    q = qkv[:, : hq * d].view(bsz, hq, d)
    caches = []
    s = max(seq_lens)
    for _ in range(2):
        c = torch.randn(layers, slots, s_max, hkv, d, generator=g, device=DEVICE, dtype=dtype)
        for b, n in enumerate(seq_lens):
            c[:, b, n:s] = 1e3
        c[:, :, s:] = float("nan")
        c[:, bsz:] = float("nan")
        caches.append(c[layers - 1])
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q, caches[0], caches[1], lens


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


# --- decode -------------------------------------------------------------------------------------

# (B, slots, S_max, Hq, Hkv, d, seq_lens): rows are slots 0..B-1 of a larger cache.
DECODE_CASES = [
    (1, 1, 7, 3, 1, 16, [7]),
    (5, 6, 135, 7, 1, 64, [1, 7, 33, 129, 135]),
    (3, 4, 129, 6, 2, 72, [129, 2, 64]),
    (2, 2, 33, 2, 2, 8, [33, 1]),
]


def _check_decode(case, dtype, seed=0, scale=None, layers=2):
    bsz, slots, s_max, hq, hkv, d, seq_lens = case
    q, kc, vc, lens = _decode_inputs(bsz, slots, s_max, hq, hkv, d, seq_lens, dtype, seed, layers)
    out = decode_mod.attention_decode(q, kc, vc, lens, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_attention_close(
        out, lambda dt: ops.attention_decode.reference(q.to(dt), kc.to(dt), vc.to(dt), lens, scale=scale), dtype)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"B{c[0]}-S{c[2]}-{c[3]}x{c[4]}x{c[5]}")
def test_decode_matches_reference(case, dtype, atol, rtol):
    _check_decode(case, dtype, seed=case[2])


@pytest.mark.parametrize("splits", [1, 3, 24])
@pytest.mark.parametrize("case", DECODE_CASES[1:3], ids=["B5-group7", "B3-d72"])
def test_decode_any_split_count(case, splits, monkeypatch):
    """One split (no combine pass), a few, and far more splits than key blocks (most empty)."""
    monkeypatch.setattr(decode_mod, "num_splits", lambda *a: splits)
    _check_decode(case, torch.bfloat16, seed=splits)
    _check_decode(case, torch.float32, seed=splits, scale=0.2)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_zero_length_rows_give_zeros(splits, monkeypatch):
    """Inert padding lanes (seq_len 0) produce zeros, never NaN, and leave the other rows exact."""
    monkeypatch.setattr(decode_mod, "num_splits", lambda *a: splits)
    q, kc, vc, lens = _decode_inputs(3, 4, 40, 4, 2, 16, [5, 1, 40], torch.float32, seed=7)
    lens[1] = 0
    out = decode_mod.attention_decode(q, kc, vc, lens)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    keep = torch.tensor([0, 2], device=DEVICE)
    expected = ops.attention_decode.reference(q[keep], kc[keep], vc[keep], lens[keep])
    assert_close(out[keep], expected, 1e-5, 1e-5)


def test_decode_split_heuristic():
    cpu = torch.device("cpu")  # 8 "SMs" when interpreting: 16 programs wanted
    assert decode_mod.num_splits(1, 1, 4096, 16, cpu) == 16
    assert decode_mod.num_splits(3, 2, 4096, 16, cpu) == 3
    assert decode_mod.num_splits(8, 4, 4096, 16, cpu) == 1
    assert decode_mod.num_splits(1, 1, 40, 16, cpu) == 3  # never more splits than key blocks
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
    """No host read of a device tensor, and grid/config independent of seq_lens' values.

    The kernels are replaced by recorders and every Tensor->host conversion raises, so the launcher
    runs as it would during a CUDA-graph capture; two very different seq_lens must give the same launches.
    """
    stage1, combine = _Recorder(), _Recorder()
    monkeypatch.setattr(decode_mod, "_attention_decode_kernel", stage1)
    monkeypatch.setattr(decode_mod, "_attention_decode_combine_kernel", combine)
    q, kc, vc, lens = _decode_inputs(2, 3, 300, 6, 2, 16, [300, 5], torch.bfloat16, seed=8)

    def forbidden(*a, **k):
        raise AssertionError("host synchronisation in attention_decode")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
            m.setattr(torch.Tensor, name, forbidden)
        decode_mod.attention_decode(q, kc, vc, lens)
        decode_mod.attention_decode(q, kc, vc, torch.ones_like(lens))
    assert len(stage1.launches) == 2 and stage1.launches[0] == stage1.launches[1]
    assert len(combine.launches) == 2 and combine.launches[0] == combine.launches[1]
    grid, meta = stage1.launches[0]
    assert grid[:2] == (2, 2) and grid[2] > 1 and not meta["SINGLE_SPLIT"]


def test_decode_rejects_bad_input():
    q, kc, vc, lens = _decode_inputs(2, 2, 16, 4, 2, 16, [3, 4], torch.float32, seed=9)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_mod.attention_decode(q, kc, vc, lens[:1])
    with pytest.raises(ValueError, match="does not fit"):
        decode_mod.attention_decode(torch.cat([q, q]), kc, vc, torch.cat([lens, lens]))


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
        self.calls.append(("kvcache", dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                                           cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
                                           softmax_scale=softmax_scale, causal=causal)))
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        assert q.dim() == 4 and q.shape[1] == 1 and k_cache.shape[0] == q.shape[0]
        assert cache_seqlens.dtype == torch.int32
        out = ops.attention_decode.reference(q[:, 0], k_cache, v_cache, cache_seqlens, scale=softmax_scale)
        return out[:, None]


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


def test_backend_choice_without_flash_attn(no_flash_attn):
    with routing.attention_mode("auto"):
        assert kernels.attention_backend(DEVICE, torch.bfloat16, 64) == "triton"
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
    with routing.attention_mode("flash_attn"), pytest.raises(RuntimeError, match="cannot run"):
        kernels.attention_backend(DEVICE, torch.float32, 64)
    monkeypatch.setattr(routing, "INTERPRET", False)  # a CPU tensor without the interpreter
    with routing.attention_mode("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.attention_backend("cpu", torch.float32, 64)
    with routing.attention_mode("auto"):
        assert kernels.attention_backend("cpu", torch.float32, 64) == "torch"
    with pytest.raises(ValueError):
        routing.set_attention_mode("sdpa")


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
    q, kc, vc, lens = _decode_inputs(2, 4, 24, 6, 2, 16, [24, 3], torch.bfloat16, seed=11)
    with backends.kernel_mode("triton"), routing.attention_mode("auto"):
        out = ops.attention_decode(q, kc, vc, lens, scale=0.125)
    ((kind, args),) = fake_flash_attn.calls
    assert kind == "kvcache"
    assert args["q"].shape == (2, 1, 6, 16) and args["q"].data_ptr() == q.data_ptr()
    # The cache rows of the batch, as views (no copy), and no new k/v: they are already written.
    assert args["k_cache"].shape == (2, 24, 2, 16) and args["k_cache"].data_ptr() == kc.data_ptr()
    assert args["v_cache"].data_ptr() == vc.data_ptr() and args["k"] is None and args["v"] is None
    assert torch.equal(args["cache_seqlens"], lens) and args["cache_batch_idx"] is None
    assert args["causal"] is True and args["softmax_scale"] == 0.125
    assert out.shape == q.shape
    assert torch.equal(out, ops.attention_decode.reference(q, kc, vc, lens, scale=0.125))


def test_torch_backend_runs_the_reference(fake_flash_attn, monkeypatch):
    q, k, v = _packed_qkv(9, 2, 1, 16, torch.bfloat16, seed=12)
    cu = _cu([9])
    monkeypatch.setattr(prefill_mod, "_attention_prefill_kernel", None)  # would fail if reached
    with routing.attention_mode("torch"):
        out = kernels.attention_prefill(q, k, v, cu, 9)
    assert not fake_flash_attn.calls
    assert torch.equal(out, ops.attention_prefill.reference(q, k, v, cu, 9))


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
GPU_DECODE_HEADS = [(14, 2, 64), (28, 4, 128), (64, 8, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("seqlens,hq,hkv,d,causal", GPU_PREFILL, ids=["0.5b-3k", "7b-packed", "siglip", "72b-4k"])
def test_prefill_real_sizes(seqlens, hq, hkv, d, causal, dtype, atol, rtol):
    _check_prefill(seqlens, hq, hkv, d, causal, dtype, seed=len(seqlens))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("context", [1024, 4096, 16384, 32768])
@pytest.mark.parametrize("bsz", [1, 8])
@pytest.mark.parametrize("hq,hkv,d", GPU_DECODE_HEADS, ids=["0.5b", "7b", "72b"])
def test_decode_real_sizes(hq, hkv, d, bsz, context, dtype):
    lens = [max(1, context - 37 * i) for i in range(bsz)]
    _check_decode((bsz, bsz + 1, 32768, hq, hkv, d, lens), dtype, seed=context, layers=1)


@pytest.mark.gpu
def test_decode_cuda_graph_replay_matches_eager():
    """Capture once, then change q and seq_lens in place: replays follow the new values."""
    bsz, hq, hkv, d, s_max = 4, 28, 4, 128, 8192
    q, kc, vc, lens = _decode_inputs(bsz, 8, s_max, hq, hkv, d, [8192, 100, 4000, 1], torch.bfloat16, seed=13,
                                     layers=1)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    static_q, static_lens = q.clone(), lens.clone()
    decode_mod.attention_decode(static_q, kc, vc, static_lens)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = decode_mod.attention_decode(static_q, kc, vc, static_lens)
    for new_lens in ([17, 8192, 1, 2048], [1, 1, 1, 1], [5000, 6000, 7000, 8000]):
        static_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        static_q.copy_(torch.randn_like(static_q))
        graph.replay()
        eager = decode_mod.attention_decode(static_q, kc, vc, static_lens)
        assert torch.equal(static_out, eager)
