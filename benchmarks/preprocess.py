"""Preprocessing speed: ovfast's native path, its pure-Python path and transformers' processors.

Every path turns the same in-memory inputs into normalised float32 pixel values, in one process
on the same machine; the best of N runs is reported, and the ratios against ovfast's native path.
Cases: a 640x480 photo, a 1920x1080 frame, a 4000x3000 photo (each alone: anyres; given as a PIL
image, and the two large ones also as a uint8 array, which spares both sides Pillow's ~10-20 ms
conversion of a 12 MP image to an array), four images in one prompt (padded squares) and 32
video frames of 1280x720 (squashed). transformers runs its
PIL processor (``LlavaOnevisionImageProcessorPil``; frames through its resize/rescale/normalize,
as its video processor needs torchvision) and, when torchvision is installed, its torchvision
processors. ovfast's native output is checked bit for bit against the PIL processor's.

    python benchmarks/preprocess.py [--repeats 5] [--out benchmarks/results/X.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

import numpy as np
import torch
from transformers import LlavaOnevisionImageProcessorPil
from transformers.image_utils import SizeDict

import ovfast
from ovfast.checkpoint.config import DEFAULT_PINPOINTS
from ovfast.inputs import native
from ovfast.tools.demo import synthetic_image

SETTINGS = dict(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True,
                image_grid_pinpoints=[list(p) for p in DEFAULT_PINPOINTS])


def cases() -> dict[str, dict]:
    """name -> {ovfast: items, pil: PIL processor call, tv: torchvision call or None}."""
    photo, frame, big = (synthetic_image(h, w, seed=i) for i, (h, w) in enumerate([(480, 640), (1080, 1920), (3000, 4000)]))
    four = [synthetic_image(h, w, seed=10 + i) for i, (h, w) in enumerate([(480, 640), (768, 1024), (600, 800), (720, 1280)])]
    frames = np.stack([np.asarray(synthetic_image(720, 1280, seed=20 + i)) for i in range(32)])
    frame_array, big_array = np.asarray(frame), np.asarray(big)
    return {
        "photo 640x480": dict(ovfast=photo, hf=photo),
        "frame 1920x1080": dict(ovfast=frame, hf=frame),
        "frame 1920x1080 (array)": dict(ovfast=frame_array, hf=frame_array),
        "photo 4000x3000": dict(ovfast=big, hf=big),
        "photo 4000x3000 (array)": dict(ovfast=big_array, hf=big_array),
        "4 images": dict(ovfast=four, hf=[four]),
        "32 frames 1280x720": dict(ovfast=ovfast.Video(frames), hf=None, frames=frames),
    }


def pil_frames(proc, frames: np.ndarray) -> torch.Tensor:
    """transformers' PIL processing of video frames: its own resize (squash), rescale and normalize."""
    out = []
    for f in frames:
        chw = np.moveaxis(f, -1, 0)
        chw = proc.resize(chw, SizeDict(height=384, width=384), resample=proc.resample)
        out.append(proc.normalize(proc.rescale(chw, proc.rescale_factor), proc.image_mean, proc.image_std))
    return torch.from_numpy(np.stack(out))


def best_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function; the functions take turns in every round, so that a busy spell
    on a shared machine hits them all alike instead of one path's whole series."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up: first-call allocations, lazy imports
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: min(t) for name, t in times.items()}


def python_path(fn):
    def run():
        with native.disabled():
            return fn()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if not native.enabled():
        raise SystemExit("ovfast._C is not built: nothing native to measure")
    pil = LlavaOnevisionImageProcessorPil(**SETTINGS)
    tv = tv_video = None
    if importlib.util.find_spec("torchvision"):
        from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionVideoProcessor

        tv = LlavaOnevisionImageProcessor(**SETTINGS)
        tv_video = LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)

    rows = []
    for name, case in cases().items():
        if case["hf"] is None:
            hf_pil = lambda c=case: pil_frames(pil, c["frames"])  # noqa: E731
            hf_tv = (lambda c=case: tv_video(list(c["frames"]), return_tensors="pt")) if tv_video else None  # noqa: E731
        else:
            hf_pil = lambda c=case: pil(c["hf"], return_tensors="pt")["pixel_values"]  # noqa: E731
            hf_tv = (lambda c=case: tv(c["hf"], return_tensors="pt")) if tv else None  # noqa: E731
        ours = lambda c=case: ovfast.preprocess(c["ovfast"])  # noqa: E731
        reference = hf_pil()
        got = torch.cat(ours())
        exact = torch.equal(got, reference.reshape(got.shape))
        fns = {"native_ms": ours, "python_ms": python_path(ours), "transformers_pil_ms": hf_pil}
        if hf_tv:
            fns["transformers_torchvision_ms"] = hf_tv
        row = {"case": name, "transformers_torchvision_ms": None, **best_ms(fns, args.repeats)}
        row["bit_identical_to_pil"] = exact
        rows.append(row)
        print(f"{name}: done", flush=True)

    header = f"{'case':<24} {'native ms':>10} {'python ms':>10} {'HF PIL ms':>10} {'HF tv ms':>9} {'PIL/native':>11} {'python/native':>14} {'exact':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        tv_ms = f"{r['transformers_torchvision_ms']:.1f}" if r["transformers_torchvision_ms"] else "-"
        print(f"{r['case']:<24} {r['native_ms']:>10.1f} {r['python_ms']:>10.1f} {r['transformers_pil_ms']:>10.1f} {tv_ms:>9} "
              f"{r['transformers_pil_ms'] / r['native_ms']:>10.1f}x {r['python_ms'] / r['native_ms']:>13.1f}x "
              f"{'yes' if r['bit_identical_to_pil'] else 'NO':>6}")
    meta = {"threads": native._C.num_threads(), "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "repeats": args.repeats}
    print(f"\n{meta}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
