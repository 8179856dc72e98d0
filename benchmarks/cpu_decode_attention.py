"""The CPU decode attention kernel against the torch path it replaces, at the 0.5B model's shapes.

    python benchmarks/cpu_decode_attention.py [--dtypes float32,bfloat16] [--layers 24]

Each row: `rows` sequences of `context` positions over a paged cache of shuffled 16-position
pages, one layer's call timed over `--layers` distinct layers' caches (so the KV comes from
memory, as in a real step, not from a cache level that one layer would fit), best of `--repeats`.
Reports ms per layer and the KV bytes read per second (each position's K and V for every kv head
once). The torch path is ovfast.ops' reference (it gathers the context, then SDPA). A benchmark,
not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import time

import torch

from ovfast import ops
from ovfast.ops import cpu_native


def run(fn, q, k, v, tables, lens, scale, layers: int, repeats: int) -> float:
    for i in range(min(3, layers)):
        fn(q, k[i], v[i], tables, lens, scale=scale)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(layers):
            fn(q, k[i], v[i], tables, lens, scale=scale)
        best = min(best, (time.perf_counter() - t0) / layers)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapes", default="1x1000,1x3000,4x3000,1x8000", help="rows x context, comma-separated")
    p.add_argument("--heads", default="14,2,64", help="query heads, kv heads, head_dim (0.5B)")
    args = p.parse_args()
    if not cpu_native.available():
        raise SystemExit("the CPU kernels are not available here (see docs/cpu.md)")
    hq, hk, d = (int(x) for x in args.heads.split(","))
    bs, scale = 16, d**-0.5
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; heads {hq}/{hk} of {d}")
    print(f"{'dtype':9s} {'rows x ctx':>11s} {'kernel ms':>10s} {'GB/s':>6s} {'torch ms':>9s} {'speed-up':>8s}")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        for shape in args.shapes.split(","):
            rows, ctx = (int(x) for x in shape.split("x"))
            per = -(-ctx // bs)
            blocks = rows * per + 1
            k = torch.randn(args.layers, blocks, bs, hk, d, generator=g).to(dtype)
            v = torch.randn(args.layers, blocks, bs, hk, d, generator=g).to(dtype)
            tables = (torch.randperm(blocks - 1, generator=g) + 1)[: rows * per].view(rows, per).to(torch.int32)
            lens = torch.full((rows,), ctx, dtype=torch.int32)
            q = torch.randn(rows, hq, d, generator=g).to(dtype)
            kernel = run(cpu_native.attention_decode, q, k, v, tables, lens, scale, args.layers, args.repeats)
            ref = run(ops.attention_decode.reference, q, k, v, tables, lens, scale, args.layers, args.repeats)
            gbs = 2 * rows * ctx * hk * d * k.element_size() / (kernel * 1e-3) / 1e9
            print(f"{name:9s} {shape:>11s} {kernel:10.3f} {gbs:6.1f} {ref:9.3f} {ref / kernel:7.1f}x", flush=True)


if __name__ == "__main__":
    main()
