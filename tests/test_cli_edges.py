"""A newcomer's rough edges (#20): refusals, file modes, one-line errors, --help, progress bars, imports."""
from __future__ import annotations

import argparse
import ast
import io
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import ovfast
from ovfast.terminal import progress
from ovfast.cli import build_parser, main
from ovfast.errors import ConfigError, ModelLoadError
from ovfast.runtime.devices import resolve_device
from ovfast.testing.random_checkpoint import build_checkpoint
from ovfast.tools import bench, serving_bench
from ovfast.tools.bench_common import plural
from ovfast.tools.convert import convert

ROOT = Path(ovfast.__file__).parent


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True

    def clear(self) -> None:
        self.seek(0)
        self.truncate()


def _terminal(monkeypatch) -> FakeTTY:
    """stderr as a terminal (bars allowed, as without --quiet). Called in the test itself: pytest
    puts its own sys.stderr back between a fixture's setup and the test."""
    monkeypatch.setattr(progress, "enabled", True)
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    return err


def _error_line(err: str, prefix: str) -> str:
    """The one error line: no traceback, and only one line saying "error:"."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


# --- 1. build-checkpoint refuses a directory holding a model -------------------------------------


def test_build_checkpoint_refuses_a_non_empty_directory(tmp_path, capsys):
    out = tmp_path / "c"
    build_checkpoint(out, "tiny-mha", max_shard_bytes=150_000)  # sharded, with an index
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["build-checkpoint", str(out)]) == 2
    assert "not empty" in _error_line(capsys.readouterr().err, "ovfast: error:")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    assert main(["build-checkpoint", str(out), "--force"]) == 0
    # The old shards and index are gone: they would be loaded instead of the new single file.
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert ovfast.load(out, max_seq_len=256).model_config.text.hidden_size == 48  # the tiny preset, not tiny-mha
    (tmp_path / "file").write_text("x")
    assert main(["build-checkpoint", str(tmp_path / "file")]) == 2


# --- 2. weight files honour the umask ------------------------------------------------------------


def test_weight_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        built = build_checkpoint(tmp_path / "lm", "tiny", layout="lmms-lab")
        converted = convert(built, tmp_path / "hf", max_shard_bytes=100_000)
    finally:
        os.umask(old)
    files = list(built.glob("*.safetensors")) + list(converted.glob("*.safetensors"))
    assert len(files) > 2
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {"0o644"}


# --- 3. device errors, bench errors: typed, one line, exit 2 -------------------------------------


def test_unknown_devices_are_config_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="not mps"):
        resolve_device("mps")


def test_cuda_without_cuda_is_a_config_error(monkeypatch, checkpoint_dirs, capsys):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)  # a CPU-only build of torch
    with pytest.raises(ConfigError, match="built without CUDA"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="built without CUDA"):
        ovfast.load(checkpoint_dirs["tiny"], device="cuda")
    assert main(["generate", "--model", checkpoint_dirs["tiny"], "--device", "cuda", "Hi"]) == 2
    assert "built without CUDA" in _error_line(capsys.readouterr().err, "ovfast: error:")
    assert main(["generate", "--model", checkpoint_dirs["tiny"], "--device", "tpu", "Hi"]) == 2
    assert "unknown device" in _error_line(capsys.readouterr().err, "ovfast: error:")


def test_cuda_device_counts(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="sees no GPUs"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="'cuda:2' does not exist; the GPUs torch sees: cuda:0, cuda:1"):
        resolve_device("cuda:2")


def test_bench_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OVFAST_CACHE", str(tmp_path / "cache"))
    out = ["--out-dir", str(tmp_path / "out"), "--no-transformers"]
    assert main(["bench", "--model", str(tmp_path / "nowhere" / "x" / "y"), *out]) == 2
    assert "neither a local directory" in _error_line(capsys.readouterr().err, "ovfast bench: error:")
    assert main(["bench", "--device", "tpu", *out]) == 2
    assert "unknown device" in _error_line(capsys.readouterr().err, "ovfast bench: error:")
    for bad in (["--new-tokens", "0"], ["--repeat", "-1"], ["--concurrency", "0"], ["--mix", "text:1,audio:1"],
                ["--rate", "-2"], ["--dtype", "fp8"]):
        with pytest.raises(SystemExit) as e:  # argparse: usage and the reason, exit 2
            main(["bench", *bad, *out])
        assert e.value.code == 2
        assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- 4. --help: every option explained, every default shown --------------------------------------


def _parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {name: sub.choices[name] for name in ("generate", "demo", "build-checkpoint", "convert")}
    return {**parsers, "bench": bench.build_parser()}


@pytest.mark.parametrize("name", ["generate", "demo", "build-checkpoint", "convert", "bench"])
def test_help_explains_every_option_and_shows_defaults(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a default
    parser = _parsers()[name]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{name} {action.dest} has no help"
        if action.default not in (None, False):
            shown = action.default if isinstance(action.default, str) else repr(action.default)
            assert f"(default: {shown})" in text, f"{name} --help does not show {action.dest}'s default"


def test_generate_help_names_the_default_model(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    assert f"(default: {ovfast.DEFAULT_MODEL})" in _parsers()["generate"].format_help()


# --- 5. the offline error names the command that builds a model ----------------------------------


def test_offline_error_points_to_build_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="`ovfast build-checkpoint DIR`"):
        ovfast.load("llava-hf/definitely-not-downloaded-here")


# --- 6. progress bars: on a terminal only, off with --quiet --------------------------------------


def test_progress_is_silent_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "enabled", True)
    assert list(progress.progress(range(3), desc="counting")) == [0, 1, 2]
    with progress.progress(desc="by hand", total=2) as bar:
        bar.update(2)
    with progress.spinner("waiting") as stop:
        stop()
    assert capsys.readouterr().err == ""


def test_progress_draws_on_a_terminal_unless_quiet(monkeypatch):
    tty = _terminal(monkeypatch)
    assert list(progress.progress(range(3), desc="counting")) == [0, 1, 2]
    with progress.spinner("waiting"):
        pass
    assert "counting" in tty.getvalue() and "waiting" in tty.getvalue()
    progress.set_enabled(False)
    tty.clear()
    assert list(progress.progress(range(3), desc="counting")) == [0, 1, 2]
    assert tty.getvalue() == ""


def test_commands_show_progress_on_a_terminal(tmp_path, monkeypatch, capsys):
    tty = _terminal(monkeypatch)
    assert main(["build-checkpoint", str(tmp_path / "a")]) == 0
    assert "writing random weights" in tty.getvalue()
    tty.clear()
    assert main(["build-checkpoint", str(tmp_path / "b"), "--quiet"]) == 0
    assert tty.getvalue() == ""
    assert main(["generate", "--model", str(tmp_path / "a"), "--stream", "Hi", "--max-new-tokens", "3"]) == 0
    assert "loading weights" in tty.getvalue() and "reading the prompt" in tty.getvalue()
    assert capsys.readouterr().out.endswith("\n")  # the answer itself goes to stdout, untouched


# --- 8. triton is optional -----------------------------------------------------------------------


def test_triton_is_not_a_dependency_nor_imported():
    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["test"])
    code = "import sys, ovfast, ovfast.cli, ovfast.tools.demo; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# --- 9. no import cycles among the tools ---------------------------------------------------------


def _imports(path: Path, module: str) -> set[str]:
    """Every ovfast module ``path`` imports, at any depth in the file (lazy imports count too)."""
    package = module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from . import serving_bench`
    return {m for m in out if m.startswith("ovfast")}


def test_tools_modules_import_no_cycle():
    tools = {f"ovfast.tools.{p.stem}": p for p in (ROOT / "tools").glob("*.py") if p.stem != "__init__"}
    graph = {m: _imports(p, m) & set(tools) for m, p in tools.items()}
    assert "ovfast.tools.bench" not in graph["ovfast.tools.serving_bench"]

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph[start])

    assert [m for m in graph if reaches(m, m, set())] == []


# --- 10. wording --------------------------------------------------------------------------------


def test_counts_are_pluralised(tmp_path):
    assert (plural(1, "request"), plural(2, "request"), plural(0, "client")) == ("1 request", "2 requests", "0 clients")

    class Refusing:
        def submit(self, *a, **kw):
            raise ConfigError("no")

    with pytest.raises(RuntimeError, match=r"^1 request failed under load"):
        serving_bench.run_load(Refusing(), [("text", [])], "q", 1, clients=1, rate=0.0, seed=0)
