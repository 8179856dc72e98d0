"""Compile every decoder kernel for an H100 (sm_90) through its real launcher, without a GPU.

    TRITON_INTERPRET=0 python tests/kernels/sm90_compile.py

The launchers run on CPU tensors at real model shapes with the GPU configs (``INTERPRET`` is
False); each ``kernel[grid](...)`` is intercepted and compiled to a cubin for sm_90 through the
same binder/specialisation path Triton's JIT uses, and the shared memory the compiled kernel
needs is checked against the H100's 227 KB. This catches what the interpreter cannot: code that
does not lower (constexpr misuse, dot shapes, layouts) and tiles that do not fit. It relies on
Triton internals (``create_function_from_signature``, ``JITFunction._pack_args``) and is run by
``test_compile_sm90.py``, which skips when they are missing. Prints one line per compiled variant.
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # H100 dynamic shared memory per block
BACKEND = make_backend(TARGET)
compiled = []


class Compile:
    """Stands in for a JITFunction: ``kernel[grid](*args, **meta)`` compiles instead of launching."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            fn = self.fn
            binder = create_function_from_signature(fn.signature, fn.params, BACKEND)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(BACKEND, kwargs, bound, specialization, options)
            src = ASTSource(fn, signature, constexprs, attrs)
            kernel = triton.compile(src, target=TARGET, options=options.__dict__)
            shared = kernel.metadata.shared
            meta = {k: v for k, v in kwargs.items() if k.isupper() and k != "INTERPRET"}
            print(f"{fn.__name__:36s} grid={tuple(grid)} warps={options.num_warps} stages={options.num_stages} "
                  f"smem={shared // 1024}KB {meta}", flush=True)
            assert shared <= SMEM_LIMIT, f"{fn.__name__} needs {shared} bytes of shared memory"
            compiled.append(fn.__name__)
        return launch


def patch(module_name: str, *kernel_names: str):
    mod = importlib.import_module(module_name)
    assert not mod.INTERPRET, "run with TRITON_INTERPRET=0"
    mod.check_device = lambda *a, **k: None  # CPU tensors stand in for CUDA ones
    for name in kernel_names:
        setattr(mod, name, Compile(getattr(mod, name)))
    return mod


def main() -> int:
    rms = patch("ovfast.kernels.rms_norm", "_rms_norm_kernel")
    rope = patch("ovfast.kernels.rope", "_rope_kernel")
    silu = patch("ovfast.kernels.silu_mul", "_silu_mul_kernel")
    pre = patch("ovfast.kernels.prefill_attention", "_attention_prefill_kernel")
    dec = patch("ovfast.kernels.decode_attention", "_attention_decode_kernel", "_attention_decode_combine_kernel")
    chunk = patch("ovfast.kernels.chunk_attention", "_attention_chunk_kernel")
    dec.num_sms = lambda device: 132  # H100 SXM
    bf16, f32 = torch.bfloat16, torch.float32

    for d, rows in ((896, 3000), (3584, 1), (8192, 8)):
        x = torch.randn(rows, d, dtype=bf16)
        rms.rms_norm(x, torch.ones(d, dtype=bf16), 1e-6, x)
    rms.rms_norm(torch.randn(4, 1000), torch.ones(1000), 1e-6)

    for t, hq, hkv, d in ((3000, 14, 2, 64), (1, 28, 4, 128)):
        qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=bf16)
        rope.rope(qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d),
                  torch.arange(t), torch.zeros(32768, d))

    silu.silu_mul(torch.randn(3000, 2 * 4864, dtype=bf16))
    silu.silu_mul(torch.randn(1, 2 * 18944, dtype=f32))

    for seqlens, hq, hkv, d, causal, dt in (
        ([3000], 14, 2, 64, True, bf16), ([2000, 17], 28, 4, 128, True, bf16),
        ([729] * 37, 16, 16, 72, False, bf16), ([100], 4, 2, 64, True, f32), ([64], 8, 8, 256, False, torch.float16),
        ([300], 28, 4, 128, True, f32), ([729] * 2, 16, 16, 72, False, f32), ([64], 8, 8, 256, True, f32),
    ):
        total = sum(seqlens)
        qkv = torch.randn(total, (hq + 2 * hkv) * d, dtype=dt)
        q = qkv[:, : hq * d].view(total, hq, d)
        k = qkv[:, hq * d: (hq + hkv) * d].view(total, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(total, hkv, d)
        cu = torch.tensor([0] + torch.tensor(seqlens).cumsum(0).tolist(), dtype=torch.int32)
        pre.attention_prefill(q, k, v, cu, max(seqlens), causal=causal)

    # Paged decode: (B, Hq, Hkv, d, longest sequence, page size, dtype); the tables' width sets the grid.
    for bsz, hq, hkv, d, s_max, page, dt in (
        (1, 14, 2, 64, 16384, 16, bf16), (8, 28, 4, 128, 4096, 16, bf16), (64, 28, 4, 128, 1024, 16, bf16),
        (4, 64, 8, 128, 32768, 16, f32), (2, 8, 8, 256, 512, 16, bf16), (2, 8, 8, 256, 512, 16, f32),
        (8, 28, 4, 128, 4096, 256, bf16),
    ):
        pages = triton.cdiv(s_max, page)
        cache = torch.empty(bsz * pages + 1, page, hkv, d, dtype=dt)
        tables = torch.zeros(bsz, pages, dtype=torch.int32)
        dec.attention_decode(torch.randn(bsz, hq, d, dtype=dt), cache, cache, tables,
                             torch.ones(bsz, dtype=torch.int32))

    # Paged chunks: (T, start, Hq, Hkv, d, page size, dtype); short chunks shrink the query tile.
    for t, start, hq, hkv, d, page, dt in (
        (1, 8191, 14, 2, 64, 16, bf16), (512, 0, 28, 4, 128, 16, bf16), (1024, 3000, 64, 8, 128, 16, bf16),
        (40, 100, 28, 4, 128, 16, bf16), (100, 50, 28, 4, 128, 16, f32), (64, 64, 8, 8, 256, 16, torch.float16),
        (64, 0, 8, 8, 256, 16, f32), (2048, 1000, 28, 4, 128, 256, bf16),
    ):
        pages = triton.cdiv(start + t, page)
        cache = torch.empty(pages + 1, page, hkv, d, dtype=dt)
        qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=dt)
        chunk.attention_chunk(qkv[:, : hq * d].view(t, hq, d), cache, cache,
                              torch.arange(1, pages + 1, dtype=torch.int32), start)

    expected = {"_rms_norm_kernel", "_rope_kernel", "_silu_mul_kernel", "_attention_prefill_kernel",
                "_attention_decode_kernel", "_attention_decode_combine_kernel", "_attention_chunk_kernel"}
    missing = expected - set(compiled)
    assert not missing, f"never compiled: {missing}"
    print(f"compiled {len(compiled)} kernel variants for sm_90 (Triton {triton.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
