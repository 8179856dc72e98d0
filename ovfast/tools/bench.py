"""``ovfast bench``: one request through ovfast and through transformers, in the same run.

For a request (one 640x480 image, a 10-crop image, 8 images, a 32-frame video, or text only) it
reports preprocessing, vision, prefill, time to first token, decode ms/token and tokens/s and
peak GPU memory for both engines (same weights, same dtype, greedy, transformers with SDPA), the
ratios, and the decode roofline: weight bytes read per token over the measured device copy
bandwidth. Model presets (tiny, 0.5b, 7b, 72b) are random weights made in memory at the real
shapes, so nothing is downloaded; a directory or Hub id benchmarks a real checkpoint. Results go
to ``benchmarks/results/`` as JSON and Markdown. Timings are best of ``--repeat`` runs after a
warm-up that also captures the CUDA graphs and compiles the Triton kernels (reported apart).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import numpy as np
import torch

from ..terminal.arguments import HelpFormatter, positive_int
from ..errors import OvfastError
from ..inputs.media import Video
from ..terminal.progress import progress, set_enabled
from ..runtime.engine import Engine
from . import serving_bench, shared_media_bench
from .bench_common import device_and_dtype, device_name, log, peak_memory, plural, prepare, question, write_results
from .demo import synthetic_image

REQUESTS = {
    "image": lambda: ([synthetic_image(480, 640, 1)], []),  # one 640x480 photo: 5 tiles, 2929 tokens
    "image10": lambda: ([synthetic_image(899, 1024, 2)], []),  # 10 tiles, 6551 tokens
    "images8": lambda: ([synthetic_image(480, 640, 10 + i) for i in range(8)], []),  # 8 x 730 tokens
    "video32": lambda: ([], [[np.asarray(synthetic_image(360, 640, 100 + i)) for i in range(32)]]),  # 6273 tokens
    "text": lambda: ([], []),
}
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 29) -> float:
    """Device memory bandwidth in GB/s from a large copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def decode_bytes_per_token(engine: Engine) -> int:
    """Weight bytes one decode step reads: every decoder layer, the final norm and the lm_head
    (the embedding table is only gathered, one row per token); under tensor parallelism, rank 0's
    share (each GPU reads its own share at once)."""
    lm = engine.model.language_model
    layers = sum(p.numel() * p.element_size() for p in lm.layers.parameters())
    return layers + lm.norm.numel() * lm.norm.element_size() + lm.lm_head.numel() * lm.lm_head.element_size()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def time_ovfast(engine: Engine, items: list, prompt: str, new_tokens: int, repeat: int) -> dict:
    t0 = time.perf_counter()
    engine.complete(items, prompt, max_new_tokens=min(new_tokens, 4), ignore_eos=True)  # compiles kernels
    capture_ms = engine.runner.capture_graphs()
    warmup_ms = (time.perf_counter() - t0) * 1e3
    _reset_peak(engine.device)
    best = None
    for _ in progress(range(repeat), desc="ovfast runs", unit=" runs"):
        t0 = time.perf_counter()
        c = engine.complete(items, prompt, max_new_tokens=new_tokens, ignore_eos=True)
        total = (time.perf_counter() - t0) * 1e3
        if best is None or total < best["total_ms"]:
            t = c.timings
            best = {
                "total_ms": total, "ttft_ms": t.time_to_first_token_ms, "preprocess_ms": t.preprocess_ms,
                "vision_ms": t.vision_ms, "prefill_ms": t.prefill_ms, "decode_ms": t.decode_ms,
                "decode_ms_per_token": t.decode_ms / max(t.decode_tokens, 1),
                "decode_tokens_per_s": t.decode_tokens_per_s, "prompt_tokens": c.prompt_tokens,
                "new_tokens": len(c.token_ids),
            }
    best.update(peak_memory_gib=peak_memory(engine.device), warmup_ms=warmup_ms, graph_capture_ms=capture_ms)
    return best


def time_transformers(hf, ckpt: str, images: list, videos: list, prompt: str, new_tokens: int, repeat: int,
                      device: torch.device, dtype: torch.dtype) -> dict:
    from ..testing import hf_reference

    def to_device(x):
        x = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in x.items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in x:
                x[key] = x[key].to(dtype)
        return x

    class Clock:  # a generate() streamer that notes when each token reaches the host
        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(max_new: int):
        t0 = time.perf_counter()
        x = to_device(hf_reference.inputs(ckpt, images, prompt, videos))
        _sync(device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            if "pixel_values" in x:
                hf.model.get_image_features(x["pixel_values"], x["image_sizes"], batch_num_images=x["batch_num_images"])
            if "pixel_values_videos" in x:
                hf.model.get_video_features(x["pixel_values_videos"])
            _sync(device)
            t2 = time.perf_counter()
            clock = Clock()
            clock.times = []
            out = hf.generate(**x, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, streamer=clock)
        _sync(device)
        # times[0]: the prompt handed to the streamer; times[1]: the first new token; times[-1]: the last.
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, t2, clock.times, out.shape[1] - x["input_ids"].shape[1]

    run(min(new_tokens, 4))  # warm-up
    _reset_peak(device)
    best = None
    for _ in progress(range(repeat), desc="transformers runs", unit=" runs"):
        pre, vision, start, times, new = run(new_tokens)
        first = (times[1] - start) * 1e3  # generate() re-encodes the media: vision counts in its TTFT
        decode = (times[-1] - times[1]) * 1e3
        total = pre + (times[-1] - start) * 1e3
        if best is None or total < best["total_ms"]:
            best = {
                "total_ms": total, "ttft_ms": pre + first, "preprocess_ms": pre, "vision_ms": vision,
                "prefill_ms": first - vision, "decode_ms": decode, "decode_ms_per_token": decode / max(new - 1, 1),
                "decode_tokens_per_s": (new - 1) / (decode / 1e3) if new > 1 and decode > 0 else 0.0,
                "new_tokens": new,
            }
    best["peak_memory_gib"] = peak_memory(device)
    return best


def run(args) -> dict:
    device, dtype = device_and_dtype(args)
    compare = not args.no_transformers
    images, videos = REQUESTS[args.request]()
    log(f"{args.model} on {device_name(device)}, {str(dtype).removeprefix('torch.')}, request {args.request}")
    ckpt, engine, hf = prepare(args.model, device, dtype, compare, args.max_seq_len,
                               tensor_parallel_size=args.tensor_parallel_size)
    try:
        prompt = question(engine, args.question_tokens)
        items = images + [Video(v) for v in videos]
        log("ovfast ...")
        result = {
            "date": datetime.date.today().isoformat(), "device": device_name(device), "torch": torch.__version__,
            "model": args.model, "request": args.request, "dtype": str(dtype).removeprefix("torch."),
            "question_tokens": args.question_tokens, "new_tokens": args.new_tokens,
            "kernels": engine.info(), "ovfast": time_ovfast(engine, items, prompt, args.new_tokens, args.repeat),
        }
        bandwidth = copy_bandwidth(device)
        per_token = decode_bytes_per_token(engine)
        roofline = bandwidth * 1e9 / per_token
        result["roofline"] = {
            "copy_bandwidth_gb_s": bandwidth, "weight_bytes_per_token": per_token, "roofline_tokens_per_s": roofline,
            "fraction_of_roofline": result["ovfast"]["decode_tokens_per_s"] / roofline,
        }
        if hf is not None:
            log("transformers ...")
            result["transformers"] = time_transformers(hf, ckpt, images, videos, prompt, args.new_tokens, args.repeat,
                                                       device, dtype)
            o, t = result["ovfast"], result["transformers"]
            result["speedup"] = {
                "total": t["total_ms"] / o["total_ms"], "ttft": t["ttft_ms"] / o["ttft_ms"],
                "decode_tokens_per_s": o["decode_tokens_per_s"] / max(t["decode_tokens_per_s"], 1e-9),
            }
        return result
    finally:
        engine.close()


def markdown(r: dict) -> str:
    rows = ["preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "decode_tokens_per_s",
            "total_ms", "peak_memory_gib"]
    hf = r.get("transformers")
    ops = r["kernels"]["ops"]
    backends = "; ".join(f"{b}: {', '.join(k for k, v in ops.items() if v == b)}" for b in sorted(set(ops.values())))
    lines = [
        f"# {r['model']}, {r['request']}: {r['device']}"
        + (f" x {r['kernels']['tensor_parallel_size']} (tensor parallel)" if r["kernels"]["tensor_parallel_size"] > 1 else "")
        + f", {r['dtype']}, {r['date']}",
        "",
        f"{plural(r['ovfast']['prompt_tokens'], 'prompt token')}, {plural(r['new_tokens'], 'new token')} (eos ignored), "
        f"torch {r['torch']}. Ops: {backends}. CUDA graphs: {'on' if r['kernels']['cuda_graphs'] else 'off'}.",
        "",
        "| | ovfast | transformers | ratio |" if hf else "| | ovfast |",
        "|---|---|---|---|" if hf else "|---|---|",
    ]
    for k in rows:
        o = r["ovfast"].get(k)
        if hf:
            t = hf.get(k)
            ratio = ""
            if isinstance(o, float) and isinstance(t, float) and o and t:
                ratio = f"{(o / t if 'per_s' in k else t / o):.2f}x"
            lines.append(f"| {k} | {_fmt(o)} | {_fmt(t)} | {ratio} |")
        else:
            lines.append(f"| {k} | {_fmt(o)} |")
    rf = r["roofline"]
    lines += [
        "",
        f"Decode roofline: {rf['weight_bytes_per_token'] / 1e9:.3f} GB of weights per token at "
        f"{rf['copy_bandwidth_gb_s']:.0f} GB/s measured copy bandwidth = {rf['roofline_tokens_per_s']:.1f} tokens/s; "
        f"ovfast reaches {100 * rf['fraction_of_roofline']:.1f}%.",
        f"Warm-up {r['ovfast']['warmup_ms']:.0f} ms, of which CUDA-graph capture {r['ovfast']['graph_capture_ms']:.0f} ms.",
    ]
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.2f}" if isinstance(x, float) else str(x))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ovfast bench", description=__doc__.splitlines()[0].replace("``", ""),
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="tiny", help="preset (tiny, tiny-mha, 0.5b, 7b, 72b) or checkpoint directory / Hub id")
    p.add_argument("--request", default="image", choices=sorted(REQUESTS),
                   help="what to send: one photo, a 10-crop image, 8 images, a 32-frame video or text only")
    p.add_argument("--question-tokens", type=positive_int, default=20, help="length of the question in tokens")
    p.add_argument("--new-tokens", type=positive_int,
                   help="tokens generated per request, eos ignored (default: 256; 16 with --shared-media)")
    p.add_argument("--repeat", type=positive_int, default=3, help="timed runs after the warm-up; the best is reported")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--max-seq-len", type=positive_int, default=8192, help="the engine's context length")
    p.add_argument("--no-transformers", action="store_true", help="ovfast only")
    p.add_argument("--tensor-parallel-size", type=positive_int, default=1, metavar="N",
                   help="cut the decoder across N GPUs (needs --no-transformers); 72B needs 2 x H200 or 4 x 80 GB")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the JSON and Markdown results go")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    serving_bench.add_arguments(p)
    shared_media_bench.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_enabled(not args.quiet)
    if args.shared_media and args.concurrency is not None:
        build_parser().error("--shared-media and --concurrency are separate benchmarks; pick one")
    if args.new_tokens is None:
        args.new_tokens = 16 if args.shared_media else 256
    try:
        if args.shared_media:
            return shared_media_bench.main(args)
        if args.concurrency is not None:
            return serving_bench.main(args)
        result = run(args)
    except OvfastError as e:
        print(f"ovfast bench: error: {e}", file=sys.stderr)
        return 2
    tp = f"-tp{args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    write_results(result, args.out_dir, f"{args.model}-{args.request}{tp}", markdown(result))
    return 0
