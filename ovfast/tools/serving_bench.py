"""``ovfast bench --concurrency N``: many clients sharing one engine, against one request at a time.

N client threads each send their share of a fixed list of requests (a mix of text, image and
video), waiting an exponential think time between requests, so arrivals are Poisson-like with
``--rate`` requests/s overall (0: no think time, every client always has a request in flight).
Each request is streamed: its time to first token is first text piece minus submission, its
inter-token latencies are the gaps between pieces. The same list then runs one request at a time
on the same engine (the baseline, as a single-stream caller sees it), and the report gives
requests/s, output tokens/s, TTFT and inter-token p50/p99 for both, the throughput ratio, and
whether every greedy answer under load equals its answer alone (it must).
"""
from __future__ import annotations

import argparse
import datetime
import random
import threading
import time

import numpy as np
import torch

from ..terminal.arguments import non_negative_float, positive_int
from ..inputs.media import Video
from ..terminal.progress import progress
from .bench_common import (device_and_dtype, device_name, log, peak_memory, plural, prepare, question, run_threads,
                           write_results)
from .demo import synthetic_image

KINDS = ("text", "image", "video")


def workload(count: int, mix: dict[str, float], seed: int, video_frames: int) -> list[tuple[str, list]]:
    """``count`` requests as (kind, items): kinds drawn by ``mix`` weights, each with its own media."""
    rng = random.Random(seed)
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=count)
    out = []
    for i, kind in enumerate(kinds):
        if kind == "image":
            items = [synthetic_image(rng.choice((360, 480, 720)), rng.choice((480, 640, 960)), seed * 1000 + i)]
        elif kind == "video":
            frames = [np.asarray(synthetic_image(240, 320, seed * 1000 + i * 64 + f)) for f in range(video_frames)]
            items = [Video(frames)]
        else:
            items = []
        out.append((kind, items))
    return out


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _one(engine, items: list, prompt: str, new_tokens: int) -> dict:
    """Stream one request; its timeline as the client sees it."""
    t0 = time.perf_counter()
    handle = engine.submit(items, prompt, max_new_tokens=new_tokens, ignore_eos=True)
    stamps = [time.perf_counter() for _ in handle]
    c = handle.result()
    t1 = time.perf_counter()
    return {"start": t0, "end": t1, "ttft_ms": ((stamps[0] if stamps else t1) - t0) * 1e3,
            "gaps_ms": [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])], "tokens": len(c.token_ids),
            "token_ids": c.token_ids}


def run_load(engine, requests: list, prompt: str, new_tokens: int, clients: int, rate: float, seed: int,
             desc: str = "requests") -> list:
    """Every request through ``clients`` concurrent client threads; results in request order."""
    results: list = [None] * len(requests)
    errors: list[BaseException] = []
    bar = progress(desc=desc, total=len(requests), unit=" requests")
    lock = threading.Lock()  # the bar's count is not thread-safe

    def client(c: int) -> None:
        rng = random.Random(seed + c)
        for i in range(c, len(requests), clients):
            if rate > 0:
                time.sleep(rng.expovariate(rate / clients))
            try:
                results[i] = _one(engine, requests[i][1], prompt, new_tokens)
            except BaseException as e:  # reported after the run; the other clients go on
                errors.append(e)
            with lock:
                bar.update()

    run_threads(client, clients, bar, errors, "request", " under load")
    return results


def summarise(results: list) -> dict:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft_ms"] for r in results]
    gaps = [g for r in results for g in r["gaps_ms"]]
    return {
        "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
        "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
        "ttft_ms": {"p50": _percentile(ttft, 0.5), "p99": _percentile(ttft, 0.99)},
        "inter_token_ms": {"p50": _percentile(gaps, 0.5), "p99": _percentile(gaps, 0.99)},
    }


def run(args) -> dict:
    device, dtype = device_and_dtype(args)
    mix = args.mix
    count = args.requests or 4 * args.concurrency
    log(f"{args.model} on {device_name(device)}: {plural(args.concurrency, 'client')}, {plural(count, 'request')}, "
        f"mix {format_mix(mix)}")
    _, engine, _ = prepare(args.model, device, dtype, False, args.max_seq_len,
                           max_batch_size=args.max_batch_size or args.concurrency,
                           tensor_parallel_size=args.tensor_parallel_size)
    try:
        prompt = question(engine, args.question_tokens)
        requests = workload(count, mix, args.seed, args.video_frames)
        log("warm-up ...")
        for kind in sorted(set(k for k, _ in requests)):
            items = next(items for k, items in requests if k == kind)
            engine.complete(items, prompt, max_new_tokens=2, ignore_eos=True)
        log("concurrent ...")
        loaded = run_load(engine, requests, prompt, args.new_tokens, args.concurrency, args.rate, args.seed,
                          desc="concurrent")
        log("one at a time ...")
        alone = run_load(engine, requests, prompt, args.new_tokens, 1, 0.0, args.seed, desc="one at a time")
        concurrent, sequential = summarise(loaded), summarise(alone)
        same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(loaded, alone))
        return {
            "date": datetime.date.today().isoformat(), "device": device_name(device), "torch": torch.__version__,
            "model": args.model, "dtype": str(dtype).removeprefix("torch."), "concurrency": args.concurrency,
            "max_batch_size": engine.max_batch_size, "rate": args.rate, "mix": mix,
            "kinds": {k: sum(kind == k for kind, _ in requests) for k in KINDS},
            "question_tokens": args.question_tokens, "new_tokens": args.new_tokens,
            "prefill_chunk": engine.config.prefill_chunk, "cuda_graphs": engine.info()["cuda_graphs"],
            "concurrent": concurrent, "sequential": sequential,
            "throughput_ratio": concurrent["output_tokens_per_s"] / sequential["output_tokens_per_s"],
            "identical_to_sequential": same, "peak_memory_gib": peak_memory(device),
            "engine_stats": engine.stats(),
        }
    finally:
        engine.close()


def markdown(r: dict) -> str:
    c, s = r["concurrent"], r["sequential"]
    rows = [
        ("requests/s", c["requests_per_s"], s["requests_per_s"]),
        ("output tokens/s", c["output_tokens_per_s"], s["output_tokens_per_s"]),
        ("TTFT p50 ms", c["ttft_ms"]["p50"], s["ttft_ms"]["p50"]),
        ("TTFT p99 ms", c["ttft_ms"]["p99"], s["ttft_ms"]["p99"]),
        ("inter-token p50 ms", c["inter_token_ms"]["p50"], s["inter_token_ms"]["p50"]),
        ("inter-token p99 ms", c["inter_token_ms"]["p99"], s["inter_token_ms"]["p99"]),
        ("wall s", c["wall_s"], s["wall_s"]),
    ]
    kinds = ", ".join(f"{n} {k}" for k, n in r["kinds"].items() if n)
    lines = [
        f"# Serving: {r['model']}, {plural(r['concurrency'], 'client')}: {r['device']}, {r['dtype']}, {r['date']}",
        "",
        f"{plural(c['requests'], 'request')} ({kinds}), {plural(r['new_tokens'], 'new token')} each (eos ignored), arrival rate "
        f"{r['rate'] or 'unbounded'} req/s, batch {r['max_batch_size']}, prefill chunk {r['prefill_chunk']}, "
        f"CUDA graphs {'on' if r['cuda_graphs'] else 'off'}, torch {r['torch']}.",
        "",
        f"| | {plural(r['concurrency'], 'client')} | one at a time |",
        "|---|---|---|",
        *[f"| {name} | {a:.2f} | {b:.2f} |" for name, a, b in rows],
        "",
        f"Throughput: {r['throughput_ratio']:.2f}x the one-at-a-time baseline. Greedy answers identical to "
        f"the baseline: {r['identical_to_sequential']} of {c['requests']}.",
    ]
    return "\n".join(lines) + "\n"


def parse_mix(text: str) -> dict[str, float]:
    """An argparse type: ``kind:weight,...`` over text, image and video."""
    mix = {}
    for part in text.split(","):
        kind, sep, weight = part.partition(":")
        if kind not in KINDS or not sep:
            raise argparse.ArgumentTypeError(f"{part!r}: expected kind:weight with kind one of {', '.join(KINDS)}")
        try:
            mix[kind] = non_negative_float(weight)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{part!r}: the weight {e}") from None
    if not sum(mix.values()) > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one weight must be above 0")
    return mix


def format_mix(mix: dict[str, float]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in mix.items())


def add_arguments(p) -> None:
    g = p.add_argument_group("serving load (with --concurrency)")
    g.add_argument("--concurrency", type=positive_int, help="simulated clients sharing one engine (the serving benchmark)")
    g.add_argument("--requests", type=positive_int, help="requests in all (default: 4 per client)")
    g.add_argument("--rate", type=non_negative_float, default=0.0,
                   help="mean arrivals per second over all clients (0: no wait)")
    g.add_argument("--mix", type=parse_mix, default="text:1,image:2,video:1",
                   help="kind:weight,... over text, image, video")
    g.add_argument("--video-frames", type=positive_int, default=8, help="frames of each video request")
    g.add_argument("--max-batch-size", type=positive_int, help="engine slots (default: --concurrency)")
    g.add_argument("--seed", type=int, default=0, help="seed of the workload and the think times")


def main(args) -> int:
    result = run(args)
    tp = f"-tp{args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    write_results(result, args.out_dir, f"{args.model}-serving-c{args.concurrency}{tp}", markdown(result))
    return 0
