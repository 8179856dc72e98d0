"""One config surface (#21): environment variables are read in ovfast.settings.environment only, as
defaults, at call time; nothing writes os.environ while threads run; `import ovfast` loads no test code."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import tokenize
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ovfast
from ovfast.errors import ConfigError
from ovfast.runtime import tensor_parallel
from ovfast.settings import environment

ROOT = Path(ovfast.__file__).resolve().parent.parent


# --- the environment module ------------------------------------------------------------------------


def test_defaults(monkeypatch):
    for name in environment.describe():
        monkeypatch.delenv(name, raising=False)
    assert environment.kernels() == "auto" and environment.attention() == "auto"
    assert environment.cuda_graphs() is True and environment.native() is True
    assert environment.triton_interpret() is False
    assert environment.preprocess_threads() is None and environment.cpu_block_cache_mb() == 2048
    assert environment.tp_timeout_s() == 600.0 and environment.tp_join_timeout_s() == 300.0
    assert environment.torchrun_rank() is None
    assert environment.gloo_socket_ifname() is None and environment.nccl_socket_ifname() is None
    assert environment.cache_dir() == Path.home() / ".cache" / "ovfast"
    assert environment.api_key() is None and environment.cuda_visible_devices() is None
    assert all(value is None for value, _ in environment.describe().values())


def test_values_are_read_at_call_time(monkeypatch):
    monkeypatch.setenv("OVFAST_KERNELS", "Torch")
    monkeypatch.setenv("OVFAST_ATTENTION", "flash_attn")
    monkeypatch.setenv("OVFAST_CUDA_GRAPHS", "0")
    monkeypatch.setenv("OVFAST_NATIVE", "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OVFAST_PREPROCESS_THREADS", "3")
    monkeypatch.setenv("OVFAST_TP_TIMEOUT_S", "2.5")
    monkeypatch.setenv("OVFAST_TP_JOIN_TIMEOUT_S", "7")
    monkeypatch.setenv("OVFAST_CACHE", "/somewhere")
    monkeypatch.setenv("OVFAST_API_KEY", "secret")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo,eth0")
    monkeypatch.setenv("OVFAST_CPU_BLOCK_CACHE_MB", "512")
    assert environment.cpu_block_cache_mb() == 512
    monkeypatch.setenv("OVFAST_CPU_PACKED_WEIGHTS_MB", "0")
    assert environment.cpu_packed_weights_mb() == 0
    assert environment.kernels() == "torch" and environment.attention() == "flash_attn"
    assert environment.cuda_graphs() is False and environment.native() is False
    assert environment.triton_interpret() is True
    assert environment.preprocess_threads() == 3
    assert environment.tp_timeout_s() == 2.5 and environment.tp_join_timeout_s() == 7.0
    assert environment.cache_dir() == Path("/somewhere") and environment.api_key() == "secret"
    assert environment.gloo_socket_ifname() == ["lo", "eth0"]
    assert environment.describe()["OVFAST_API_KEY"][0] == "<set>"  # never the key itself
    monkeypatch.setenv("OVFAST_CUDA_GRAPHS", "false")  # as before: only "0" turns them off
    assert environment.cuda_graphs() is True


def test_torchrun_rank(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert environment.torchrun_rank() is None
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert environment.torchrun_rank() == (1, 4, 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert environment.torchrun_rank() == (1, 4, 0)


@pytest.mark.parametrize("name, value, read", [
    ("OVFAST_KERNELS", "fast", environment.kernels),
    ("OVFAST_KERNELS", "", environment.kernels),
    ("OVFAST_ATTENTION", "bogus", environment.attention),
    ("OVFAST_PREPROCESS_THREADS", "0", environment.preprocess_threads),
    ("OVFAST_PREPROCESS_THREADS", "two", environment.preprocess_threads),
    ("OVFAST_CPU_BLOCK_CACHE_MB", "-1", environment.cpu_block_cache_mb),
    ("OVFAST_CPU_BLOCK_CACHE_MB", "1.5", environment.cpu_block_cache_mb),
    ("OVFAST_CPU_PACKED_WEIGHTS_MB", "lots", environment.cpu_packed_weights_mb),
    ("OVFAST_TP_TIMEOUT_S", "soon", environment.tp_timeout_s),
    ("OVFAST_TP_TIMEOUT_S", "-1", environment.tp_timeout_s),
    ("OVFAST_TP_JOIN_TIMEOUT_S", "inf", environment.tp_join_timeout_s),
    ("WORLD_SIZE", "two", environment.torchrun_rank),
    ("LOCAL_RANK", "x", environment.torchrun_rank),
])
def test_malformed_values_name_the_variable(monkeypatch, name, value, read):
    for var, default in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(var, default)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        read()


def test_child_env_is_a_new_dict(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "mine")
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    before = dict(os.environ)
    env = environment.child_env({"EXTRA": "1"}, defaults={"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"})
    assert env is not os.environ and dict(os.environ) == before
    assert env["GLOO_SOCKET_IFNAME"] == "mine" and env["NCCL_SOCKET_IFNAME"] == "lo" and env["EXTRA"] == "1"


def test_bad_kernel_mode_at_start_up_names_the_variable():
    env = {**os.environ, "OVFAST_KERNELS": "fast"}
    done = subprocess.run([sys.executable, "-c", "import ovfast"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "ConfigError" in done.stderr and "OVFAST_KERNELS='fast'" in done.stderr


# --- nothing else reads (or writes) the environment ------------------------------------------------

_ENV_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}
_THE_MODULE = Path("ovfast/settings/environment.py")
# engine.py still reads LOCAL_RANK; it moves to environment.torchrun_rank() with the engine's rewrite.


def _sources():
    for top in ("ovfast", "kernels"):
        for dirpath, dirnames, filenames in os.walk(ROOT / top):  # does not follow ovfast/kernels -> ../kernels
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                if name.endswith(".py"):
                    yield Path(dirpath, name)


def _env_uses(path: Path) -> list[int]:
    """Lines whose code (not comments or strings) names os.environ, getenv, putenv, ..."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [t.start[0] for t in tokens if t.type == tokenize.NAME and t.string in _ENV_NAMES]


def test_only_the_environment_module_reads_the_environment():
    found = {path.relative_to(ROOT): lines for path in _sources() if (lines := _env_uses(path))}
    assert _THE_MODULE in found  # the scan sees what it looks for
    assert Path("kernels/_runtime.py") in found or any((ROOT / "kernels") in p.parents for p in _sources())
    offenders = {str(p): lines for p, lines in found.items() if p != _THE_MODULE}
    assert not offenders, f"environment variables read outside ovfast/settings/environment.py: {offenders}"


# --- tensor_parallel.join: no os.environ writes, a bad interface fails before any group ------------


@pytest.fixture
def env_writes(monkeypatch):
    """Every write to os.environ from here on (set after the test's own monkeypatch.setenv calls)."""
    writes = []
    cls = type(os.environ)
    set_item, del_item = cls.__setitem__, cls.__delitem__

    def recording_set(self, key, value):
        writes.append(("set", key, value))
        set_item(self, key, value)

    def recording_del(self, key):
        writes.append(("del", key))
        del_item(self, key)

    def start():
        monkeypatch.setattr(cls, "__setitem__", recording_set)
        monkeypatch.setattr(cls, "__delitem__", recording_del)
        return writes

    return start


@pytest.fixture
def no_group():
    assert not dist.is_initialized()
    assert dist.distributed_c10d._world.group_count == 0
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_join_with_a_bad_interface_fails_before_any_group(monkeypatch, env_writes, no_group):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nonexistent0")
    before = dict(os.environ)
    writes = env_writes()
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="GLOO_SOCKET_IFNAME='nonexistent0'"):
        tensor_parallel.join(0, 1, torch.device("cpu"), dist.HashStore())
    assert time.monotonic() - t0 < 10
    assert writes == [] and dict(os.environ) == before
    assert not dist.is_initialized()
    assert dist.distributed_c10d._world.group_count == 0  # later groups keep the names fresh workers give theirs


@pytest.mark.parametrize("ifname", [None, "lo"])
def test_join_one_rank_on_loopback_writes_no_environment(monkeypatch, env_writes, no_group, ifname):
    if ifname is None:
        monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    else:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", ifname)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    before = dict(os.environ)
    writes = env_writes()
    tp = tensor_parallel.join(0, 1, torch.device("cpu"), dist.HashStore())
    assert writes == [] and dict(os.environ) == before
    assert tp.rank == 0 and tp.size == 1 and tp.backend == "gloo"
    x = torch.arange(4.0)
    tp.all_reduce(x)
    assert torch.equal(x, torch.arange(4.0))
    tp.send({"command": "hello"})  # the control group
    reports = [None]
    dist.all_gather_object(reports, {"rank": 0}, group=tp.control)
    assert reports == [{"rank": 0}]


# --- import ovfast ---------------------------------------------------------------------------------


def test_import_ovfast_loads_no_test_code(tmp_path):
    code = ("import sys, ovfast\n"
            "assert not any(m.startswith('ovfast.testing') for m in sys.modules), sorted(sys.modules)\n"
            "assert 'build_checkpoint' in dir(ovfast) and 'build_checkpoint' in ovfast.__all__\n"
            "from ovfast.testing.random_checkpoint import build_checkpoint\n"
            "assert ovfast.build_checkpoint is build_checkpoint\n"
            "print(ovfast.build_checkpoint(sys.argv[1], 'tiny'))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (Path(done.stdout.strip()) / "config.json").is_file()
    with pytest.raises(AttributeError, match="no_such_thing"):
        ovfast.no_such_thing  # noqa: B018
