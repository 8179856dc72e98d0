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


def test_shared_media_bench_tiny_caches_on_and_off(tmp_path, monkeypatch, capsys):
    """Users sharing images, caches on then off in one run: follow-ups reuse the prefix cache only
    when it is on, the vision cache hits only when it is on, and every answer is the same."""
    monkeypatch.setenv("OVFAST_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "--model", "tiny", "--shared-media", "--users", "3", "--questions", "2", "--images", "2",
                 "--turns", "2", "--new-tokens", "3", "--image-size", "64x48", "--quiet",
                 "--out-dir", str(tmp_path / "out")]) == 0
    (result,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*shared-media-u3-q2-i2-t2.json")]
    assert result["identical"] and result["identical_answers"] == result["answers"] == 3 * (2 + 2)
    on, off = result["on"], result["off"]
    assert on["prefix_caching"] and not off["prefix_caching"] and off["encoder_cache_tokens"] == 0
    for side in (on, off):
        assert set(side["groups"]) == {"first", "follow_up", "chat_first", "chat_later"}
        assert side["output_tokens"] == 3 * 4 * 3 and side["output_tokens_per_s"] > 0
        for g in side["groups"].values():
            assert g["ttft_ms"]["mean"] > 0 and g["engine_ttft_ms"]["mean"] > 0
        assert set(side["cache"]) >= {"prefix_cache_hit_tokens", "prefix_cache_query_tokens", "encoder_cache_hits",
                                      "encoder_cache_misses", "preemptions", "kv_blocks_used_peak", "kv_blocks_total"}
    for g in ("follow_up", "chat_later"):
        assert on["groups"][g]["cached_tokens"]["min"] > 0
        assert off["groups"][g]["cached_tokens"]["max"] == 0
    assert on["cache"]["prefix_cache_hit_tokens"] > 0 and off["cache"]["prefix_cache_hit_tokens"] == 0
    assert on["cache"]["encoder_cache_hits"] > 0 and off["cache"]["encoder_cache_hits"] == 0
    assert set(result["ttft_ratio_off_on"]) == {"first", "follow_up", "chat_first", "chat_later"}
    assert result["ttft_ratio_off_on"]["follow_up"] > 0
    assert "| follow-up question |" in capsys.readouterr().out
