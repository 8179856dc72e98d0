"""The command line: generate, demo and build-checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

import ovfast
import reference as ref
from ovfast.cli import main


def test_generate_prints_the_answer(tiny, tmp_path, capsys):
    path, engine = tiny
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    ref.synthetic_image(200, 300, 1).save(a)
    ref.synthetic_image(300, 200, 2).save(b, quality=95)
    assert main(["generate", "--model", path, "--image", str(a), "--image", str(b), "Compare.", "--max-new-tokens", "6"]) == 0
    expected = engine.generate([str(a), str(b)], "Compare.", max_new_tokens=6)
    out = capsys.readouterr()
    assert out.out == expected + "\n"
    assert "random-weight" in out.err


def test_generate_video_json_and_stream(tiny, tmp_path, capsys):
    path, engine = tiny
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        ref.synthetic_image(90, 120, 10 + i).save(frames / f"{i:03d}.png")
    assert main(["generate", "--model", path, "--video", str(frames), "What happens?", "--max-new-tokens", "5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = engine.complete(ovfast.Video([np.asarray(ref.synthetic_image(90, 120, 10 + i)) for i in range(3)]),
                               "What happens?", max_new_tokens=5)
    assert got["token_ids"] == expected.token_ids and got["prompt_tokens"] == expected.prompt_tokens
    assert got["random_weights"] is True and set(got["timings"]) >= {"vision_ms", "decode_tokens_per_s"}
    assert main(["generate", "--model", path, "Hello", "--max-new-tokens", "5", "--stream"]) == 0
    assert capsys.readouterr().out == engine.generate(None, "Hello", max_new_tokens=5) + "\n"


def test_bad_input_exits_2_with_message(tiny, capsys):
    path, _ = tiny
    assert main(["generate", "--model", path, "--image", "/no/such.png", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_build_checkpoint_command(tmp_path, capsys):
    assert main(["build-checkpoint", str(tmp_path / "c"), "--preset", "tiny-mha", "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "c" / "model.safetensors").is_file()
    assert ovfast.load(tmp_path / "c", max_seq_len=1024).random_weights


def test_demo_runs_offline_on_a_fresh_machine(tmp_path):
    """The console script, in a fresh process, with an empty cache and the Hub unreachable."""
    env = {**os.environ, "OVFAST_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    exe = os.path.join(os.path.dirname(sys.executable), "ovfast")
    cmd = [exe, "demo", "--max-new-tokens", "4"] if os.path.exists(exe) else [sys.executable, "-m", "ovfast", "demo"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("== one image", "== two images", "== video"):
        assert name in out.stdout
    assert out.stdout.count("random weights") == 3
    assert (tmp_path / "cache" / "tiny-random" / "config.json").is_file()
