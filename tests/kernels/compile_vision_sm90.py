"""Compile every vision kernel for an H100 (sm_90) on a machine without a GPU; run by test_vision_compile_sm90.py.

Triton's compiler and the ptxas in its wheel need no GPU, so this catches what the interpreter
cannot: code that only fails when lowered (layouts, dot shapes, shared memory). Arguments the JIT
would specialise at launch are given as it would: unit strides as constants, 16-byte divisible
pointers and leading strides marked so (without that no loads are pipelined). It must run with
TRITON_INTERPRET unset, i.e. in its own process. Prints one line per compiled kernel; the first
failure raises.
"""
from __future__ import annotations

import importlib
import os
import re
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
patch_embed, projector, bilinear, pillow, _runtime = (
    importlib.import_module(f"ovfast.kernels.{m}")
    for m in ("patch_embed", "projector", "bilinear_resize", "pillow_resize", "_runtime"))


def compile_kernel(kernel, types: dict, consts: dict, aligned: list[str], num_warps: int, num_stages: int = 3):
    """Lower ``kernel`` to a cubin: pointer types in ``types``, other non-constexpr args int32."""
    names = [p.name for p in kernel.params]
    sig = {n: "constexpr" if (n in consts) else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=H100,
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    print(f"ok {kernel.__name__} {consts} warps={num_warps} stages={num_stages}: shared={compiled.metadata.shared} B, "
          f"wgmma={len(re.findall(r'wgmma.mma_async', ptx))}, cp.async={len(re.findall(r'cp.async.', ptx))}, "
          f"{time.perf_counter() - t0:.1f}s", flush=True)


def main() -> None:
    for dt, ieee in (("bf16", False), ("fp32", True)):
        configs = _runtime.GEMM_CONFIGS if dt == "bf16" else _runtime.GEMM_CONFIGS[:1]
        for cfg in configs:  # HWC uint8 tiles read through a permuted view: channel stride 1
            compile_kernel(
                patch_embed._patch_embed_kernel,
                {"px_ptr": "*u8", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "pos_ptr": f"*{dt}", "scale_ptr": "*fp32",
                 "shift_ptr": "*fp32", "out_ptr": f"*{dt}"},
                dict(stride_px_c=1, stride_w_k=1, stride_pos_d=1, stride_out_d=1, PATCH=14, HAS_BIAS=True,
                     HAS_SCALE=True, HAS_SHIFT=True, IEEE=ieee, BF16_FIX=False, **cfg.kwargs),
                ["px_ptr", "w_ptr", "b_ptr", "pos_ptr", "out_ptr", "D", "stride_px_n", "stride_w_d", "stride_pos_p",
                 "stride_out_m"], cfg.num_warps, cfg.num_stages)
        configs = _runtime.GEMM_CONFIGS if dt == "bf16" else _runtime.GEMM_CONFIGS[:1]
        for cfg in configs:
            compile_kernel(
                projector._linear_kernel,
                {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "out_ptr": f"*{dt}"},
                dict(stride_x_k=1, stride_w_k=1, stride_out_n=1, HAS_BIAS=True, ACT=1, IEEE=ieee, BF16_FIX=False,
                     **cfg.kwargs),
                ["x_ptr", "w_ptr", "b_ptr", "out_ptr", "N", "K", "stride_x_m", "stride_w_n", "stride_out_m"],
                cfg.num_warps, cfg.num_stages)
        compile_kernel(
            bilinear._bilinear_resize_kernel, {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "scale_h": "fp32", "scale_w": "fp32"},
            dict(stride_x_c=1, stride_out_c=1, BF16_FIX=False, **dict(zip(("BLOCK_P", "BLOCK_C"), bilinear._blocks(3584)))),
            ["x_ptr", "out_ptr", "C"], 4)
    compile_kernel(
        pillow._pillow_pass_kernel,
        {"src_ptr": "*u8", "dst_ptr": "*u8", "desc_ptr": "*i64", "tab_min_ptr": "*i32", "tab_w_ptr": "*i32"},
        dict(NF=pillow._NF, IDX=tl.int32, BLOCK_Y=pillow._BLOCK_Y, BLOCK_X=pillow._BLOCK_X),
        ["src_ptr", "dst_ptr", "desc_ptr"], 4)


if __name__ == "__main__":
    main()
