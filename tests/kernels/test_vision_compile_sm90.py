"""The vision kernels lower to H100 (sm_90) machine code, checked on a machine without a GPU."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ovfast.kernels._runtime import GEMM_CONFIGS

SCRIPT = Path(__file__).with_name("compile_vision_sm90.py")


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="Triton has no NVIDIA backend here")
def test_every_kernel_compiles_for_h100():
    # The interpreter replaces @triton.jit at definition time, so compiling needs a fresh process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its (and 3.6's) default
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [x for x in run.stdout.splitlines() if x.startswith("ok ")]
    n = len(GEMM_CONFIGS)
    assert len(lines) == 2 * (n + 1) + 3, run.stdout  # n + 1 patch_embed, n + 1 linear, 2 bilinear, 1 Pillow pass
    bf16_gemms = [x for x in lines if ("_patch_embed_kernel" in x or "_linear_kernel" in x) and "'IEEE': False" in x]
    assert len(bf16_gemms) == 2 * n
    for line in bf16_gemms:  # on Hopper's wgmma, and every tuning candidate fits in 227 KiB of shared memory
        assert "wgmma=0" not in line, line
        assert int(re.search(r"shared=(\d+) B", line).group(1)) <= 232448, line
