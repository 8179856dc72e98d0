"""Tensor parallelism in the engine: rank 0 is the ``Engine``; ranks 1..N-1 are workers.

Rank 0 runs everything a request needs (preprocessing, the scheduler, vision, sampling) and its
share of the decoder. Each decoder call its model runner makes (embedding, a prefill chunk,
logits, a decode step, a graph capture) is first announced to the workers over the control channel, with the
call's input tensors broadcast, so every rank then runs the same call on its shard and meets the
others in the same collectives. Workers hold no vision tower, no tokenizer state and no
requests: only their decoder shard and KV-cache shard.

Processes. ``Launch`` starts ranks 1..N-1 on this machine as fresh interpreters running
``worker_main`` (one GPU each, or the CPU with gloo). Not ``multiprocessing``'s spawn: that
re-imports the caller's ``__main__``, so a script without an ``if __name__ == "__main__"`` guard
would start workers that die before joining. Rank 0 hosts the rendezvous store and, while waiting
for each worker (to join, then to load), polls the processes: a worker that dies is reported with
its rank and exit status instead of a hang. Under ``torchrun`` every rank is started already and
``ovfast.load`` on a rank > 0 serves rank 0 and exits when rank 0 closes.

Two groups: the data group (NCCL on CUDA, gloo on the CPU) carries the decoder's collectives, on
fixed buffers a CUDA graph can capture, and fails after ``OVFAST_TP_TIMEOUT_S``; the control
group (gloo) carries rank 0's commands and waits as long as the engine idles. A peer that exits
closes its gloo sockets, so the others' next collective fails at once rather than timing out.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checkpoint import original
from ..checkpoint.files import open_checkpoint
from ..checkpoint.tokenizer import Tokenizer
from ..checkpoint.weights import checkpoint_tensors, feature_path_skips, load_weights
from ..distributed import TensorParallel, plan_shards
from ..errors import ConfigError, ModelLoadError
from ..models.qwen2 import ForwardBatch, Qwen2ForCausalLM
from ..settings import environment
from .decode import DecodeRunner
from .kv_cache import KVCache

# OVFAST_TP_TIMEOUT_S: a data collective waiting longer is a failure; OVFAST_TP_JOIN_TIMEOUT_S: the
# workers' start and rendezvous. Both are read (ovfast.settings.environment) as each rank joins.
_IDLE = datetime.timedelta(days=365)  # control group: a worker waits for the next command as long as rank 0 idles

# A worker is a fresh interpreter: `python -c _WORKER SPEC STORE RANK SIZE`.
_WORKER = "import sys; from ovfast.runtime.tensor_parallel import worker_main; sys.exit(worker_main(sys.argv[1:]))"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its shard (sent as JSON on its command line)."""

    checkpoint: str
    semantics: str | None
    dtype: str  # "float32", "bfloat16", "float16"
    device_type: str  # "cuda" or "cpu"
    first_gpu: int  # spawned rank r uses cuda:(first_gpu + r)
    rows: int  # decode rows (max_batch_size)
    num_blocks: int  # KV pages, the null page included
    block_size: int
    max_blocks: int  # block-table entries per row
    max_positions: int  # RoPE table length

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        return cls(**json.loads(text))


def check_devices(size: int, device: torch.device) -> None:
    """ConfigError unless ``size`` ranks from ``device`` fit this machine (one GPU each)."""
    if device.type == "cuda":
        first = device.index or 0
        if first + size > torch.cuda.device_count():
            raise ConfigError(f"tensor_parallel_size {size} from cuda:{first} needs {first + size} GPUs; "
                              f"this machine has {torch.cuda.device_count()}")
    elif device.type != "cpu":
        raise ConfigError(f"tensor parallelism runs on CUDA (NCCL) or the CPU (gloo), not {device.type}")


def check_free(size: int) -> None:
    """One tensor-parallel engine per process: it owns the default process group."""
    if dist.is_initialized() and environment.torchrun_rank() is None:
        raise ConfigError("a tensor-parallel engine is already running in this process; close() it first "
                          f"(this one asked for tensor_parallel_size {size})")


def loopback() -> str | None:
    """The loopback interface's name ("lo" on Linux), or None (every Unix has one)."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def loopback_env() -> dict[str, str]:
    """Socket settings that keep one machine's ranks on the loopback interface (gloo and NCCL would
    otherwise use the address the host name resolves to), for a child's environment: defaults under
    the caller's own settings."""
    lo = loopback()
    return {} if lo is None else {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo}


# gloo with its devices given. torch's own "gloo" ignores pg_options and makes its device from
# GLOO_SOCKET_IFNAME as the group is created, so choosing the interface there meant setting the
# environment around init_process_group while other threads run. Under this name the groups are
# plain ProcessGroupGloo's, made with the devices _gloo_options built.
_GLOO = "ovfast_gloo"


@functools.cache
def _register_gloo() -> None:
    def make(opts, options):  # torch's extended backend API: (DistributedBackendOptions, pg_options)
        if options is None:  # a group made without pg_options (new_group() in user code): torch's defaults
            return dist.ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, opts.timeout)
        mine = dist.ProcessGroupGloo._Options()
        mine._devices, mine._threads, mine._timeout = options._devices, options._threads, opts.timeout
        mine.global_ranks_in_group, mine.group_name = opts.global_ranks_in_group, opts.group_id
        return dist.ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, mine)

    dist.Backend.register_backend(_GLOO, make, extended_api=True, devices=["cpu"])


def _gloo_options(on_loopback: bool) -> dist.ProcessGroupGloo._Options:
    """The devices of this process's gloo groups, made now: on the interfaces GLOO_SOCKET_IFNAME
    names (the user's setting wins), else on loopback for ranks ovfast started, else gloo's default
    (the address the host name resolves to). A bad interface fails here, before any group is made
    and numbered: a numbered failure would give this process's later groups other names than a
    fresh worker's, and their rendezvous would hang."""
    names = environment.gloo_socket_ifname()
    lo = loopback() if on_loopback and names is None else None
    try:
        if names is not None:
            devices = [dist.ProcessGroupGloo.create_device(interface=name) for name in names]
        elif lo is not None:
            devices = [dist.ProcessGroupGloo.create_device(interface=lo)]
        else:
            devices = [dist.ProcessGroupGloo.create_default_device()]
    except RuntimeError as e:
        where = f"GLOO_SOCKET_IFNAME={','.join(names)!r}" if names is not None else f"loopback interface {lo!r}"
        raise ConfigError(f"gloo cannot use {where}: {str(e).splitlines()[0]}") from None
    options = dist.ProcessGroupGloo._Options()
    options._devices = devices
    options._threads = 2 * len(devices)  # as torch's gloo: two per device
    return options


def join(rank: int, size: int, device: torch.device, store: dist.Store | None = None) -> TensorParallel:
    """Join the process group and make the control group: through ``store`` (ranks this machine
    started, kept on loopback), or env:// under torchrun (its settings, for several nodes)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    gloo = _gloo_options(on_loopback=store is not None)  # before any group: a bad interface numbers none
    _register_gloo()
    if not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {"pg_options": gloo}
        if store is not None:
            kw["store"] = store
        else:
            kw["init_method"] = "env://"
        if backend == "nccl" and store is not None and loopback() is not None:
            # NCCL reads its interface from the environment only, once, when this process makes its
            # first communicator: the init_process_group below (device_id makes it eager). The one
            # tolerated write to the environment, a default under the user's own setting.
            environment.default_nccl_socket_ifname(loopback())
        dist.init_process_group(_GLOO if backend == "gloo" else backend, rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=environment.tp_timeout_s()), **kw)
    control = dist.new_group(backend=_GLOO, timeout=_IDLE, pg_options=gloo)
    return TensorParallel(rank=rank, size=size, control=control, backend=backend)


class Launch:
    """Ranks 1..size-1 of an engine, started on this machine, and the store they meet at."""

    def __init__(self, size: int, spec: WorkerSpec):
        self.size = size
        # The store listens on loopback only (by itself it would take every interface).
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        port = self._listener.getsockname()[1]
        self.join_timeout_s = environment.tp_join_timeout_s()
        self.store = dist.TCPStore("127.0.0.1", port, size, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=self.join_timeout_s),
                                   master_listen_fd=self._listener.fileno())
        env = environment.child_env(defaults=loopback_env())  # a new dict; the caller's settings win
        if spec.device_type == "cpu" and "OMP_NUM_THREADS" not in env:  # share the cores, don't oversubscribe them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // size))
        self.procs = [
            subprocess.Popen([sys.executable, "-c", _WORKER, spec.to_json(), f"127.0.0.1:{port}", str(r),
                              str(size)], env=env, stdin=subprocess.DEVNULL,
                             start_new_session=True)  # Ctrl-C reaches rank 0 alone, which stops them in order
            for r in range(1, size)
        ]

    def dead(self) -> str | None:
        """Which worker has exited, with its status, or None while all run."""
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                return f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with status {p.returncode}"
        return None

    def wait_joined(self) -> None:
        """Until every worker has reached the rendezvous; ModelLoadError if one dies or time runs out."""
        keys = [f"joined/{r}" for r in range(1, self.size)]
        deadline = time.monotonic() + self.join_timeout_s
        while not self.store.check(keys):
            reason = self.dead()
            if reason is not None:
                raise ModelLoadError(f"{reason} before joining (its error is printed above)")
            if time.monotonic() > deadline:
                raise ModelLoadError(f"tensor-parallel workers did not start within {self.join_timeout_s:.0f} s "
                                     "(OVFAST_TP_JOIN_TIMEOUT_S)")
            time.sleep(0.02)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()


def worker_main(argv: list[str]) -> int:
    """A spawned worker: ``SPEC_JSON HOST:PORT RANK SIZE``."""
    spec, where, rank, size = WorkerSpec.from_json(argv[0]), argv[1], int(argv[2]), int(argv[3])
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="ovfast-tp-parent", daemon=True).start()
    host, port = where.rsplit(":", 1)
    device = torch.device("cuda", spec.first_gpu + rank) if spec.device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        from ..ops import cpu_native

        cpu_native.default_block_cache()  # as rank 0's engine does (Engine.__init__)
    store = dist.TCPStore(host, int(port), size, is_master=False,
                          timeout=datetime.timedelta(seconds=environment.tp_join_timeout_s()))
    store.set(f"joined/{rank}", "1")
    tp = join(rank, size, device, store)
    return serve(tp, spec, device)


def _exit_with_parent(parent: int) -> None:
    """A spawned worker ends when rank 0's process is gone, even killed outright while this rank
    waits inside a collective that would otherwise run to its timeout."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(3)


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
    # Everything outside the decoder is rank 0's: skipped unread, as are the feature path's spares.
    load_weights(lm.weight_destinations(), checkpoint_tensors(ckpt, device),
                 lambda name: not name.startswith(("lm.", "lm_head.")) or feature_path_skips(name, cfg))
    lm.set_max_positions(spec.max_positions)
    lm = lm.eval().requires_grad_(False)
    cache = KVCache(cfg.text, spec.num_blocks, spec.block_size, dtype, device, kv_heads=len(plan.kv_heads))
    runner = DecodeRunner(lm, cache, device, rows=spec.rows, max_blocks=spec.max_blocks, tp=tp)
    return lm, cache, runner


def fewest(tp: TensorParallel, n: int) -> int:
    """The smallest ``n`` over the ranks (each passes its own), on the control group."""
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.control)
    return int(t)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters, a tied one counted once."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in module.parameters()}.values())


@torch.inference_mode()
def serve(tp: TensorParallel, spec: WorkerSpec, device: torch.device) -> int:
    """A worker's life: build the shard, report to rank 0, then run rank 0's calls until "stop".
    Returns the process's exit status."""
    try:
        lm, cache, runner = build_shard(spec, tp, device)
        report = {"error": None, "weight_bytes": parameter_bytes(lm), "kv_cache_bytes": cache.nbytes}
    except Exception as e:  # reported to rank 0, which raises it from load()
        report = {"error": f"rank {tp.rank}: {type(e).__name__}: {e}"}
    try:
        reports = [None] * tp.size
        dist.all_gather_object(reports, report, group=tp.control)
        if any(r["error"] for r in reports):
            return 1
        while True:
            op, meta = tp.receive()
            if op == "stop":
                return 0
            if op == "embed":
                lm.embed(tp.broadcast(torch.empty(meta["n"], dtype=torch.long, device=device)))
            elif op == "forward":  # into the engine's cache, or a job's scratch cache of the size named
                h = tp.broadcast(torch.empty(meta["shape"], dtype=getattr(torch, meta["dtype"]), device=device))
                into = cache.sized(meta["scratch"]) if meta["scratch"] else cache
                table = torch.tensor(meta["table"], dtype=torch.int32, device=device)
                lm(h, ForwardBatch.prefill(table, cache.block_size, meta["shape"][0], start=meta["start"]), into.k, into.v)
            elif op == "logits":
                lm.logits(tp.broadcast(torch.empty(meta["shape"], dtype=getattr(torch, meta["dtype"]), device=device)))
            elif op == "decode":
                runner.step(meta["rows"], meta["general"])
            elif op == "capture":
                runner.capture_all()
            else:  # pragma: no cover - rank 0 sends only the above
                raise RuntimeError(f"unknown tensor-parallel command {op!r}")
    except Exception as e:
        if "closed by peer" in str(e):  # rank 0 went away (its sockets closed): nothing is left to serve
            print(f"ovfast tensor-parallel rank {tp.rank}: rank 0 has gone; stopping", file=sys.stderr)
        else:
            traceback.print_exc()
        return 2
    finally:
        _leave()


def ready(tp: TensorParallel, mine: dict, launch: Launch | None) -> list[dict]:
    """Rank 0: wait until every worker has built its shard; each rank's report (weight and KV-cache
    bytes), rank-ordered. ModelLoadError naming the rank if one failed to load or died."""
    reports = [None] * tp.size
    try:
        dist.all_gather_object(reports, mine, group=tp.control)
    except RuntimeError as e:  # a worker's sockets closed: it died while loading
        reason = _wait_dead(launch)
        raise ModelLoadError((reason or "a tensor-parallel worker failed") + f" while loading its shard ({e})") from e
    failed = [r["error"] for r in reports if r["error"]]
    if failed:
        raise ModelLoadError("tensor-parallel workers failed to load: " + "; ".join(failed))
    return reports


def _wait_dead(launch: Launch | None, seconds: float = 2.0) -> str | None:
    """The exited worker, allowing its exit a moment to become visible after its sockets closed."""
    deadline = time.monotonic() + seconds
    while launch is not None:
        reason = launch.dead()
        if reason is not None or time.monotonic() > deadline:
            return reason
        time.sleep(0.02)
    return None


def _leave() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - a broken group may not tear down cleanly
            pass


class Workers:
    """Rank 0's hold on the group: the workers it spawned (none under torchrun), a monitor that
    reports a worker's death once, and a clean stop (also at interpreter exit)."""

    def __init__(self, tp: TensorParallel, launch: Launch | None, on_death):
        self.tp, self.launch = tp, launch
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self.first_death: str | None = None  # the worker that died first (abort() then ends the others)
        atexit.register(self.stop)
        if launch is not None:
            threading.Thread(target=self._monitor, args=(on_death,), name="ovfast-tp-monitor", daemon=True).start()

    def _monitor(self, on_death) -> None:
        while not self._stopped.wait(0.2):
            reason = self.dead()
            if reason is not None and not self._stopped.is_set():
                on_death(reason)
                return

    def dead(self, wait: float = 0.0) -> str | None:
        """Which worker died first, or None while all live (``wait``: give an exit that is under way a moment)."""
        if self.first_death is None and self.launch is not None:
            reason = _wait_dead(self.launch, wait)
            with self._lock:  # the first seen stays: abort() then ends the others
                self.first_death = self.first_death or reason
        return self.first_death

    def abort(self) -> None:
        """After a worker's death: end the others and break the group, so nothing waits on it."""
        if self.tp.backend == "nccl":  # an NCCL collective would otherwise wait out its timeout
            abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort_group is not None:
                try:
                    abort_group()
                except Exception:  # pragma: no cover
                    pass
        if self.launch is not None:
            self.launch.kill()

    def stop(self) -> None:
        """Tell the workers to finish (when all live), reap them and leave the group. Idempotent."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        atexit.unregister(self.stop)
        if self.dead() is None:
            try:
                self.tp.send(("stop", {}))
            except Exception:  # pragma: no cover - a worker went away meanwhile
                pass
        if self.launch is not None:
            for p in self.launch.procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:  # pragma: no cover - stuck in a collective
                    p.kill()
                    p.wait()
        _leave()

