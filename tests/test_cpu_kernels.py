"""ovfast's compiled CPU kernels (ovfast/ops/cpu_native.py) against their torch references.

The kernels are built on first use with the host's g++; on this project's CPUs (x86-64 Linux with
a compiler) they must build, so a failed build fails here instead of silently testing the fallback.
Shapes exercise every tail: K not a multiple of 16 (masked loads), N not a multiple of 4 (single
rows), M from 1 to past the 4-row groups, and M above SMALL_ROWS (torch's GEMM).
"""
from __future__ import annotations

import copy
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from ovfast import ops
from ovfast.ops import cpu_native
from ovfast.models.qwen2 import ForwardBatch
from ovfast.ops.backends import kernel_for

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None,
                                reason="the CPU kernels are built with g++ on x86-64")


@pytest.fixture(autouse=True, scope="module")
def _built():
    """The kernels loaded before any test calls torch.ops.ovfast_cpu directly (in any order, alone)."""
    assert cpu_native.available()


def test_kernels_build_and_route():
    assert cpu_native.available()
    assert kernel_for("linear", torch.device("cpu")) is cpu_native.linear
    assert ops.report("cpu")["linear"] == "cpu"
    with ops.backends.KERNELS.using("torch"):
        assert kernel_for("linear", torch.device("cpu")) is None


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative to the output's scale (sums cancel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 7, 5), (2, 13, 37), (3, 33, 100), (4, 64, 16), (5, 129, 896),
                                   (8, 1152, 896), (16, 4, 4864), (17, 40, 64), (1, 151, 72)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch(dtype, m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    got = cpu_native.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (m, n)
    # fp32 arithmetic on the same (bf16-rounded) inputs is the reference; the kernel rounds once.
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    scale = ref.abs().max().item()
    torch.testing.assert_close(got.float(), ref, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    if dtype == torch.bfloat16:  # and it is no further from the exact result than torch's own bf16 GEMM
        err = (got.float() - ref).abs().max()
        assert err <= 2 * (F.linear(x, w, b).float() - ref).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [37, 896, 4864])
def test_linear_rows_do_not_depend_on_the_batch(dtype, k):
    # a decode row's GEMV result is the same bit for bit alone or with up to 15 other rows (every
    # greedy answer is the same alone or in any batch: docs/serving.md)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(cpu_native.SMALL_ROWS, k, generator=g).to(dtype)
    w = torch.randn(70, k, generator=g).to(dtype)
    b = torch.randn(70, generator=g).to(dtype)
    alone = torch.cat([cpu_native.linear(x[i : i + 1], w, b) for i in range(x.shape[0])])
    for m in (2, 3, 4, 5, 9, cpu_native.SMALL_ROWS):
        assert torch.equal(cpu_native.linear(x[:m], w, b), alone[:m])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
def test_linear_does_not_read_past_rows(dtype, m):
    # Rows past N (a view's neighbours) and NaN around the weights must never reach the output.
    store = torch.full((9, 40), float("nan"), dtype=dtype)
    w = store[1:8]
    w.copy_(torch.randn(7, 40))
    x = torch.randn(m, 40).to(dtype)
    out = cpu_native.linear(x, w)
    assert torch.isfinite(out).all()
    ref = F.linear(x.float(), w.float())
    torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype], atol=TOL[dtype] * ref.abs().max().item())


def test_linear_falls_back_where_it_does_not_apply():
    x, w = torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(cpu_native.linear(x, w), F.linear(x, w))  # fp64: torch
    torch.testing.assert_close(cpu_native.linear(x.half(), w.half()), F.linear(x.half(), w.half()))
    x, wt = torch.randn(2, 8), torch.randn(8, 3).t()  # a transposed (non-contiguous) weight
    torch.testing.assert_close(cpu_native.linear(x, wt), F.linear(x, wt), rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 2, 8)  # more than two dimensions
    torch.testing.assert_close(cpu_native.linear(x, wt), F.linear(x, wt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,dim", [(1, 8), (3, 896), (17, 100), (300, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(dtype, rows, dim, with_residual):
    g = torch.Generator().manual_seed(rows * 7 + dim)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    w = (1 + torch.randn(dim, generator=g) * 0.1).to(dtype)
    res = torch.randn(rows, dim, generator=g).to(dtype) if with_residual else None
    ref = ops.rms_norm.reference(x, w, 1e-6, res)
    got = cpu_native.rms_norm(x, w, 1e-6, res)
    refs, gots = (ref, got) if with_residual else ((ref,), (got,))
    for r, o in zip(refs, gots):
        assert o.dtype == dtype and o.shape == r.shape
        # the same roundings as torch's op sequence: at most one unit in the last place apart
        torch.testing.assert_close(o, r, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)
    if with_residual:
        assert torch.equal(got[1], ref[1])  # x + residual, rounded once: exactly torch's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,hq,hk,d", [(1, 14, 2, 64), (5, 3, 1, 8), (33, 4, 4, 128)])
def test_rope_matches_torch_in_place_on_strided_views(dtype, tokens, hq, hk, d):
    g = torch.Generator().manual_seed(tokens + d)
    table = ops.rope_cos_sin_cache(d, 1e6, 4096)
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=g).to(dtype)  # q and k are views of one row, as in the model
    want = qkv.clone()
    q, k, _ = qkv.split((hq * d, hk * d, hk * d), dim=-1)
    qr, kr, _ = want.split((hq * d, hk * d, hk * d), dim=-1)
    cpu_native.rope(q.view(tokens, hq, d), k.view(tokens, hk, d), positions, table)
    ops.rope.reference(qr.view(tokens, hq, d), kr.view(tokens, hk, d), positions, table)
    torch.testing.assert_close(qkv, want, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-5)
    assert torch.equal(qkv[:, (hq + hk) * d:], want[:, (hq + hk) * d:])  # v untouched


def _paged(lengths, hk, d, bs, dtype, g):
    """Caches whose pages are shuffled, NaN in every position no row may read, and block tables."""
    need = [-(-n // bs) for n in lengths]
    blocks = 1 + sum(need) + 3
    k = torch.full((blocks, bs, hk, d), float("nan"), dtype=dtype)
    v = torch.full((blocks, bs, hk, d), float("nan"), dtype=dtype)
    order = (torch.randperm(blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(lengths), max(max(need), 1) + 2, dtype=torch.int32)
    for r, n in enumerate(lengths):
        pages = [order.pop() for _ in range(need[r])]
        tables[r, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        for j in range(n):
            k[pages[j // bs], j % bs] = torch.randn(hk, d, generator=g).to(dtype)
            v[pages[j // bs], j % bs] = torch.randn(hk, d, generator=g).to(dtype)
    return k, v, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths,hq,hk,d,bs", [([1], 14, 2, 64, 16), ([16, 17, 0, 40], 6, 2, 8, 16),
                                                 ([100, 3], 7, 1, 128, 32), ([31, 32, 33], 4, 4, 72, 16),
                                                 # pages that split the 16-position score blocks, tails of
                                                 # every size, more than 8 heads per kv head, d = 256
                                                 ([300, 5, 47], 14, 2, 64, 12), ([257, 16], 9, 1, 128, 4),
                                                 ([20, 33], 3, 1, 256, 16), ([61], 16, 2, 32, 7)])
def test_attention_decode_matches_torch(dtype, lengths, hq, hk, d, bs):
    g = torch.Generator().manual_seed(sum(lengths) + hq * d)
    k, v, tables = _paged(lengths, hk, d, bs, dtype, g)
    q = torch.randn(len(lengths), hq, d, generator=g).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = cpu_native.attention_decode(q, k, v, tables, lens, scale=d**-0.5)
    assert torch.isfinite(got).all()  # no NaN page was read, idle rows included
    live = lens > 0
    assert torch.equal(got[~live], torch.zeros_like(got[~live]))
    # reference in fp32 on the live rows (the torch path's idle rows are unspecified)
    ref = ops.attention_decode.reference(q[live].float(), k.float().nan_to_num(), v.float().nan_to_num(),
                                         tables[live], lens[live], scale=d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got[live].float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 4864), (3, 40), (20, 7)])
def test_silu_mul_matches_torch(dtype, rows, inter):
    x = (torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(rows + inter)) * 4).to(dtype)
    got, want = cpu_native.silu_mul(x), ops.silu_mul.reference(x)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_layers_equal_the_per_op_path(tiny, dtype):
    """The decode step's layers in one kernel call are the per-layer ops, bit for bit: three rows at
    different positions (pages shuffled), one idle row that must write only the null page."""
    _, engine = tiny
    lm = engine.model.language_model
    cfg = lm.cfg
    layers = [copy.deepcopy(layer).to(dtype) for layer in lm.layers]  # the session engine's stay fp32
    g = torch.Generator().manual_seed(11)
    bs, blocks = 4, 24
    shape = (cfg.num_layers, blocks, bs, layers[0].kv_heads, cfg.head_dim)
    k0, v0 = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    tables = (torch.randperm(blocks - 1, generator=g)[:16] + 1).to(torch.int32).view(4, 4)
    positions = torch.tensor([5, 0, 14, 9])
    lens = torch.tensor([6, 0, 15, 10], dtype=torch.int32)
    batch = ForwardBatch.decode(positions, tables, bs, lens)
    h = torch.randn(4, cfg.hidden_size, generator=g).to(dtype)
    with torch.inference_mode():
        k1, v1 = k0.clone(), v0.clone()
        fused = cpu_native.decode_layers(layers, h, batch, k1, v1, lm.cos_sin)
        assert fused is not None
        k2, v2 = k0.clone(), v0.clone()
        residual = None
        for i, layer in enumerate(layers):
            hh, residual = layer(h if i == 0 else hh, residual, batch, k2[i], v2[i], lm.cos_sin)
    # rows 0, 2, 3 are compared; the idle row's outputs are unspecified on every path
    live = lens > 0
    assert torch.equal(fused[0][live], hh[live]) and torch.equal(fused[1][live], residual[live])
    assert torch.equal(k1, k2) and torch.equal(v1, v2)  # the same cache writes (the idle row's to page 0)
    assert torch.equal(k1[:, 1:], k2[:, 1:]) and not torch.equal(k1, k0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (3, 45), (729, 4304 // 16)])
def test_gelu_tanh_matches_torch(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 6).to(dtype)
    x.view(-1)[:4] = torch.tensor([0.0, 40.0, -40.0, 1e-4]).to(dtype)  # zero, saturated both ways, tiny
    got, want = torch.ops.ovfast_cpu.gelu_tanh(x), F.gelu(x, approximate="tanh")
    assert got.dtype == dtype and got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(3, 45, 20), (17, 45, 20), (300, 131, 72), (40, 16, 33)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_linear_gelu_matches_torch(dtype, m, n, k, bias, approximate):
    # rows past SMALL_ROWS with a bias take the fused bias + gelu pass; the rest the GEMV
    # or torch's GEMM, then the vectorised activation (tanh) or torch's (erf)
    g = torch.Generator().manual_seed(m + n + k)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    got = cpu_native.linear_gelu(x, w, b, approximate=approximate)
    want = ops.linear_gelu.reference(x.float(), w.float(), None if b is None else b.float(), approximate=approximate)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def _ops_called(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.skipif(not cpu_native.onednn_bf16(), reason="torch's oneDNN has no bf16 GEMM on this CPU")
@pytest.mark.parametrize("m,n,k", [(17, 45, 20), (300, 131, 72), (729, 1152, 1152)])
def test_bf16_bias_and_gelu_go_to_the_gemm_epilogue(m, n, k, monkeypatch):
    # bf16 rows past SMALL_ROWS with a bias: oneDNN adds it (and the tanh gelu) to the fp32
    # accumulator; the bias alone must round like torch's addmm, the gelu once from fp32
    g = torch.Generator().manual_seed(m + n)
    x = (torch.randn(m, k, generator=g) * 2).bfloat16()
    w = (torch.randn(n, k, generator=g) * k**-0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in _ops_called(lambda: cpu_native.linear(x, w, b))
        assert "mkldnn::_linear_pointwise" not in _ops_called(lambda: cpu_native.linear(x, w))  # no bias: mm
        assert "mkldnn::_linear_pointwise" not in _ops_called(lambda: cpu_native.linear(x.float(), w.float(), b.float()))
        got = cpu_native.linear(x, w, b)
        exact = F.linear(x.double(), w.double(), b.double())
        torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())
        assert (got.double() - exact).abs().max() <= (F.linear(x, w, b).double() - exact).abs().max() + 1e-6
        act = cpu_native.linear_gelu(x, w, b, approximate="tanh")
        want = F.gelu(exact, approximate="tanh")
        assert act.dtype == torch.bfloat16 and "mkldnn::_linear_pointwise" in _ops_called(
            lambda: cpu_native.linear_gelu(x, w, b, approximate="tanh"))
        torch.testing.assert_close(act.double(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
        # where oneDNN cannot take bf16, the same calls give the same results through torch and ovfast's pass
        monkeypatch.setattr(cpu_native, "onednn_bf16", lambda: False)
        assert "mkldnn::_linear_pointwise" not in _ops_called(lambda: cpu_native.linear(x, w, b))
        torch.testing.assert_close(cpu_native.linear(x, w, b).double(), exact, rtol=1e-2,
                                   atol=1e-2 * exact.abs().max().item())
        torch.testing.assert_close(cpu_native.linear_gelu(x, w, b, approximate="tanh").double(), want, rtol=2e-2,
                                   atol=2e-2 * want.abs().max().item())


def _mm_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::mm")


@pytest.mark.skipif(not cpu_native.onednn_bf16(), reason="torch's oneDNN has no bf16 GEMM on this CPU")
@pytest.mark.parametrize("m,k", [(17, 20), (300, 72)])
def test_wide_bf16_gemm_runs_as_two_halves(m, k, monkeypatch):
    # a bf16 GEMM wider than WIDE_COLUMNS (lowered here to keep it small) runs as two GEMMs into
    # the halves of one output: the same product, within bf16 rounding of the exact one
    monkeypatch.setattr(cpu_native, "WIDE_COLUMNS", 256)
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * 2).bfloat16()
    w = (torch.randn(384, k, generator=g) * k**-0.5).bfloat16()
    with torch.inference_mode():
        assert _mm_calls(lambda: cpu_native.linear(x, w)) == 2
        got = cpu_native.linear(x, w)
        exact = F.linear(x.double(), w.double())
        assert got.dtype == torch.bfloat16 and got.shape == (m, 384) and got.is_contiguous()
        torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())
        assert (got.double() - exact).abs().max() <= (F.linear(x, w).double() - exact).abs().max() + 1e-6
        # both halves are really there (not one half twice)
        torch.testing.assert_close(got[:, 192:].double(), exact[:, 192:], rtol=1e-2, atol=1e-2 * exact.abs().max().item())
        # one GEMM: not wider than the bound, fp32, a bias, a width not a multiple of 128, a strided input
        narrow = w[:256]
        assert _mm_calls(lambda: cpu_native.linear(x, narrow)) == 1
        assert _mm_calls(lambda: cpu_native.linear(x.float(), w.float())) == 1
        assert _mm_calls(lambda: cpu_native.linear(x, w[:320])) == 1
        assert _mm_calls(lambda: cpu_native.linear(x.t().contiguous().t(), w)) == 1
        assert "mkldnn::_linear_pointwise" in _ops_called(lambda: cpu_native.linear(x, w, torch.zeros(384).bfloat16()))
        monkeypatch.setattr(cpu_native, "onednn_bf16", lambda: False)
        assert _mm_calls(lambda: cpu_native.linear(x, w)) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_run_the_prompt_gemms(dtype):
    # a packed weight: GEMMs past SMALL_ROWS run on oneDNN's copy (with the bias, and for bf16 the
    # gelu, in its epilogue), a few rows stay on the GEMV kernel; results within the dtype's
    # rounding of the exact product
    if not cpu_native.packing_available(dtype):
        pytest.skip(f"torch's oneDNN cannot pack {dtype} weights here")
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(300, 72, generator=g) * 72**-0.5).to(dtype)
    b = torch.randn(300, generator=g).to(dtype)
    other = w.clone()  # the same values, not packed
    assert cpu_native.pack_weights([w], limit_mb=1) == w.numel() * w.element_size()
    pointwise = "mkldnn::_linear_pointwise"
    with torch.inference_mode():
        for rows in (17, 300):
            x = (torch.randn(rows, 72, generator=g) * 2).to(dtype)
            exact = F.linear(x.double(), w.double(), b.double())
            for bias in (None, b):
                ran = _ops_called(lambda: cpu_native.linear(x, w, bias))
                assert pointwise in ran and "aten::mm" not in ran and "aten::addmm" not in ran
                got = cpu_native.linear(x, w, bias)
                want = exact if bias is not None else F.linear(x.double(), w.double())
                tol = TOL[dtype] * want.abs().max().item()
                torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=tol)
            act = cpu_native.linear_gelu(x, w, b, approximate="tanh")
            gelu = F.gelu(exact, approximate="tanh")
            torch.testing.assert_close(act.double(), gelu, rtol=2 * TOL[dtype], atol=2 * TOL[dtype] * gelu.abs().max().item())
            if dtype == torch.float32:  # unpacked fp32 GEMMs stay torch's
                assert pointwise not in _ops_called(lambda: cpu_native.linear(x, other, b))
        few = torch.randn(16, 72, generator=g).to(dtype)
        ran = _ops_called(lambda: cpu_native.linear(few, w, b))
        assert pointwise not in ran and "ovfast_cpu::small_linear" in ran


def test_packing_keeps_to_its_budget_and_dies_with_the_weight():
    if not cpu_native.packing_available(torch.float32):
        pytest.skip("torch's oneDNN cannot pack weights here")
    import gc

    # The count is process-wide: weights packed by earlier tests' models that only wait for the
    # cycle collector must not go mid-test, so collect them first and hold the collector off.
    # A packed weight dies by its reference count alone.
    gc.collect()
    gc.disable()
    try:
        ws = [torch.randn(512, 512) for _ in range(3)]  # 1 MiB each
        before = cpu_native.packed_weight_bytes()
        assert cpu_native.pack_weights(ws, limit_mb=2) == 2 << 20  # in order, while they fit
        assert cpu_native.packed_weight_bytes() == before + (2 << 20)
        assert cpu_native.pack_weights(ws, limit_mb=2) == 2 << 20  # again: nothing new
        assert cpu_native.pack_weights(ws[2:], limit_mb=0) == 0
        assert cpu_native.pack_weights([torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 8).t()], limit_mb=1) == 0
        del ws
        assert cpu_native.packed_weight_bytes() == before
    finally:
        gc.enable()


def test_the_epilogue_leaves_autograd_to_torch():
    # a parameter that needs a gradient, with grad mode on: torch's linear (oneDNN's has no backward)
    x = torch.randn(20, 8).bfloat16()
    w = torch.randn(4, 8).bfloat16().requires_grad_()
    b = torch.randn(4).bfloat16()
    cpu_native.linear(x, w, b).float().sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu_in_place_matches_torch(dtype):
    # the fused pass on its own: y + bias and the activation in fp32, rounded once; N with a tail
    g = torch.Generator().manual_seed(7)
    y = (torch.randn(37, 4304 + 5, generator=g) * 3).to(dtype)
    b = torch.randn(y.shape[1], generator=g).to(dtype)
    want = F.gelu(y.float() + b.float(), approximate="tanh").to(dtype)
    torch.ops.ovfast_cpu.bias_gelu_tanh_(y, b)
    torch.testing.assert_close(y.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)


def test_bias_gelu_checks_its_inputs():
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.ovfast_cpu.bias_gelu_tanh_(torch.randn(4, 8), torch.randn(7))
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.ovfast_cpu.bias_gelu_tanh_(torch.randn(4, 8).bfloat16(), torch.randn(8))
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        torch.ops.ovfast_cpu.bias_gelu_tanh_(torch.randn(4, 8).half(), torch.randn(8).half())


@pytest.mark.parametrize("tiles,seq,heads,d", [(5, 37, 3, 72), (2, 729, 2, 72), (1, 300, 2, 64), (3, 16, 1, 8),
                                                (2, 1, 4, 16), (2, 21, 2, 9)])
def test_prompt_attention_vision_tiles_match_sdpa(tiles, seq, heads, d):
    # q, k, v as the views SigLIP passes (one fused qkv row per token), several equal-length tiles
    # (SigLIP's 729 tokens: three 256-key chunks, the last one short; an odd head size): the
    # kernel's non-causal mode
    g = torch.Generator().manual_seed(tiles * seq + heads * d)
    qkv = torch.randn(tiles * seq, 3, heads, d, generator=g) * 2
    q, k, v = qkv.unbind(1)
    cu = torch.arange(0, (tiles + 1) * seq, seq, dtype=torch.int32)
    got = torch.ops.ovfast_cpu.prompt_attention(q, k, v, tiles, False, d**-0.5)
    want = ops.attention_prefill.reference(q, k, v, cu, seq, causal=False, scale=d**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the routing: tiles take the kernel where it is the tiled one (AVX-512), else torch's
    # flash kernel (faster than the portable one), whose result the reference is exactly
    routed = cpu_native.attention_prefill(q, k, v, cu, seq, causal=False, scale=d**-0.5)
    assert torch.equal(routed, got if cpu_native.prompt_attention_tiles() else want)


@pytest.mark.parametrize("lengths,hq,hk,d", [([5, 40, 1], 14, 2, 64), ([33, 33], 4, 4, 16), ([300], 7, 1, 32)])
def test_prompt_attention_causal_packed_sequences_match_sdpa(lengths, hq, hk, d):
    g = torch.Generator().manual_seed(sum(lengths) + hq)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hk, hk))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    got = cpu_native.attention_prefill(q, k, v, cu, max(lengths), causal=True)
    want = ops.attention_prefill.reference(q, k, v, cu, max(lengths), causal=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start,chunk,hq,hk,d,bs", [(0, 300, 14, 2, 64, 16), (37, 50, 4, 2, 16, 16),
                                                     (100, 1, 7, 1, 32, 32), (15, 17, 2, 2, 8, 16)])
def test_prompt_attention_chunk_after_a_cached_prefix_matches_torch(start, chunk, hq, hk, d, bs):
    # the chunk's k/v are in shuffled pages with NaN everywhere no row may read
    g = torch.Generator().manual_seed(start + chunk + d)
    k_cache, v_cache, tables = _paged([start + chunk], hk, d, bs, torch.float32, g)
    q = torch.randn(chunk, hq, d, generator=g)
    got = cpu_native.attention_chunk(q, k_cache, v_cache, tables[0], start)
    assert torch.isfinite(got).all()
    want = ops.attention_chunk.reference(q, k_cache.nan_to_num(), v_cache.nan_to_num(), tables[0], start)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _sdpa_reference(q, k, v, n, causal, scale):
    """fp32 attention of n equal sequences (q (n*T, Hq, d), k and v (n*S, Hk, d)) on the given
    values; causal: query t sees keys <= S - T + t (a chunk after a cached prefix)."""
    (t, hq, d), (s, hk) = q.shape, k.shape[:2]
    t, s = t // n, s // n
    qq, kk, vv = (x.float().view(n, -1, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
    mask = torch.ones(t, s, dtype=torch.bool).tril(s - t) if causal else None
    out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=hq != hk, scale=scale)
    return out.transpose(1, 2).reshape(n * t, hq, d)


needs_bf16_attention = pytest.mark.skipif(
    not cpu_native.bf16_prompt_attention(),
    reason="the bf16 prompt attention runs on AMX or AVX512-BF16 (amx_bf16 or avx512_bf16 in /proc/cpuinfo)")


@needs_bf16_attention
@pytest.mark.parametrize("n,t,s,hq,hk,d,causal", [
    (5, 37, 37, 3, 3, 72, False),     # vision tiles: head size 72 (V in 16-wide panels), keys not whole panels
    (2, 729, 729, 4, 4, 72, False),   # SigLIP's tile length: three 256-key V chunks, the last one short
    (1, 300, 300, 14, 2, 64, True),   # a causal prompt, 7 query heads per kv head
    (1, 50, 137, 4, 2, 16, True),     # a chunk after an 87-token cached prefix
    (1, 1, 65, 7, 1, 32, True),       # one query, 65 keys: one key in the last panel
    (1, 64, 64, 2, 1, 128, True),     # whole panels exactly; d = 128 (two 64-wide V panels)
    (3, 16, 16, 2, 2, 8, False),      # tiny head size
    (2, 20, 20, 1, 1, 40, True),      # one head (rows read in place), head size 40 (a masked V tail)
])
def test_prompt_attention_bf16_matches_the_fp32_reference(n, t, s, hq, hk, d, causal):
    # bf16 inputs; fp32 arithmetic on them is the reference. The kernel keeps the scores in fp32 and
    # rounds the probabilities to bf16 for the second product, as torch's flash kernel does: its
    # error must be bf16's, and no worse than torch's own bf16 kernel's beyond one rounding
    g = torch.Generator().manual_seed(n * t + s + d)
    q = (torch.randn(n * t, hq, d, generator=g) * 2).bfloat16()
    k = (torch.randn(n * s, hk, d, generator=g) * 2).bfloat16()
    v = torch.randn(n * s, hk, d, generator=g).bfloat16()
    got = torch.ops.ovfast_cpu.prompt_attention(q, k, v, n, causal, d**-0.5)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape and torch.isfinite(got).all()
    want = _sdpa_reference(q, k, v, n, causal, d**-0.5)
    err = (got.float() - want).abs().max().item()
    torch_bf16 = F.scaled_dot_product_attention(
        *(x.view(n, -1, x.shape[1], d).transpose(1, 2) for x in (q, k, v)), enable_gqa=hq != hk, scale=d**-0.5,
        attn_mask=torch.ones(t, s, dtype=torch.bool).tril(s - t) if causal else None).transpose(1, 2).reshape(q.shape)
    assert err <= 2e-2 * want.abs().max().item()
    assert err <= 2 * (torch_bf16.float() - want).abs().max().item() + 4e-3


@needs_bf16_attention
def test_prompt_attention_bf16_reads_strided_views():
    # q, k, v as views of one fused qkv row per token (the model's layout), not contiguous tensors;
    # one and several query heads per kv head (rows read in place, or stacked)
    g = torch.Generator().manual_seed(11)
    for hq, hk in ((14, 2), (3, 3)):
        qkv = torch.randn(200, hq + 2 * hk, 64, generator=g).bfloat16()
        q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
        got = torch.ops.ovfast_cpu.prompt_attention(q, k, v, 1, True, 0.125)
        want = torch.ops.ovfast_cpu.prompt_attention(q.contiguous(), k.contiguous(), v.contiguous(), 1, True, 0.125)
        assert torch.equal(got, want)


def test_prompt_attention_bf16_routing(monkeypatch):
    # bf16 prompts and tiles (causal or not), and chunks after a cached prefix, take the kernel in
    # bf16 where the CPU runs it (AMX or AVX512-BF16); elsewhere they run widened to fp32 on the
    # fp32 routes (the kernel for causal prompts and chunks, and for tiles where it is the tiled
    # one; else torch's flash kernel) and are rounded once
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(80, h, 16, generator=g).bfloat16() for h in (4, 2, 2))
    cu = torch.tensor([0, 40, 80], dtype=torch.int32)
    kernel = "ovfast_cpu::prompt_attention"
    k_cache, v_cache, tables = _paged([60], 2, 16, 16, torch.bfloat16, g)
    qc = torch.randn(20, 4, 16, generator=g).bfloat16()
    for native in sorted({cpu_native.bf16_prompt_attention(), False}, reverse=True):
        monkeypatch.setattr(cpu_native, "bf16_prompt_attention", lambda native=native: native)
        for causal in (True, False):
            ran = _ops_called(lambda: cpu_native.attention_prefill(q, k, v, cu, 40, causal=causal))
            assert (kernel in ran) == (native or causal or cpu_native.prompt_attention_tiles())
            got = cpu_native.attention_prefill(q, k, v, cu, 40, causal=causal)
            assert got.dtype == torch.bfloat16
            want = ops.attention_prefill.reference(q.float(), k.float(), v.float(), cu, 40, causal=causal)
            torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
            if not native:
                widened = cpu_native.attention_prefill(q.float(), k.float(), v.float(), cu, 40, causal=causal)
                assert torch.equal(got, widened.bfloat16())
        assert kernel in _ops_called(lambda: cpu_native.attention_chunk(qc, k_cache, v_cache, tables[0], 40))
        got = cpu_native.attention_chunk(qc, k_cache, v_cache, tables[0], 40)
        want = ops.attention_chunk.reference(qc.float(), k_cache.nan_to_num().float(), v_cache.nan_to_num().float(),
                                             tables[0], 40)
        assert torch.isfinite(got).all() and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
        if not native:
            widened = cpu_native.attention_chunk(qc.float(), k_cache.float(), v_cache.float(), tables[0], 40)
            assert torch.equal(got, widened.bfloat16())


def test_prompt_attention_checks_its_inputs():
    q = torch.randn(10, 4, 8)
    with pytest.raises(RuntimeError, match="at least as many keys"):
        torch.ops.ovfast_cpu.prompt_attention(q, torch.randn(5, 2, 8), torch.randn(5, 2, 8), 1, True, 0.3)
    with pytest.raises(RuntimeError, match="float32, or bfloat16"):
        torch.ops.ovfast_cpu.prompt_attention(q.half(), q.half(), q.half(), 1, False, 0.3)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.ovfast_cpu.prompt_attention(q.bfloat16(), q, q, 1, False, 0.3)
    odd = torch.randn(10, 4, 9).bfloat16()
    with pytest.raises(RuntimeError, match="even head size"):
        torch.ops.ovfast_cpu.prompt_attention(odd, odd, odd, 1, False, 0.3)
    with pytest.raises(RuntimeError, match="shapes"):
        torch.ops.ovfast_cpu.prompt_attention(q, torch.randn(10, 3, 8), torch.randn(10, 3, 8), 1, False, 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rows_take_the_kernels(dtype):
    # rms_norm, rope and silu_mul run the kernels on a prefill chunk's rows too (not only <= 16)
    g = torch.Generator().manual_seed(3)
    x, r = (torch.randn(500, 96, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(96, generator=g).to(dtype)
    got, want = cpu_native.rms_norm(x, w, 1e-6, r), ops.rms_norm.reference(x, w, 1e-6, r)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=1e-6)
    assert torch.equal(got[1], want[1])
    gu = (torch.randn(500, 2 * 40, generator=g) * 4).to(dtype)
    torch.testing.assert_close(cpu_native.silu_mul(gu), ops.silu_mul.reference(gu), rtol=tol, atol=1e-6)
    table = ops.rope_cos_sin_cache(16, 1e6, 1024)
    pos = torch.randint(0, 1024, (500,), generator=g)
    q, k = torch.randn(500, 4, 16, generator=g).to(dtype), torch.randn(500, 2, 16, generator=g).to(dtype)
    q2, k2 = q.clone(), k.clone()
    cpu_native.rope(q, k, pos, table)
    ops.rope.reference(q2, k2, pos, table)
    torch.testing.assert_close(q, q2, rtol=tol, atol=1e-5)
    torch.testing.assert_close(k, k2, rtol=tol, atol=1e-5)


def test_bf16_engine_against_the_fp32_reference(checkpoint_dirs, engines):
    """bf16 on the CPU (the kernels above on every decode op): logits within bf16 tolerance of the
    fp32 engine's, and greedy answers equal to fp32's up to the first step where fp32's top two
    candidates are close (there bf16's rounding may legitimately pick the other one)."""
    import ovfast
    import reference as ref

    fp32 = engines["tiny"]
    bf16 = ovfast.load(checkpoint_dirs["tiny"], dtype="bfloat16", max_seq_len=4096, prefix_caching=False)
    try:
        assert bf16.info()["ops"]["linear"] == "cpu"
        cases = [([ref.synthetic_image(90, 120, 1)], "Describe."), (None, "A text question, a little longer."),
                 ([ref.synthetic_image(64, 64, 3)], "What?")]
        compared = 0
        for images, prompt in cases:
            want, got = fp32.logits(images, prompt), bf16.logits(images, prompt).float()
            err = (got - want).abs()  # bf16 end to end (vision, projector, decoder): ~1e-2 of the scale
            assert err.max() <= 5e-2 * want.abs().max() and err.mean() <= 2.5e-2 * want.abs().mean()
            a = fp32.complete(images, prompt, max_new_tokens=12, ignore_eos=True, logprobs=2)
            b = bf16.complete(images, prompt, max_new_tokens=12, ignore_eos=True)
            wide = 0
            for step in a.logprobs:  # steps while fp32's margin is wide (random weights: margins are small)
                if step.top[0][2] - step.top[1][2] < 0.15:
                    break
                wide += 1
            assert b.token_ids[:wide] == a.token_ids[:wide]
            compared += wide
        assert compared >= 8  # the check compared something
    finally:
        bf16.close()


def test_engine_packs_its_prompt_gemm_weights(engines):
    # a CPU engine's load packs the vision tower's and the decoder's GEMM weights (within the
    # default budget, which the tiny model fits) and says so; its answers are held to
    # transformers' by the parity suite, which runs on these copies
    engine = engines["tiny"]
    weights = engine.model.prompt_gemm_weights()
    want = sum(w.numel() * w.element_size() for w in weights) if cpu_native.packing_available(engine.dtype) else 0
    assert engine.info()["cpu_packed_weights_mib"] == want / 2**20
    assert all((cpu_native._packed_copy(w) is not None) == (want > 0) for w in weights)
