"""End-to-end latency of one request: ovfast against transformers, same weights, same run.

    python benchmarks/bench_e2e.py --model 0.5b --request image --new-tokens 32

``--model`` is a preset (tiny, 0.5b, 7b: random weights at the real shapes, built once under
~/.cache/ovfast) or a checkpoint directory / Hub id. Both engines answer the same request greedily
with the same number of new tokens (eos ignored), after one warm-up run each; the best of
``--repeat`` runs is reported. transformers runs with its PIL image processor, SDPA attention and
the same dtype. Results go to stdout and, with ``--out``, to a JSON file. A benchmark, not a test:
nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ovfast
from ovfast.demo import cache_dir, synthetic_image
from ovfast.random_checkpoint import PRESETS, build_checkpoint

REQUESTS = {
    "text": lambda: ([], [], "Write a short story about a lighthouse keeper."),
    "image": lambda: ([synthetic_image(480, 640, 1)], [], "What is shown in this image?"),
    "image10": lambda: ([synthetic_image(899, 1024, 2)], [], "What is shown in this image?"),
    "images8": lambda: ([synthetic_image(480, 640, 10 + i) for i in range(8)], [], "Compare these images."),
    "video32": lambda: ([], [[np.asarray(synthetic_image(360, 640, 100 + i)) for i in range(32)]], "What happens?"),
}


def checkpoint(model: str) -> str:
    if model in PRESETS:
        path = cache_dir() / f"bench-{model}"
        if not (path / "config.json").is_file():
            print(f"building a random-weight {model} checkpoint in {path} ...", file=sys.stderr)
            build_checkpoint(path, model, dtype="bfloat16")
        return str(path)
    return model


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ovfast(path, images, videos, prompt, n, dtype, repeat) -> dict:
    engine = ovfast.load(path, dtype=dtype, max_batch_size=1)
    items = images + [ovfast.Video(v) for v in videos]
    engine.complete(items, prompt, max_new_tokens=n, ignore_eos=True)  # warm-up
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        c = engine.complete(items, prompt, max_new_tokens=n, ignore_eos=True)
        total = (time.perf_counter() - t0) * 1e3
        if best is None or total < best["total_ms"]:
            t = c.timings
            best = {"total_ms": total, "ttft_ms": t.time_to_first_token_ms, "preprocess_ms": t.preprocess_ms,
                    "vision_ms": t.vision_ms, "prefill_ms": t.prefill_ms, "decode_ms": t.decode_ms,
                    "decode_tokens_per_s": t.decode_tokens_per_s, "prompt_tokens": c.prompt_tokens,
                    "new_tokens": len(c.token_ids)}
    return best


def bench_transformers(path, images, videos, prompt, n, dtype, repeat) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import reference as ref  # transformers' processor and model as the tests drive them
    from transformers import LlavaOnevisionForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()

    def run(max_new):
        t0 = time.perf_counter()
        x = ref.inputs(path, images, prompt, videos)
        t1 = time.perf_counter()
        x = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in x.items()}
        if "pixel_values" in x:
            x["pixel_values"] = x["pixel_values"].to(dtype)
        if "pixel_values_videos" in x:
            x["pixel_values_videos"] = x["pixel_values_videos"].to(dtype)
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
        _sync()
        return (t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3, out.shape[1] - x["input_ids"].shape[1]

    run(n)  # warm-up
    best = None
    for _ in range(repeat):
        pre, first, _ = run(1)
        _, total, new = run(n)
        if best is None or total < best["total_ms"]:
            best = {"total_ms": total, "ttft_ms": first, "preprocess_ms": pre,
                    "decode_tokens_per_s": (new - 1) / ((total - first) / 1e3) if new > 1 else 0.0, "new_tokens": new}
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--request", default="image", choices=sorted(REQUESTS))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    path = checkpoint(args.model)
    images, videos, prompt = REQUESTS[args.request]()
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "model": args.model, "request": args.request, "new_tokens": args.new_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "ovfast": bench_ovfast(path, images, videos, prompt, args.new_tokens, dtype, args.repeat),
    }
    if not args.skip_transformers:
        result["transformers"] = bench_transformers(path, images, videos, prompt, args.new_tokens, dtype, args.repeat)
        result["speedup_total"] = result["transformers"]["total_ms"] / result["ovfast"]["total_ms"]
        result["speedup_ttft"] = result["transformers"]["ttft_ms"] / result["ovfast"]["ttft_ms"]
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
