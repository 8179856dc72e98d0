"""`ovfast bench` smoke test at tiny shapes on the CPU (CI runs it; no timing is asserted)."""
from __future__ import annotations

import json

import torch

from ovfast.cli import main
from ovfast.tools.bench import copy_bandwidth, decode_bytes_per_token


def test_bench_tiny_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OVFAST_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "--model", "tiny", "--request", "video32", "--new-tokens", "5", "--repeat", "1",
                 "--out-dir", str(tmp_path / "out")]) == 0
    (result,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert result["ovfast"]["new_tokens"] == result["transformers"]["new_tokens"] == 5
    assert result["ovfast"]["prompt_tokens"] >= 32 * 196 + 1 + result["question_tokens"]  # frames, newline, question
    for side in ("ovfast", "transformers"):
        assert all(result[side][k] > 0 for k in ("ttft_ms", "vision_ms", "decode_tokens_per_s", "total_ms"))
    assert set(result["speedup"]) == {"total", "ttft", "decode_tokens_per_s"}
    assert 0 < result["roofline"]["fraction_of_roofline"]
    assert len(list((tmp_path / "out").glob("*.md"))) == 1
    assert "| ttft_ms |" in capsys.readouterr().out


def test_roofline_pieces(tiny):
    _, engine = tiny
    lm = engine.model.language_model
    layer_bytes = sum(p.numel() * 4 for p in lm.layers.parameters())
    assert decode_bytes_per_token(engine) == layer_bytes + lm.norm.numel() * 4 + lm.lm_head.numel() * 4
    assert copy_bandwidth(torch.device("cpu"), nbytes=1 << 22) > 0


def test_serving_bench_tiny_writes_results(tmp_path, monkeypatch, capsys):
    """Concurrent clients and the one-at-a-time baseline on the same engine: every request is
    answered under load exactly as alone (greedy), and both sides are reported."""
    monkeypatch.setenv("OVFAST_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "--model", "tiny", "--concurrency", "3", "--requests", "6", "--new-tokens", "4",
                 "--mix", "text:1,image:1,video:1", "--video-frames", "3", "--rate", "50",
                 "--out-dir", str(tmp_path / "out")]) == 0
    (result,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*serving-c3.json")]
    assert result["identical_to_sequential"] == 6 and sum(result["kinds"].values()) == 6
    for side in ("concurrent", "sequential"):
        r = result[side]
        assert r["requests"] == 6 and r["output_tokens"] == 6 * 4
        assert r["requests_per_s"] > 0 and r["ttft_ms"]["p99"] >= r["ttft_ms"]["p50"] > 0
    assert result["max_batch_size"] == 3 and result["engine_stats"]["running"] == 0
    assert "| output tokens/s |" in capsys.readouterr().out


def test_bench_tensor_parallel_makes_random_weights_on_every_rank(tmp_path, monkeypatch, capsys):
    """A preset is a checkpoint without weights: with --tensor-parallel-size each rank makes its
    own slice of the same random model (no weights file, no in-memory copy to hand over)."""
    monkeypatch.setenv("OVFAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["bench", "--model", "tiny", "--request", "image", "--new-tokens", "4", "--repeat", "1",
                 "--no-transformers", "--tensor-parallel-size", "2", "--out-dir", str(out)]) == 0
    (path,) = out.glob("*tiny-image-tp2.json")
    result = json.loads(path.read_text())
    assert result["kernels"]["tensor_parallel_size"] == 2 and len(result["kernels"]["weight_bytes_per_rank"]) == 2
    assert result["ovfast"]["new_tokens"] == 4 and "transformers" not in result
    assert "(tensor parallel)" in capsys.readouterr().out
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_bench_tensor_parallel_refuses_a_transformers_comparison(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setenv("OVFAST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match="--no-transformers"):
        main(["bench", "--model", "tiny", "--tensor-parallel-size", "2", "--out-dir", str(tmp_path / "out")])
