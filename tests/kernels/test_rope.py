"""rope kernel against ovfast.ops.rope.reference: in place, through the strides of fused-qkv views.

fp16/bf16 results must be bit-exact (the kernel rounds after every operation, in torch's order);
fp32 within 1e-5 (a GPU may fuse a multiply-add).
"""
from __future__ import annotations

import importlib

import pytest
import torch
from decoder_checks import DEVICE, DTYPE_IDS, DTYPES, assert_close

from ovfast import ops
from ovfast.ops import backends

kernel = importlib.import_module("ovfast.kernels.rope")

# (T, Hq, Hkv, d)
SHAPES = [(1, 2, 1, 8), (7, 6, 2, 16), (33, 7, 1, 64), (5, 3, 3, 72), (129, 4, 2, 8)]
GPU_SHAPES = [(1, 14, 2, 64), (3000, 14, 2, 64), (8, 28, 4, 128), (4096, 28, 4, 128), (77, 64, 8, 128)]
MAX_POS = 4096


def _qkv(t, hq, hkv, d, dtype, seed):
    """q, k, v as the model makes them: views of one fused (T, (Hq + 2 Hkv) d) projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(t, (hq + 2 * hkv) * d, generator=g) * 2).to(dtype).to(DEVICE)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    positions = torch.randint(1, MAX_POS, (t,), generator=g).to(DEVICE)  # any order; > 0 so every row rotates
    return qkv, q, k, positions


def _check(t, hq, hkv, d, dtype, atol, rtol, seed=0):
    qkv, q, k, positions = _qkv(t, hq, hkv, d, dtype, seed)
    cache = ops.rope_cos_sin_cache(d, 1e6, MAX_POS, device=DEVICE)
    original, expected = qkv.clone(), qkv.clone()
    eq = expected[:, : hq * d].view(t, hq, d)
    ek = expected[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    ops.rope.reference(eq, ek, positions, cache)
    assert kernel.rope(q, k, positions, cache) is None
    assert not torch.equal(qkv, original)  # it did rotate (positions > 0)
    if dtype == torch.float32:
        assert_close(qkv, expected, atol, rtol)
    else:
        assert torch.equal(qkv, expected), (qkv.float() - expected.float()).abs().max()
    # v (the last columns) is untouched: the kernel wrote only through q's and k's strides.
    assert torch.equal(qkv[:, (hq + hkv) * d:], expected[:, (hq + hkv) * d:])


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("t,hq,hkv,d", SHAPES)
def test_rope_matches_reference_in_place(t, hq, hkv, d, dtype, atol, rtol):
    _check(t, hq, hkv, d, dtype, atol, rtol, seed=t * hq + d)


def test_rope_changes_values():
    """Guard against a no-op kernel passing: positions > 0 rotate q and k."""
    _, q, k, positions = _qkv(7, 6, 2, 16, torch.float32, seed=1)
    before = q.clone(), k.clone()
    kernel.rope(q, k, positions.clamp_min(1), ops.rope_cos_sin_cache(16, 1e6, MAX_POS, device=DEVICE))
    assert not torch.allclose(q, before[0]) and not torch.allclose(k, before[1])


def test_rope_contiguous_and_int32_positions():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(9, 3, 16, generator=g).to(torch.bfloat16).to(DEVICE)
    k = torch.randn(9, 1, 16, generator=g).to(torch.bfloat16).to(DEVICE)
    pos = torch.arange(100, 109, dtype=torch.int32, device=DEVICE)
    cache = ops.rope_cos_sin_cache(16, 1e6, 200, device=DEVICE)
    eq, ek = q.clone(), k.clone()
    ops.rope.reference(eq, ek, pos, cache)
    kernel.rope(q, k, pos, cache)
    assert torch.equal(q, eq) and torch.equal(k, ek)


def test_rope_rejects_bad_input():
    _, q, k, positions = _qkv(4, 2, 1, 16, torch.float32, seed=3)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        kernel.rope(q, k, positions, ops.rope_cos_sin_cache(8, 1e6, 10, device=DEVICE))
    with pytest.raises(ValueError, match="disagree"):
        kernel.rope(q, k, positions[:3], ops.rope_cos_sin_cache(16, 1e6, 10, device=DEVICE))
    with pytest.raises(TypeError):
        kernel.rope(q, k, positions, ops.rope_cos_sin_cache(16, 1e6, 10, device=DEVICE).half())


def test_dispatch_routes_rope_to_the_kernel():
    with backends.kernel_mode("triton"):
        assert backends.kernel_for("rope", torch.device(DEVICE)) is importlib.import_module("ovfast.kernels").rope


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("t,hq,hkv,d", GPU_SHAPES)
def test_rope_real_sizes(t, hq, hkv, d, dtype, atol, rtol):
    _check(t, hq, hkv, d, dtype, atol, rtol, seed=t + d)
