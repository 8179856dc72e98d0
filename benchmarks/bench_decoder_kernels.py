"""Decoder kernels against the torch ops they replace, at LLaVA-OneVision's real sizes.

    python benchmarks/bench_decoder_kernels.py [--dtype bfloat16] [--only rms_norm,attention_decode] [--out X.json]

Each row times the Triton kernel (and flash-attn where it is installed, for attention) and the
torch reference of ``ovfast.ops`` on the same inputs with ``triton.testing.do_bench`` (median
ms), and reports the physics: GB/s for the memory-bound kernels (norm, rope, silu_mul, decode
attention: bytes that must cross HBM once) and TFLOP/s for prefill and chunk attention (4 L^2 d
per head and sequence, halved when causal; for a chunk, its rows against the keys they see), each
as a fraction of the H100 peaks we measured (about 3.0 TB/s copy, about 800 TFLOP/s dense bf16).
Sizes: 0.5B (D 896, I 4864, 14/2 heads of 64) and 7B (D 3584, I 18944, 28/4 heads of 128); decode
over a paged cache (shuffled pages of 16 and of 256 positions; flash-attn reads only the latter)
at 1k/4k/16k contexts for batch 1 and 8; prompt chunks of 512/1024 tokens at positions 0, 3k and
15k; prefill of a 3k-token prompt; SigLIP's 37 tiles of 729 tokens (16 heads of 72). Needs a CUDA
GPU: elsewhere it says so and exits 0. A benchmark, not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

PEAK_GBPS = 3000.0  # H100 SXM, measured device-to-device copy
PEAK_TFLOPS = 800.0  # H100 SXM, measured dense bf16 GEMM

MODELS = {  # name: (D, I, Hq, Hkv, head_dim)
    "0.5b": (896, 4864, 14, 2, 64),
    "7b": (3584, 18944, 28, 4, 128),
}


def _ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def _row(op, shape, impls, bytes_moved=None, flops=None):
    """Time each implementation; add GB/s or TFLOP/s and the fraction of the peak."""
    out = {"op": op, "shape": shape}
    for name, fn in impls.items():
        ms = _ms(fn)
        out[f"{name}_ms"] = round(ms, 4)
        if bytes_moved is not None:
            gbps = bytes_moved / ms / 1e6
            out[f"{name}_GBps"] = round(gbps, 1)
            out[f"{name}_peak"] = round(gbps / PEAK_GBPS, 3)
        if flops is not None:
            tflops = flops / ms / 1e9
            out[f"{name}_TFLOPs"] = round(tflops, 1)
            out[f"{name}_peak"] = round(tflops / PEAK_TFLOPS, 3)
    if "torch_ms" in out:
        for name in impls:
            if name != "torch":
                out[f"{name}_speedup"] = round(out["torch_ms"] / out[f"{name}_ms"], 2)
    print("  ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    return out


def bench_rms_norm(dtype, dev):
    from ovfast import kernels, ops

    rows = []
    for model, (d, *_) in MODELS.items():
        for t in (1, 8, 3000):
            x, res = torch.randn(t, d, dtype=dtype, device=dev), torch.randn(t, d, dtype=dtype, device=dev)
            w = torch.rand(d, dtype=dtype, device=dev)
            nbytes = (4 * t * d + d) * x.element_size()  # read x, residual, weight; write out, sum
            rows.append(_row("rms_norm+residual", f"{model} T={t} D={d}", {
                "triton": lambda: kernels.rms_norm(x, w, 1e-6, res),
                "torch": lambda: ops.rms_norm.reference(x, w, 1e-6, res),
            }, bytes_moved=nbytes))
    return rows


def bench_rope(dtype, dev):
    from ovfast import kernels, ops

    rows = []
    for model, (_, _, hq, hkv, hd) in MODELS.items():
        cache = ops.rope_cos_sin_cache(hd, 1e6, 32768, device=dev)
        for t in (8, 3000):
            qkv = torch.randn(t, (hq + 2 * hkv) * hd, dtype=dtype, device=dev)
            q = qkv[:, : hq * hd].view(t, hq, hd)
            k = qkv[:, hq * hd: (hq + hkv) * hd].view(t, hkv, hd)
            pos = torch.randint(0, 32768, (t,), device=dev)
            nbytes = 2 * t * (hq + hkv) * hd * qkv.element_size() + t * hd * 4  # q, k in and out; cos/sin
            rows.append(_row("rope", f"{model} T={t} {hq}/{hkv}x{hd}", {
                "triton": lambda: kernels.rope(q, k, pos, cache),
                "torch": lambda: ops.rope.reference(q, k, pos, cache),
            }, bytes_moved=nbytes))
    return rows


def bench_silu_mul(dtype, dev):
    from ovfast import kernels, ops

    rows = []
    for model, (_, inter, *_) in MODELS.items():
        for t in (1, 8, 3000):
            x = torch.randn(t, 2 * inter, dtype=dtype, device=dev)
            nbytes = 3 * t * inter * x.element_size()  # read gate and up, write the product
            rows.append(_row("silu_mul", f"{model} T={t} I={inter}", {
                "triton": lambda: kernels.silu_mul(x),
                "torch": lambda: ops.silu_mul.reference(x),
            }, bytes_moved=nbytes))
    return rows


def _attention_impls(name, args, kwargs):
    """Triton, flash-attn when installed (and, for the paged ops, the pages are a multiple of 256
    positions, all its paged path reads), and the torch reference for one attention op."""
    from ovfast import ops
    from ovfast.kernels import attention as routing
    from ovfast.kernels.chunk_attention import attention_chunk
    from ovfast.kernels.decode_attention import attention_decode
    from ovfast.kernels.prefill_attention import attention_prefill

    triton_fn = {"attention_prefill": attention_prefill, "attention_chunk": attention_chunk,
                 "attention_decode": attention_decode}[name]
    impls = {"triton": lambda: triton_fn(*args, **kwargs)}
    fa = routing.flash_attn_module()
    if fa is not None and name == "attention_prefill":
        q, k, v, cu, max_len = args
        impls["flash_attn"] = lambda: fa.flash_attn_varlen_func(
            q, k, v, cu, cu, max_len, max_len, softmax_scale=kwargs.get("scale"), causal=kwargs["causal"])
    elif fa is not None and args[1].shape[1] % routing.FLASH_ATTN_PAGE == 0:
        if name == "attention_decode":
            q, kc, vc, tables, lens = args
            impls["flash_attn"] = lambda: fa.flash_attn_with_kvcache(
                q[:, None], kc, vc, cache_seqlens=lens, block_table=tables[: q.shape[0]], causal=True)
        else:
            q, kc, vc, table, start = args
            lens = torch.full((1,), start + q.shape[0], dtype=torch.int32, device=q.device)
            impls["flash_attn"] = lambda: fa.flash_attn_with_kvcache(
                q[None], kc, vc, cache_seqlens=lens, block_table=table[None], causal=True)
    ref = getattr(ops, name).reference
    impls["torch"] = lambda: ref(*args, **kwargs)
    return impls


def _paged_cache(pages, block_size, hkv, hd, dtype, dev):
    """k and v caches of ``pages`` pages plus the null block 0, and the page ids 1..pages in a
    random order (a fragmented cache: no sequence's pages are adjacent)."""
    kc = torch.randn(pages + 1, block_size, hkv, hd, dtype=dtype, device=dev)
    ids = (torch.randperm(pages, device=dev) + 1).to(torch.int32)
    return kc, torch.randn_like(kc), ids


def bench_attention_decode(dtype, dev):
    """Paged decode: B sequences of ctx positions each, tables as wide as the longest context, in
    16-position pages (what the Triton path uses) and 256-position pages (what flash-attn needs)."""
    rows = []
    s_max, max_b = 16384, 8
    for model, (_, _, hq, hkv, hd) in MODELS.items():
        for block_size in (16, 256):
            width = s_max // block_size
            kc, vc, ids = _paged_cache(max_b * width, block_size, hkv, hd, dtype, dev)
            tables = ids.view(max_b, width)
            for bsz in (1, 8):
                q = torch.randn(bsz, hq, hd, dtype=dtype, device=dev)
                for ctx in (1024, 4096, 16384):
                    lens = torch.full((bsz,), ctx, dtype=torch.int32, device=dev)
                    nbytes = 2 * bsz * ctx * hkv * hd * kc.element_size() + 2 * q.numel() * q.element_size()
                    impls = _attention_impls("attention_decode", (q, kc, vc, tables, lens), {"scale": hd**-0.5})
                    shape = f"{model} B={bsz} ctx={ctx} {hq}/{hkv}x{hd} pages={block_size}"
                    rows.append(_row("attention_decode", shape, impls, bytes_moved=nbytes))
    return rows


def bench_attention_chunk(dtype, dev):
    """Chunked prefill: a T-token chunk at position start of one sequence against its pages."""
    rows = []
    for model, (_, _, hq, hkv, hd) in MODELS.items():
        for block_size in (16, 256):
            for t, start in ((512, 0), (1024, 3072), (1024, 15360)):
                pages = -(-(start + t) // block_size)
                kc, vc, table = _paged_cache(pages, block_size, hkv, hd, dtype, dev)
                q = torch.randn(t, hq, hd, dtype=dtype, device=dev)
                flops = 4 * t * (start + (t + 1) / 2) * hd * hq  # QK^T and PV over the visible keys
                impls = _attention_impls("attention_chunk", (q, kc, vc, table, start), {"scale": hd**-0.5})
                rows.append(_row("attention_chunk", f"{model} T={t} start={start} {hq}/{hkv}x{hd} pages={block_size}",
                                 impls, flops=flops))
    return rows


def bench_attention_prefill(dtype, dev):
    rows = []
    cases = [(m, [3000], hq, hkv, hd, True) for m, (_, _, hq, hkv, hd) in MODELS.items()]
    cases.append(("siglip", [729] * 37, 16, 16, 72, False))
    for label, seqlens, hq, hkv, hd, causal in cases:
        total = sum(seqlens)
        qkv = torch.randn(total, (hq + 2 * hkv) * hd, dtype=dtype, device=dev)
        q = qkv[:, : hq * hd].view(total, hq, hd)
        k = qkv[:, hq * hd: (hq + hkv) * hd].view(total, hkv, hd)
        v = qkv[:, (hq + hkv) * hd:].view(total, hkv, hd)
        cu = torch.tensor([0] + torch.tensor(seqlens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        flops = sum(4 * n * n * hd * hq for n in seqlens) * (0.5 if causal else 1.0)
        impls = _attention_impls("attention_prefill", (q, k, v, cu, max(seqlens)), {"causal": causal})
        rows.append(_row("attention_prefill", f"{label} {len(seqlens)}x{seqlens[0]} {hq}/{hkv}x{hd}"
                         f"{' causal' if causal else ''}", impls, flops=flops))
    return rows


BENCHES = {
    "rms_norm": bench_rms_norm, "rope": bench_rope, "silu_mul": bench_silu_mul,
    "attention_decode": bench_attention_decode, "attention_chunk": bench_attention_chunk,
    "attention_prefill": bench_attention_prefill,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_decoder_kernels needs a CUDA GPU (the Triton kernels are only interpreted on the CPU); skipping.")
        return 0
    dtype, dev = getattr(torch, args.dtype), torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for name in args.only.split(","):
            rows += BENCHES[name](dtype, dev)
    result = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(), "dtype": args.dtype,
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "peaks": {"GBps": PEAK_GBPS, "TFLOPs": PEAK_TFLOPS}, "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
