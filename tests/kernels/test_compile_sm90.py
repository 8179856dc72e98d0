"""Every decoder kernel compiles for an H100 (sm_90) with its GPU configs, in CI without a GPU.

The interpreter checks the numerics but not whether the kernels lower to GPU code, nor whether
their tiles fit in shared memory: ``sm90_compile.py`` runs the real launchers with
TRITON_INTERPRET=0 on CPU tensors and compiles each launch to a cubin (see its docstring).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _internals_available() -> bool:
    try:
        from triton.backends import backends
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError:
        return False
    return "nvidia" in backends and hasattr(JITFunction, "_pack_args")


@pytest.mark.skipif(not _internals_available(), reason="this Triton lacks the internals the compile check uses")
def test_decoder_kernels_compile_for_sm90():
    script = Path(__file__).with_name("sm90_compile.py")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "kernel variants for sm_90" in done.stdout
    for name in ("_rms_norm_kernel", "_rope_kernel", "_silu_mul_kernel", "_attention_prefill_kernel",
                 "_attention_decode_kernel", "_attention_decode_combine_kernel", "_attention_chunk_kernel"):
        assert name in done.stdout
