"""Error budgets shared by the decoder-kernel tests (imported by name: pytest puts this folder on sys.path).

Under ``TRITON_INTERPRET=1`` (no GPU) the kernels run in Triton's interpreter on the CPU: the
launchers pick small fixed blocks there, and bf16 dot operands are upcast to fp32 (the
interpreter's bf16 ``tl.dot`` is wrong), see ``kernels/_runtime.py``.
"""
from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol) for results that are not bit-exact; 16-bit: about one ulp at the result's scale.
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-3, 2.0**-10),
    (torch.bfloat16, 1e-2, 2.0**-7),
]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def report_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, n: int = 5) -> str:
    idx = bad.nonzero()[:n].tolist()
    rows = [f"  at {tuple(i)}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}"
            for i in idx]
    return f"{int(bad.sum())} of {bad.numel()} elements differ; first ones:\n" + "\n".join(rows)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """|actual - expected| <= atol + rtol |expected| elementwise, listing the first mismatches."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.float(), expected.float()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    assert not bad.any(), report_mismatch(a, e, bad)


def assert_within_ulp(actual: torch.Tensor, expected: torch.Tensor, max_fraction: float = 0.01) -> None:
    """16-bit results: every element within one ulp of the reference and at most ``max_fraction`` not equal."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    mant = {torch.float16: 10, torch.bfloat16: 7}[actual.dtype]
    a, e = actual.float(), expected.float()
    ulp = torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(torch.finfo(actual.dtype).tiny))) - mant)
    bad = (a - e).abs() > ulp
    assert not bad.any(), report_mismatch(a, e, bad)
    differ = (a != e).float().mean().item()
    assert differ <= max_fraction, f"{differ:.2%} of the elements differ from torch's (allowed {max_fraction:.0%})"


def assert_attention_close(out: torch.Tensor, run_reference, dtype: torch.dtype) -> None:
    """The flash-attention rule: the kernel's error against the fp32 reference is at most twice the
    error of the same reference computed in ``dtype``, plus the dtype's rounding noise at the output
    scale. ``run_reference(dtype)`` returns the reference output computed in that dtype."""
    ref32 = run_reference(torch.float32).float()
    if dtype == torch.float32:
        assert_close(out, ref32, atol=1e-5, rtol=1e-5)
        return
    ref_low = run_reference(dtype).float()
    noise = ((ref32.to(dtype) + 0.3 - 0.3).float() - ref32.float()).abs().max().item()
    err = (out.float() - ref32).abs().max().item()
    budget = 2 * (ref_low - ref32).abs().max().item() + noise
    assert err <= budget, f"max error {err:.3g} > budget {budget:.3g} (2x the {dtype} reference's error + {noise:.3g})"
    assert torch.isfinite(out).all()
