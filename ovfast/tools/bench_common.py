"""What ``ovfast bench`` (bench.py) and its serving and shared-media modes (serving_bench.py,
shared_media_bench.py) share: the engine and transformers model a run measures, the question it
asks, logging, argument checks and result files.

These modules import this one and none imports another's internals.
"""
from __future__ import annotations

import json
import platform
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.random_weights import tensor_specs
from ..errors import ConfigError
from ..runtime.devices import resolve_device
from ..runtime.engine import Engine, load
from ..testing.random_checkpoint import PRESETS, build_checkpoint
from .demo import cache_dir

_WORDS = "please describe what you see in detail and mention every colour object person and action".split()


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def plural(n: int, noun: str) -> str:
    """``1 request``, ``2 requests``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_threads(target: Callable[[int], None], n: int, bar, errors: list[BaseException], noun: str,
                where: str = "") -> None:
    """``target(i)`` on n threads at once; then, if any recorded a failure in ``errors``, raise
    the first ("2 requests failed under load; the first: ...")."""
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    if errors:
        raise RuntimeError(f"{plural(len(errors), noun)} failed{where}; the first: {errors[0]!r}") from errors[0]


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    """The run's device (ConfigError for one this torch cannot use) and dtype (bf16 on a GPU, else fp32)."""
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def question(engine: Engine, tokens: int) -> str:
    """A question of about ``tokens`` tokens (counted with the model's tokenizer)."""
    words = ["What", "is", "shown", "here?"]
    i = 0
    while len(engine.tokenizer.encode(" ".join(words))) < tokens:
        words.insert(-1, _WORDS[i % len(_WORDS)])
        i += 1
    return " ".join(words)


def prepare(model: str, device: torch.device, dtype: torch.dtype, compare: bool, max_seq_len: int,
            max_batch_size: int = 1, tensor_parallel_size: int = 1, **engine_options):
    """(checkpoint dir, ovfast engine, transformers model or None) sharing one set of weights.

    A preset is a checkpoint directory without weights: ovfast makes random ones on its device
    (every tensor-parallel rank its own slice), or, to compare, takes transformers' random
    weights so both run the same model. ``engine_options``: more of ``load``'s options
    (``prefix_caching``, ``encoder_cache_tokens``, ...)."""
    hf = None
    if compare and tensor_parallel_size > 1:
        raise SystemExit("ovfast bench: transformers runs the model on one device; with --tensor-parallel-size "
                         "add --no-transformers (and compare with a --tensor-parallel-size 1 run)")
    # The caches off unless asked for: a run repeats one request, and every repeat must do all of
    # its work (the shared-media scenario turns them on for one of its two engines).
    options = dict(device=device, dtype=dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                   tensor_parallel_size=tensor_parallel_size, prefix_caching=False, encoder_cache_tokens=0)
    options.update(engine_options)
    if model in PRESETS:
        path = cache_dir() / f"bench-{model}-config"
        if not (path / "config.json").is_file():
            build_checkpoint(path, model, weights=False)
        config = json.loads((path / "config.json").read_text())
        _check_memory(config, device, dtype, copies=2 if compare else 1, ranks=tensor_parallel_size)
        weights = None
        if compare:
            from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

            log(f"random {model} weights in transformers on {device} ...")
            hf_config = LlavaOnevisionConfig(**{k: v for k, v in config.items() if k != "ovfast_random_weights"})
            with torch.device(device):
                hf = LlavaOnevisionForConditionalGeneration._from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
            weights = hf.state_dict()
        else:
            log(f"random {model} weights on {device}" + (f" x {tensor_parallel_size} ranks" if tensor_parallel_size > 1 else "") + " ...")
        engine = load(path, weights=weights, **options)
        del weights
    else:
        engine = load(model, **options)
        if compare:
            from transformers import LlavaOnevisionForConditionalGeneration

            hf = LlavaOnevisionForConditionalGeneration.from_pretrained(
                engine.checkpoint.path, dtype=dtype, attn_implementation="sdpa").to(device)
        path = engine.checkpoint.path
    return str(path), engine, (hf.eval() if hf is not None else None)


def _check_memory(config: dict, device: torch.device, dtype: torch.dtype, copies: int, ranks: int = 1) -> None:
    """Refuse, with the numbers, a model that cannot fit (the 72B weights alone are 145 GB in bf16;
    with tensor parallelism each GPU holds about 1/ranks of them)."""
    need = sum(int(np.prod(shape)) for _, shape, _ in tensor_specs(config)) * dtype.itemsize * copies / ranks
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if have is not None and need * 1.1 > have:
        raise ConfigError(
            f"{copies} copies of these weights need {need / 2**30:.0f} GiB per GPU; {device} has "
            f"{have / 2**30:.0f} GiB free" + (" (try --no-transformers)" if copies > 1 else " (try --tensor-parallel-size)")
        )


def write_results(result: dict, out_dir: str, name: str, md: str) -> None:
    """``out_dir/DATE-DEVICE-NAME.{json,md}``; the Markdown is printed too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", result["device"]).strip("-").lower()
    stem = str(out / f"{result['date']}-{slug}-{name}")
    Path(stem + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(stem + ".md").write_text(md)
    print(md)
    log(f"wrote {stem}.json and .md")
