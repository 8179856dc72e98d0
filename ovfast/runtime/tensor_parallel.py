"""Tensor parallelism in the engine: rank 0 is the ``Engine``; ranks 1..N-1 are workers.

Rank 0 runs everything a request needs (preprocessing, the scheduler, vision, sampling) and its
share of the decoder. Each decoder call it makes (embedding, a prefill chunk, logits, a decode
step, a graph capture) is first announced to the workers over the control channel, with the
call's input tensors broadcast, so every rank then runs the same call on its shard and meets the
others in the same collectives. Workers hold no vision tower, no tokenizer state and no
requests: only their decoder shard and KV-cache shard.

Processes: ``start_workers`` spawns ranks 1..N-1 on this machine (one GPU each, or the CPU with
gloo); under ``torchrun`` every process is started already and ``ovfast.load`` on a rank > 0
runs ``serve`` and exits when rank 0 closes.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import sys
import threading
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checkpoint import original
from ..checkpoint.files import open_checkpoint
from ..checkpoint.tokenizer import Tokenizer
from ..checkpoint.weights import feature_path_skips, load_weights, safetensors_tensors
from ..distributed import TensorParallel, plan_shards
from ..errors import ConfigError
from ..models.qwen2 import ForwardBatch, Qwen2ForCausalLM
from .decode import DecodeRunner
from .kv_cache import KVCache

_TIMEOUT_S = float(os.environ.get("OVFAST_TP_TIMEOUT_S", "600"))  # a collective waiting longer is a failure


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its shard, all picklable (spawn start method)."""

    checkpoint: str
    semantics: str | None
    dtype: str  # "float32", "bfloat16", "float16"
    device_type: str  # "cuda" or "cpu"
    first_gpu: int  # rank r uses cuda:(first_gpu + r)
    slots: int
    cache_len: int
    scratch: int


def from_torchrun() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun (or another launcher setting
    RANK / WORLD_SIZE / MASTER_ADDR), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def check_devices(size: int, device: torch.device) -> None:
    if device.type == "cuda":
        first = device.index or 0
        if first + size > torch.cuda.device_count():
            raise ConfigError(f"tensor_parallel_size {size} from cuda:{first} needs {first + size} GPUs; "
                              f"this machine has {torch.cuda.device_count()}")
    elif device.type != "cpu":
        raise ConfigError(f"tensor parallelism runs on CUDA (NCCL) or the CPU (gloo), not {device.type}")


def init_group(rank: int, size: int, device: torch.device, init_method: str | None) -> TensorParallel:
    """Join the process group (env:// under torchrun) and make the control group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=_TIMEOUT_S)
    if not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=size,
                                timeout=timeout, **kw)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return TensorParallel(rank=rank, size=size, group=None, control=control, backend=backend)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(size: int, spec: WorkerSpec) -> tuple[list, str]:
    """Spawn ranks 1..size-1 on this machine; returns (processes, init method for rank 0)."""
    init = f"tcp://127.0.0.1:{free_port()}"
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for rank in range(1, size):
        p = ctx.Process(target=_worker_entry, args=(rank, size, init, spec), name=f"ovfast-tp-{rank}", daemon=True)
        p.start()
        procs.append(p)
    return procs, init


def _worker_entry(rank: int, size: int, init: str, spec: WorkerSpec) -> None:
    try:
        device = torch.device("cuda", spec.first_gpu + rank) if spec.device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tp = init_group(rank, size, device, init)
        serve(tp, spec, device)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def build_shard(spec: WorkerSpec, tp: TensorParallel, device: torch.device):
    """A worker's decoder shard with its weights (its slices only), KV cache and decode runner."""
    ckpt = open_checkpoint(spec.checkpoint)
    cfg, _ = original.model_config(ckpt.config, ckpt.path, Tokenizer.from_checkpoint(ckpt), spec.semantics)
    dtype = getattr(torch, spec.dtype)
    plan = plan_shards(cfg.text, tp.rank, tp.size)
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(cfg.text, plan, tp)
    lm = lm.to(dtype).to_empty(device=device)
    lm.tie_and_zero_padding()
    tower = cfg.vision_layers_used
    # Everything outside the decoder is rank 0's: skipped unread, as are the feature path's spares.
    load_weights(lm.weight_destinations(), safetensors_tensors(ckpt.weight_files),
                 lambda name: not name.startswith(("lm.", "lm_head.")) or feature_path_skips(name, cfg, tower))
    lm.set_max_positions(spec.cache_len)
    lm = lm.eval().requires_grad_(False)
    cache = KVCache(cfg.text, spec.slots, spec.cache_len, dtype, device, kv_heads=len(plan.kv_heads))
    runner = DecodeRunner(lm, cache, device, scratch=spec.scratch, tp=tp)
    return lm, cache, runner


@torch.inference_mode()
def serve(tp: TensorParallel, spec: WorkerSpec, device: torch.device) -> None:
    """A worker's life: build the shard, report ready, then run rank 0's calls until "stop"."""
    try:
        lm, cache, runner = build_shard(spec, tp, device)
        error = None
    except Exception as e:  # reported to rank 0, which raises it from load()
        error = f"rank {tp.rank}: {type(e).__name__}: {e}"
    status = [None] * tp.size
    dist.all_gather_object(status, error, group=tp.control)
    if any(status):
        return
    while True:
        op, meta = tp.receive()
        if op == "stop":
            return
        if op == "embed":
            lm.embed(tp.broadcast(torch.empty(meta["n"], dtype=torch.long, device=device)))
        elif op == "forward":
            h = tp.broadcast(torch.empty(meta["shape"], dtype=getattr(torch, meta["dtype"]), device=device))
            lm(h, ForwardBatch.prefill(meta["slot"], meta["shape"][0], device, start=meta["start"]), cache.k, cache.v)
        elif op == "logits":
            lm.logits(tp.broadcast(torch.empty(meta["shape"], dtype=getattr(torch, meta["dtype"]), device=device)))
        elif op == "decode":
            runner.step(meta["rows"], meta["general"])
        elif op == "capture":
            runner.capture_all()
        else:  # pragma: no cover - rank 0 sends only the above
            raise RuntimeError(f"unknown tensor-parallel command {op!r}")


def ready(tp: TensorParallel, error: str | None = None) -> None:
    """Rank 0: wait for every worker's shard; raise the first worker's load error."""
    status = [None] * tp.size
    dist.all_gather_object(status, error, group=tp.control)
    failed = [s for s in status if s]
    if failed:
        raise ConfigError("tensor-parallel workers failed to load: " + "; ".join(failed))


class MirroredLM:
    """Rank 0's decoder under tensor parallelism: the calls of ``Qwen2ForCausalLM`` the engine
    makes, each announced to the workers with its inputs, then run on rank 0's shard."""

    def __init__(self, lm: Qwen2ForCausalLM, tp: TensorParallel):
        self.inner, self.tp = lm, tp
        self.cfg = lm.cfg

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        self.tp.send(("embed", {"n": ids.shape[0]}))
        return self.inner.embed(self.tp.broadcast(ids.contiguous()))

    def __call__(self, h: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        if not batch.is_prefill or batch.cu_seqlens.shape[0] != 2:
            raise ValueError("mirrored forward passes are one sequence's prefill (decode steps go through the runner)")
        self.tp.send(("forward", {"shape": tuple(h.shape), "dtype": _name(h.dtype), "slot": batch.slot,
                                  "start": batch.context}))
        return self.inner(self.tp.broadcast(h.contiguous()), batch, k_cache, v_cache)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        self.tp.send(("logits", {"shape": tuple(h.shape), "dtype": _name(h.dtype)}))
        return self.inner.logits(self.tp.broadcast(h.contiguous()))


class Workers:
    """Rank 0's view of the workers it spawned: liveness, and a clean stop."""

    def __init__(self, tp: TensorParallel, procs: list, on_death):
        self.tp, self.procs = tp, procs
        self._stopped = threading.Event()
        self._watch = threading.Thread(target=self._monitor, args=(on_death,), name="ovfast-tp-monitor", daemon=True)
        if procs:
            self._watch.start()

    def _monitor(self, on_death) -> None:
        while not self._stopped.wait(0.2):
            for rank, p in enumerate(self.procs, start=1):
                if p.exitcode is not None and not self._stopped.is_set():
                    self._stopped.set()
                    on_death(f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}")
                    return

    def dead(self) -> str | None:
        for rank, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                return f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def stop(self) -> None:
        """Tell the workers to finish (if they all live), then reap them."""
        if self._stopped.is_set() and not self.procs:
            return
        alive = self.dead() is None
        self._stopped.set()
        if alive:
            try:
                self.tp.send(("stop", {}))
            except Exception:  # pragma: no cover - a worker went away meanwhile
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():  # pragma: no cover - stuck in a collective
                p.kill()
                p.join(5)
        self.procs = []
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # pragma: no cover
                pass


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
