"""Loading: the tensor-parallel bootstrap, the model on the device with its weights, and the eos ids.

What ``Engine.__init__`` needs before it can serve, kept out of the facade: each function either
returns what it built or raises with nothing left running (workers killed, the group left).
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..checkpoint.config import ModelConfig
from ..checkpoint.files import Checkpoint
from ..checkpoint.tokenizer import Tokenizer
from ..checkpoint.weights import checkpoint_tensors, feature_path_skips, load_weights, mapping_tensors
from ..distributed import TensorParallel, plan_shards
from ..distributed.plan import check_parallel_size
from ..errors import ConfigError
from ..models.llava_onevision import LlavaOnevision
from ..settings import environment
from . import tensor_parallel
from .kv_cache import blocks_for, bytes_per_token


@dataclass
class Parallel:
    """This engine's place in a tensor-parallel group (``tp`` None: one rank, no workers)."""

    tp: TensorParallel | None = None
    workers: tensor_parallel.Workers | None = None
    num_blocks: int = 0  # KV pages every rank holds (under torchrun, the fewest any rank can)


def rank_device(size: int, device: torch.device) -> torch.device:
    """The device this process runs on: under torchrun with ``size`` > 1 on CUDA, its rank's own
    GPU (LOCAL_RANK), made current before anything measures or allocates memory."""
    launched = environment.torchrun_rank()
    if size > 1 and launched is not None and device.type == "cuda":
        device = torch.device("cuda", launched[2])
        torch.cuda.set_device(device)
    return device


def start_tensor_parallel(size: int, ckpt: Checkpoint, model_config: ModelConfig, device: torch.device,
                          dtype: torch.dtype, semantics: str | None, has_weights: bool, cache: dict,
                          on_death: Callable[[str], None]) -> Parallel:
    """The group for ``size`` > 1 (every check runs before a process starts), else ``Parallel()``.
    ``cache``: the workers' KV-cache and decode-row sizes (``WorkerSpec``'s fields).

    Started by torchrun (RANK / WORLD_SIZE set), this process is one of the ranks: rank 0 goes on
    as the engine; a rank > 0 serves rank 0 and exits (SystemExit) when it closes.
    """
    if size == 1:
        return Parallel(num_blocks=cache["num_blocks"])
    check_parallel_size(model_config.text, size)
    if has_weights:
        raise ConfigError("weights= cannot be combined with tensor_parallel_size > 1: each rank reads its "
                          "shard from the checkpoint's safetensors files")
    launched = environment.torchrun_rank()
    if launched is not None and launched[1] != size:
        raise ConfigError(f"tensor_parallel_size {size} but torchrun started {launched[1]} processes")
    tensor_parallel.check_devices(1 if launched else size, device)
    tensor_parallel.check_free(size)
    spec = tensor_parallel.WorkerSpec(
        checkpoint=str(ckpt.path), semantics=semantics, dtype=str(dtype).removeprefix("torch."),
        device_type=device.type, first_gpu=device.index or 0, **cache)
    if launched is not None:
        tp = tensor_parallel.join(launched[0], size, device)
        # Each rank sized its cache from its own free memory: all hold the fewest pages any can.
        spec = dataclasses.replace(spec, num_blocks=tensor_parallel.fewest(tp, spec.num_blocks))
        if tp.rank > 0:
            raise SystemExit(tensor_parallel.serve(tp, spec, device))  # returns when rank 0 closes
        return Parallel(tp, tensor_parallel.Workers(tp, None, on_death), spec.num_blocks)
    launch = tensor_parallel.Launch(size, spec)
    try:
        launch.wait_joined()
        tp = tensor_parallel.join(0, size, device, launch.store)
    except BaseException:
        launch.kill()
        raise
    return Parallel(tp, tensor_parallel.Workers(tp, launch, on_death), spec.num_blocks)


@dataclass
class Built:
    model: LlavaOnevision
    skipped_tensors: list[str]
    rank_reports: list[dict]  # per rank: weight bytes (and, for workers, KV-cache bytes)
    load_ms: float


def build_model(ckpt: Checkpoint, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, parallel: Parallel,
                weights: Mapping[str, torch.Tensor] | None) -> Built:
    """The model on ``device`` with its weights (rank 0's decoder share under tensor parallelism),
    once every worker reports its shard loaded. On failure the workers are stopped."""
    t0 = time.perf_counter()
    tp, workers = parallel.tp, parallel.workers
    plan = plan_shards(cfg.text, tp.rank, tp.size) if tp else None
    try:
        with torch.device("meta"):
            model = LlavaOnevision(cfg, plan, tp)
        model = model.to(dtype).to_empty(device=device)
        model.language_model.tie_and_zero_padding()  # to_empty re-creates parameters
        tensors = mapping_tensors(weights) if weights is not None else checkpoint_tensors(ckpt, device)
        skipped = load_weights(model.weight_destinations(), tensors, lambda name: feature_path_skips(name, cfg))
        mine = {"error": None, "weight_bytes": tensor_parallel.parameter_bytes(model)}
        reports = tensor_parallel.ready(tp, mine, workers.launch) if tp else [mine]
    except BaseException:
        if workers is not None:
            workers.abort()
            workers.stop()
        raise
    return Built(model.eval().requires_grad_(False), list(skipped), reports, (time.perf_counter() - t0) * 1e3)


def eos_ids(ckpt: Checkpoint, tokenizer: Tokenizer, model_config: ModelConfig) -> frozenset[int]:
    """The ids that end an answer: generation_config's, else the tokenizer's eos, else config's; with
    the original semantics also <|im_end|> (the qwen_1_5 conversation's turn separator)."""
    eos = ckpt.generation_config.get("eos_token_id")
    if eos is None:
        eos_token = tokenizer.special_tokens_map.get("eos_token")
        eos = tokenizer.token_id(eos_token) if eos_token else None
    if eos is None:
        eos = ckpt.config.get("text_config", ckpt.config).get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    im_end = tokenizer.token_id("<|im_end|>")
    if model_config.semantics == "original" and im_end is not None and im_end not in ids:
        ids.append(im_end)
    return frozenset(ids)



_ACTIVATION_RESERVE = 2 << 30  # GPU bytes left for activations, vision pieces and graph pools


def kv_budget(config, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, plan, max_seq_len: int,
              block_size: int) -> tuple[int, dict]:
    """The KV cache's size in pages (the null page included), and how it was chosen (for ``info()``).

    ``kv_cache_tokens`` when given. Else on CUDA: what fits in ``gpu_memory_utilization`` of the
    GPU beside what is in use now, this rank's weights (counted before they load) and an
    activation reserve; on the CPU: ``max_batch_size x max_seq_len`` positions, at most a quarter
    of the machine's memory. Either way at least one full-length sequence.
    """
    per_token = bytes_per_token(cfg.text, dtype, len(plan.kv_heads) if plan else None)
    if config.kv_cache_tokens is not None:
        tokens, how = config.kv_cache_tokens, "kv_cache_tokens"
    elif device.type == "cuda":
        with torch.device("meta"):
            weights = tensor_parallel.parameter_bytes(LlavaOnevision(cfg, plan).to(dtype))
        free, total = torch.cuda.mem_get_info(device)
        spare = free - (1 - config.gpu_memory_utilization) * total - weights - _ACTIVATION_RESERVE
        tokens, how = int(spare // per_token), f"gpu_memory_utilization {config.gpu_memory_utilization}"
        if tokens < max_seq_len + 1:
            raise ConfigError(
                f"only {max(tokens, 0)} KV-cache positions fit on {device} beside the weights "
                f"({weights / 2**30:.1f} GiB) at gpu_memory_utilization {config.gpu_memory_utilization}; one "
                f"sequence of max_seq_len {max_seq_len} needs {max_seq_len + 1}: lower max_seq_len, raise "
                "gpu_memory_utilization, or use tensor parallelism")
    else:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        tokens = min(config.max_batch_size * (max_seq_len + 1), ram // 4 // per_token)
        how = "max_batch_size x max_seq_len (CPU)"
    tokens = max(tokens, 1)
    blocks = blocks_for(tokens, block_size) + 1
    return blocks, {"kv_cache_tokens": (blocks - 1) * block_size, "kv_block_size": block_size,
                    "kv_budget_from": how, "kv_bytes_per_token": per_token}
