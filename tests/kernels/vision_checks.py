"""Shared assertions and settings of the kernel tests (imported by name: pytest puts this folder on sys.path).

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1); with CUDA they are compiled and run on the GPU.
Under the interpreter ovfast.kernels works around two bf16 bugs of Triton 3.9's interpreter
(garbage from tl.dot on bf16 operands, truncating fp32 -> bf16 casts): see kernels/_runtime.py
and test_projector.py::test_interpreter_bf16_traps_are_worked_around.
"""
from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The fp32 references must be IEEE fp32: cuDNN's convolution uses TF32 by default.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# (dtype, atol, rtol) against the torch reference run in the same dtype: fp32 to accumulation-order
# noise; fp16 / bf16 to about two ulps of the output (bf16's ulp is 2^-8 relative).
FLOAT_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-2, 1e-2),
    (torch.bfloat16, 2e-2, 2e-2),
]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality; on failure, name the first mismatching positions and values."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    bad = (actual != expected).nonzero()
    if len(bad):
        first = [(tuple(i.tolist()), actual[tuple(i)].item(), expected[tuple(i)].item()) for i in bad[:8]]
        raise AssertionError(f"{what}: {len(bad)} of {actual.numel()} values differ; first (index, got, want): {first}")


def assert_close_to_reference(actual: torch.Tensor, ref: torch.Tensor, ref32: torch.Tensor, atol: float,
                              rtol: float) -> None:
    """``actual`` within (atol, rtol) of the reference run in its dtype, and its error against the
    fp32 reference at most twice the same-dtype reference's own error plus atol (flash-attn's rule)."""
    assert actual.dtype == ref.dtype and actual.shape == ref.shape
    torch.testing.assert_close(actual.float(), ref.float(), atol=atol, rtol=rtol)
    err = (actual.float() - ref32.float()).abs().max().item()
    ref_err = (ref.float() - ref32.float()).abs().max().item()
    assert err <= 2 * ref_err + atol, (
        f"kernel error {err:.3g} against the fp32 reference; torch's own in {ref.dtype}: {ref_err:.3g}")
