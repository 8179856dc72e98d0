"""The vision kernels against the plain-torch path each replaces, at real sizes, on a GPU.

    python benchmarks/bench_kernels.py [--skip-stage] [--out benchmarks/results/X.json]

Kernels (bf16, ``triton.testing.do_bench``: CUDA events, median after warm-up; the first call
autotunes and is not timed), each next to ``ovfast.ops.<op>.reference`` on the same inputs:
  * patch_embed: 10 and 37 uint8 384 px tiles -> 729 x 1152 each, normalisation folded in (TFLOP/s);
  * projector: 10 and 37 tiles, 32 video frames (x 729 rows), 1152 -> D for D = 896, 3584 (TFLOP/s);
  * bilinear_resize: 32 frames 27x27 -> 14x14 and a 1080x1920 image's 75x135 -> 60x108, at D (GB/s);
  * tiling: a 10-crop (899x1024) and a 31-crop (4000x3000) image, 32 video frames (360x640),
    against the CPU Pillow path plus the tiles' upload (GB/s of source + tile bytes).
The vision stage, uint8 image to packed embeddings, on a random-weight 0.5B checkpoint:
ovfast (device tiles, tower, projector, packing) against transformers (PIL processor, then
``get_image_features``), each with and without its preprocessing. Peaks: the datasheet's dense
bf16 TFLOP/s and HBM bandwidth for known GPUs, and a measured device-to-device copy. A benchmark,
not a test: nothing here asserts a time. Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ovfast.tools.bench import copy_bandwidth

ROOT = Path(__file__).resolve().parents[1]

# Datasheet dense bf16 TFLOP/s and HBM GB/s; the first name fragment found in the device name wins.
PEAKS = [("H100 PCIe", 756, 2000), ("H100", 989, 3350), ("H200", 989, 4800), ("GH200", 989, 4000),
         ("A100", 312, 2039), ("L40S", 362, 864), ("A10", 125, 600), ("4090", 165, 1008)]


def _bench(fn) -> float:
    """Median milliseconds of ``fn`` on the GPU (after a first, untimed call: compilation, autotuning)."""
    import triton.testing

    fn()
    return triton.testing.do_bench(fn, return_mode="median")


def _wall(fn, repeat: int = 5) -> float:
    """Median wall milliseconds of ``fn`` including host work, synchronised (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _row(rows, name, ms_kernel, ms_torch, *, flops=None, nbytes=None, peak_tflops=None, peak_gbs=None):
    row = {"case": name, "kernel_ms": round(ms_kernel, 4), "torch_ms": round(ms_torch, 4),
           "speedup": round(ms_torch / ms_kernel, 2)}
    if flops is not None:
        row["tflops"] = round(flops / ms_kernel / 1e9, 1)
        row["of_peak"] = round(row["tflops"] / peak_tflops, 3) if peak_tflops else None
    if nbytes is not None:
        row["gbs"] = round(nbytes / ms_kernel / 1e6, 1)
        row["of_peak"] = round(row["gbs"] / peak_gbs, 3) if peak_gbs else None
    rows.append(row)
    print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def bench_kernels(peak_tflops, peak_gbs) -> list[dict]:
    from ovfast import kernels, ops
    from ovfast.checkpoint.config import ModelConfig
    from ovfast.inputs import processing
    from ovfast.inputs.device_tiles import device_tiles
    from ovfast.testing.random_checkpoint import build_config

    dev, bf16, rows = "cuda", torch.bfloat16, []
    scale = torch.full((3,), 1 / 127.5, device=dev)
    shift = torch.full((3,), -1.0, device=dev)
    w = torch.randn(1152, 3, 14, 14, device=dev, dtype=bf16) * 0.02
    b, pos = torch.randn(1152, device=dev, dtype=bf16), torch.randn(729, 1152, device=dev, dtype=bf16)
    for tiles in (10, 37):
        px = torch.randint(0, 256, (tiles, 384, 384, 3), device=dev, dtype=torch.uint8).permute(0, 3, 1, 2)
        args = (px, w, b, pos, scale, shift)
        _row(rows, f"patch_embed {tiles} tiles", _bench(lambda: kernels.patch_embed(*args)),
             _bench(lambda: ops.patch_embed.reference(*args)), flops=2 * tiles * 729 * 588 * 1152,
             peak_tflops=peak_tflops)

    for d in (896, 3584):
        w1 = torch.randn(d, 1152, device=dev, dtype=bf16) * 0.03
        w2 = torch.randn(d, d, device=dev, dtype=bf16) * 0.03
        b1, b2 = torch.randn(d, device=dev, dtype=bf16), torch.randn(d, device=dev, dtype=bf16)
        for label, n in (("10 tiles", 10), ("37 tiles", 37), ("32 frames", 32)):
            x = torch.randn(n, 729, 1152, device=dev, dtype=bf16)
            _row(rows, f"projector {label} D={d}", _bench(lambda: kernels.projector(x, w1, b1, w2, b2)),
                 _bench(lambda: ops.projector.reference(x, w1, b1, w2, b2)),
                 flops=2 * n * 729 * (1152 * d + d * d), peak_tflops=peak_tflops)
        for label, shape, size in (("video 32x27x27->14x14", (32, 27, 27, d), (14, 14)),
                                   ("anyres 75x135->60x108", (1, 75, 135, d), (60, 108))):
            x = torch.randn(*shape, device=dev, dtype=bf16)
            nbytes = 2 * (x.numel() + shape[0] * size[0] * size[1] * d)  # read once, write once
            _row(rows, f"bilinear {label} D={d}", _bench(lambda: kernels.bilinear_resize(x, *size)),
                 _bench(lambda: ops.bilinear_resize.reference(x, *size)), nbytes=nbytes, peak_gbs=peak_gbs)

    model, proc = ModelConfig.from_dict(build_config("0.5b")), processing.ProcessingConfig()
    rng = np.random.default_rng(0)
    for label, kind, shape in (("anyres 899x1024", "image", (899, 1024, 3)), ("anyres 4000x3000", "image", (4000, 3000, 3)),
                               ("video 32x360x640", "video", (32, 360, 640, 3))):
        host = rng.integers(0, 256, shape, dtype=np.uint8)
        on_dev = torch.from_numpy(host).to(dev)
        tiles = device_tiles(on_dev, kind, model, proc)
        if kind == "video":
            cpu = lambda: processing.video_tiles(list(host), model, proc).tiles  # noqa: E731
        else:
            cpu = lambda: processing.anyres_tiles(host, model, proc).tiles  # noqa: E731
        # Bytes: the source read once and the tiles written once (the intermediate is extra).
        _row(rows, f"tiling {label} ({tiles.shape[0]} tiles)", _bench(lambda: device_tiles(on_dev, kind, model, proc)),
             _wall(lambda: torch.from_numpy(cpu()).to(dev)), nbytes=host.nbytes + tiles.numel(), peak_gbs=peak_gbs)
    return rows


def bench_vision_stage() -> list[dict]:
    """uint8 image -> packed embeddings: ovfast against transformers on a random 0.5B checkpoint."""
    sys.path.insert(0, str(ROOT / "tests"))
    import reference as ref  # transformers' PIL processor, as the parity tests drive it
    from transformers import LlavaOnevisionForConditionalGeneration

    import ovfast
    from ovfast.inputs import anyres
    from ovfast.inputs.device_tiles import device_tiles, pixel_affine
    from ovfast.tools.demo import cache_dir, synthetic_image

    path = cache_dir() / "bench-0.5b"
    if not (path / "config.json").is_file():
        ovfast.build_checkpoint(path, "0.5b", dtype="bfloat16")
    engine = ovfast.load(str(path), device="cuda", dtype="bfloat16", max_batch_size=1, max_seq_len=4096)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()
    model, cfg, proc = engine.model, engine.model_config, engine.requests.proc
    scale, shift = pixel_affine(proc, engine.device)

    def ours(pixels: torch.Tensor, size) -> torch.Tensor:
        """uint8 (H, W, 3) on the host or the device -> packed (tokens, D)."""
        tiles = device_tiles(pixels.to("cuda", non_blocking=True), "image", cfg, proc)
        layout = anyres.anyres_layout(*size, cfg.grid_pinpoints, proc.tile, cfg.vision.grid, cfg.max_num_patches)
        return model.pack_anyres(model.encode_tiles(tiles, engine.config.vision_chunk, scale, shift), layout)

    def theirs(x: dict) -> torch.Tensor:
        return hf.model.get_image_features(x["pixel_values"], x["image_sizes"],
                                           batch_num_images=x["batch_num_images"]).pooler_output[0]

    def hf_inputs(image) -> dict:
        x = ref.inputs(str(path), [image], "hi")
        x = {k: x[k].to("cuda") for k in ("pixel_values", "image_sizes", "batch_num_images")}
        x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
        return x

    rows = []
    for h, w in ((899, 1024), (2000, 2000)):  # 10 and 37 tiles
        image = synthetic_image(h, w, 1)
        host = torch.from_numpy(np.asarray(image).copy())
        on_device, x = host.cuda(), hf_inputs(image)
        with torch.inference_mode():
            diff = (ours(on_device, (h, w)).float() - theirs(x).float()).abs().max().item()
            row = {"case": f"vision stage {h}x{w} (0.5B, bf16)", "max_abs_diff_vs_transformers": diff,
                   "ovfast_ms": _wall(lambda: ours(on_device, (h, w))),
                   "transformers_ms": _wall(lambda: theirs(x)),
                   "ovfast_from_host_ms": _wall(lambda: ours(host, (h, w))),
                   "transformers_with_processor_ms": _wall(lambda: theirs(hf_inputs(image)))}
        row["speedup"] = round(row["transformers_ms"] / row["ovfast_ms"], 2)
        row["speedup_with_preprocessing"] = round(row["transformers_with_processor_ms"] / row["ovfast_from_host_ms"], 2)
        rows.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-stage", action="store_true", help="kernels only, no transformers comparison")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (the kernels are compiled Triton); nothing to measure here.")
        return 0
    name = torch.cuda.get_device_name()
    peak_tflops, peak_gbs = next(((t, g) for frag, t, g in PEAKS if frag in name), (None, None))
    copy_gbs = copy_bandwidth(torch.device("cuda"), nbytes=1 << 30)
    print(f"{name}: datasheet {peak_tflops} TFLOP/s bf16 dense, {peak_gbs} GB/s; measured copy {copy_gbs:.0f} GB/s")
    result = {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
              "peak_bf16_tflops": peak_tflops, "peak_hbm_gbs": peak_gbs, "measured_copy_gbs": round(copy_gbs, 1),
              "kernels": bench_kernels(peak_tflops, peak_gbs)}
    if not args.skip_stage:
        result["vision_stage"] = bench_vision_stage()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
