"""silu_mul kernel against ovfast.ops.silu_mul.reference (F.silu(gate) * up in the activation dtype).

Tolerance: fp32 1e-5; fp16/bf16 every element within one ulp of torch's result and at most 1% of
them different (the kernel rounds where torch rounds; only exp's last bit can move a rounding).
"""
from __future__ import annotations

import importlib

import pytest
import torch
from decoder_checks import DEVICE, DTYPE_IDS, DTYPES, assert_close, assert_within_ulp

from ovfast import ops
from ovfast.ops import backends

kernel = importlib.import_module("ovfast.kernels.silu_mul")

SHAPES = [(1, 8), (7, 77), (33, 1000), (3, 4864)]  # (rows, I); the last is the 0.5B MLP width
GPU_SHAPES = [(1, 4864), (3000, 4864), (8, 18944), (2048, 18944), (5, 1001)]


def _gate_up(rows, inter, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype).to(DEVICE)  # wide range: silu's tails


def _check(gate_up, dtype, atol, rtol):
    out = kernel.silu_mul(gate_up)
    expected = ops.silu_mul.reference(gate_up)
    assert out.dtype == gate_up.dtype and out.shape == expected.shape
    if dtype == torch.float32:
        assert_close(out, expected, atol, rtol)
    else:
        assert_within_ulp(out, expected)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,inter", SHAPES)
def test_silu_mul_matches_reference(rows, inter, dtype, atol, rtol):
    _check(_gate_up(rows, inter, dtype, seed=rows + inter), dtype, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_silu_mul_strided_rows_and_3d(dtype, atol, rtol):
    big = _gate_up(6, 100, dtype, seed=4)  # (6, 200)
    x = big[:, 20:170]  # (6, 150): rows strided by 200, I = 75
    assert not x.is_contiguous()
    _check(x, dtype, atol, rtol)
    _check(big.view(2, 3, 200), dtype, atol, rtol)


def test_silu_mul_uses_gate_then_up():
    """silu applies to the first half only: swapping the halves changes the result."""
    x = _gate_up(3, 16, torch.float32, seed=5)
    swapped = torch.cat((x[:, 16:], x[:, :16]), dim=1)
    assert not torch.allclose(kernel.silu_mul(x), kernel.silu_mul(swapped))


def test_silu_mul_rejects_odd_width():
    with pytest.raises(ValueError, match="even"):
        kernel.silu_mul(torch.randn(2, 7, device=DEVICE))


def test_dispatch_routes_silu_mul_to_the_kernel():
    x = _gate_up(4, 24, torch.bfloat16, seed=6)
    with backends.kernel_mode("triton"):
        assert backends.kernel_for("silu_mul", x.device) is importlib.import_module("ovfast.kernels").silu_mul
        out = ops.silu_mul(x)
    assert_within_ulp(out, ops.silu_mul.reference(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,inter", GPU_SHAPES)
def test_silu_mul_real_sizes(rows, inter, dtype, atol, rtol):
    _check(_gate_up(rows, inter, dtype, seed=rows), dtype, atol, rtol)
