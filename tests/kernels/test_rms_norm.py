"""rms_norm kernel against ovfast.ops.rms_norm.reference (transformers' cast order).

The residual sum must be bit-exact (torch adds in fp32 and rounds once, as the kernel does); the
normalised output is within 1e-5 in fp32 and within one ulp (nearly always equal) in fp16/bf16,
where only the fp32 sum order and rsqrt's last bit can move a rounding.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from decoder_checks import DEVICE, DTYPE_IDS, DTYPES, assert_close, assert_within_ulp

import ovfast
from ovfast import ops
from ovfast.ops import backends

kernel = importlib.import_module("ovfast.kernels.rms_norm")

SHAPES = [(1, 40), (7, 48), (33, 1000), (5, 896)]  # awkward widths, one real (0.5B)
GPU_SHAPES = [(1, 896), (4096, 896), (3000, 3584), (8, 3584), (17, 8192), (2, 1000)]


def _inputs(rows, width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g) * 2 + 0.5).to(dtype)
    res = torch.randn(rows, width, generator=g).to(dtype)
    w = (torch.rand(width, generator=g) + 0.5).to(dtype)
    return x.to(DEVICE), res.to(DEVICE), w.to(DEVICE)


def _check(x, w, res, dtype, atol, rtol):
    eps = 1e-6
    if res is None:
        out = kernel.rms_norm(x, w, eps)
        expected = ops.rms_norm.reference(x, w, eps)
    else:
        out, s = kernel.rms_norm(x, w, eps, res)
        expected, expected_s = ops.rms_norm.reference(x, w, eps, res)
        assert s.dtype == x.dtype and torch.equal(s, expected_s), "the residual sum must be bit-exact"
    assert out.dtype == expected.dtype
    if dtype == torch.float32:
        assert_close(out, expected, atol, rtol)
    else:
        assert_within_ulp(out, expected)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows,width", SHAPES)
def test_rms_norm_matches_reference(rows, width, residual, dtype, atol, rtol):
    x, res, w = _inputs(rows, width, dtype, seed=rows * width)
    _check(x, w, res if residual else None, dtype, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_rms_norm_strided_rows_and_3d(dtype, atol, rtol):
    """Rows with a stride larger than the width (a column slice) and a (B, S, D) input."""
    big, res, w = _inputs(9, 130, dtype, seed=3)
    x = big[:, 10:58]  # (9, 48), row stride 130
    assert not x.is_contiguous()
    _check(x, w[:48].contiguous(), res[:, :48], dtype, atol, rtol)
    x3 = big[:8].reshape(2, 4, 130)
    _check(x3, w, res[:8].reshape(2, 4, 130), dtype, atol, rtol)


def test_rms_norm_promotes_like_torch():
    """An fp32 weight on bf16 activations gives an fp32 result, as ``weight * h.to(x.dtype)`` does."""
    x, res, _ = _inputs(6, 40, torch.bfloat16, seed=5)
    w = (torch.rand(40) + 0.5).to(DEVICE)
    _check(x, w, res, torch.float32, 1e-5, 1e-5)


def test_rms_norm_rejects_bad_input():
    x, _, w = _inputs(3, 40, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        kernel.rms_norm(x, w[:39], 1e-6)
    with pytest.raises(ValueError, match="residual"):
        kernel.rms_norm(x, w, 1e-6, x[:2])
    with pytest.raises(TypeError, match="dtype"):
        kernel.rms_norm(x.to(torch.int32), w, 1e-6)


def test_dispatch_routes_rms_norm_to_the_kernel():
    x, res, w = _inputs(4, 48, torch.bfloat16, seed=9)
    with backends.kernel_mode("triton"):
        assert backends.kernel_for("rms_norm", x.device) is ovfast.kernels.rms_norm
        out, s = ops.rms_norm(x, w, 1e-6, res)
    expected, expected_s = ops.rms_norm.reference(x, w, 1e-6, res)
    assert torch.equal(s, expected_s)
    assert_within_ulp(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,width", GPU_SHAPES)
def test_rms_norm_real_sizes(rows, width, dtype, atol, rtol):
    x, res, w = _inputs(rows, width, dtype, seed=rows + width)
    _check(x, w, res, dtype, atol, rtol)
    _check(x, w, None, dtype, atol, rtol)
