"""ovfast.kernels.projector against ovfast.ops.projector.reference (Linear -> GELU -> Linear)."""
from __future__ import annotations

import pytest
import torch
from vision_checks import DEVICE, DTYPE_IDS, FLOAT_TOLERANCES, assert_close_to_reference

from ovfast import ops
from ovfast.kernels import _runtime, projector

# (leading shape of x, E, D): rows and widths off the block multiples (64 under the
# interpreter), LLaVA-OV's E = 1152 with the 0.5B model's D = 896, and the tiny models' sizes.
SHAPES = [
    ((3, 37), 72, 100),
    ((14, 27), 48, 48),
    ((37, 5), 24, 40),
    ((5,), 1152, 896),
    ((2, 3, 7), 36, 48),
]
SHAPE_IDS = ["x".join(map(str, lead)) + f"-E{e}-D{d}" for lead, e, d in SHAPES]


def _params(e, d, dtype, gen, bias=True):
    w1 = (torch.randn(d, e, generator=gen) / e**0.5).to(DEVICE, dtype)
    w2 = (torch.randn(d, d, generator=gen) / d**0.5).to(DEVICE, dtype)
    b1 = torch.randn(d, generator=gen).to(DEVICE, dtype) if bias else None
    b2 = torch.randn(d, generator=gen).to(DEVICE, dtype) if bias else None
    return w1, b1, w2, b2


def _fp32(params):
    return [None if p is None else p.float() for p in params]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype,atol,rtol", FLOAT_TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead,e,d", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(lead, e, d, dtype, atol, rtol, approximate):
    gen = torch.Generator().manual_seed(e + d)
    x = (2 * torch.randn(*lead, e, generator=gen)).to(DEVICE, dtype)  # wide range: erf and tanh GELU differ
    params = _params(e, d, dtype, gen)
    out = projector(x, *params, approximate)
    ref = ops.projector.reference(x, *params, approximate)
    ref32 = ops.projector.reference(x.float(), *_fp32(params), approximate)
    assert out.shape == (*lead, d)
    assert_close_to_reference(out, ref, ref32, atol, rtol)


def test_erf_and_tanh_gelu_differ():
    """The approximate flag reaches the kernel: the two GELUs give visibly different results."""
    gen = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(40, 24, generator=gen)).to(DEVICE)
    params = _params(24, 32, torch.float32, gen)
    assert not torch.allclose(projector(x, *params, "none"), projector(x, *params, "tanh"), atol=1e-4)


def test_without_biases():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 50, 24, generator=gen).to(DEVICE)
    params = _params(24, 40, torch.float32, gen, bias=False)
    torch.testing.assert_close(projector(x, *params), ops.projector.reference(x, *params), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol,rtol", FLOAT_TOLERANCES, ids=DTYPE_IDS)
def test_writes_into_a_slot_of_a_larger_buffer(dtype, atol, rtol):
    """out= a view of the prompt's embedding rows: written in place, the rows around it untouched."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 37, 48, generator=gen).to(DEVICE, dtype)
    params = _params(48, 40, dtype, gen)
    buffer = torch.full((100, 40), 7.0, dtype=dtype, device=DEVICE)
    slot = buffer[10:84].view(2, 37, 40)
    assert projector(x, *params, out=slot).data_ptr() == slot.data_ptr()
    ref = ops.projector.reference(x, *params)
    ref32 = ops.projector.reference(x.float(), *_fp32(params))
    assert_close_to_reference(slot, ref, ref32, atol, rtol)
    assert bool((buffer[:10] == 7).all()) and bool((buffer[84:] == 7).all())


def test_out_whose_rows_do_not_merge():
    """An out view whose leading dims cannot be flattened still receives the result."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, 24, generator=gen).to(DEVICE)
    params = _params(24, 16, torch.float32, gen)
    out = torch.zeros(5, 3, 16, device=DEVICE).transpose(0, 1)  # (3, 5, 16), rows 3 apart
    projector(x, *params, out=out)
    torch.testing.assert_close(out, ops.projector.reference(x, *params), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not _runtime.INTERPRET, reason="the traps are in Triton's interpreter only")
def test_interpreter_bf16_traps_are_worked_around(monkeypatch):
    """Triton 3.9's interpreter gives garbage for bf16 tl.dot and truncates fp32 -> bf16 casts;
    BF16_FIX (fp32 dot operands, rounding on the bits) is what makes the bf16 results right.
    If this starts failing because the traps are gone, the workaround can be removed."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 37, 72, generator=gen).to(DEVICE, torch.bfloat16)
    params = _params(72, 100, torch.bfloat16, gen)
    ref = ops.projector.reference(x, *params).float()
    fixed = projector(x, *params).float()
    monkeypatch.setattr(_runtime, "BF16_FIX", False)
    broken = projector(x, *params).float()
    assert (fixed - ref).abs().max() < 0.1
    assert not torch.allclose(broken, ref, atol=1.0, rtol=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [896, 3584])
@pytest.mark.parametrize("dtype,atol,rtol", FLOAT_TOLERANCES[1:], ids=DTYPE_IDS[1:])
def test_real_size_on_gpu(d, dtype, atol, rtol):
    """37 crops x 729 patches of SigLIP features into the 0.5B (896) and 7B (3584) decoder widths."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(37, 729, 1152, generator=gen).to(DEVICE, dtype)
    params = _params(1152, d, dtype, gen)
    out = projector(x, *params)
    assert_close_to_reference(out, ops.projector.reference(x, *params),
                              ops.projector.reference(x.float(), *_fp32(params)), atol, rtol)
