"""Tensor parallelism on the CPU (gloo): an engine cut across N processes answers exactly as one
process does, on checkpoints with GQA (key/value heads split, and replicated when there are fewer
than ranks), MHA, tied and untied heads, an uneven vocabulary and an uneven MLP split; text,
images and video; batched decoding, chunked prefill, logits, log-probabilities and seeded
sampling. Then the errors (before any process starts), a worker that dies (at start, while
loading, while serving), torchrun, and the command line and server flags.

One process is the reference here: tests/test_generate_parity.py holds it to transformers.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import reference as ref
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import ovfast
from ovfast.checkpoint.config import ModelConfig
from ovfast.distributed import plan_shards
from ovfast.errors import ConfigError, EngineBusyError, ModelLoadError
from ovfast.models.qwen2 import Qwen2ForCausalLM
from ovfast.runtime import tensor_parallel
from ovfast.testing.random_checkpoint import build_config

ROOT = Path(__file__).resolve().parents[1]

CHECKPOINTS = {
    # 6 query heads on 2 key/value heads, tied embeddings, vocabulary 416, fp16 on disk
    "gqa-tied": dict(preset="tiny", dtype="float16"),
    # MHA (4 heads), untied head, vocabulary 447 (odd: padded to 448 for 2 and 4 ranks), MLP 90 (4 ranks: 22/23),
    # fp32, sharded safetensors
    "mha-untied": dict(preset="tiny-mha", dtype="float32", max_shard_bytes=60_000,
                       text=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=90,
                                 vocab_size=447)),
    # 8 query heads on 2 key/value heads: 4 ranks replicate each key/value head on two ranks
    "gqa-replicated": dict(preset="tiny", dtype="float32",
                           text=dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, vocab_size=447)),
}
CASES = [("gqa-tied", 2), ("mha-untied", 2), ("mha-untied", 4), ("gqa-replicated", 4)]
ENGINE = dict(dtype="float32", max_seq_len=2048, max_batch_size=3, prefill_chunk=64)  # chunked prefill on


@pytest.fixture(scope="module")
def tp_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp-checkpoints")
    return {name: str(ovfast.build_checkpoint(root / name, **kw)) for name, kw in CHECKPOINTS.items()}


@pytest.fixture(scope="class", params=CASES, ids=[f"{n}-tp{k}" for n, k in CASES])
def pair(request, tp_dirs):
    """(one-process engine, N-process engine, N) on the same checkpoint."""
    name, n = request.param
    with ovfast.load(tp_dirs[name], **ENGINE) as single, \
            ovfast.load(tp_dirs[name], tensor_parallel_size=n, **ENGINE) as parallel:
        yield single, parallel, n
    assert not dist.is_initialized()  # close() left the process group


def _requests():
    frames = ref.video_frames(3, 72, 96, seed=5)
    return [
        (None, "Tell me a story about a lighthouse.", {"max_new_tokens": 9}),
        (ref.synthetic_image(90, 140, 1), "What is in the picture?", {"max_new_tokens": 12}),
        ([ref.synthetic_image(60, 50, 2), ref.synthetic_image(40, 80, 3)], "Compare them.", {"max_new_tokens": 6}),
        (ovfast.Video(frames), "What happens?", {"max_new_tokens": 10}),
        ([ref.synthetic_image(70, 70, 4), ovfast.Video(frames[:2])], "Both?", {"max_new_tokens": 7}),
    ]


def _assert_same(a: ovfast.Completion, b: ovfast.Completion) -> None:
    assert a.token_ids == b.token_ids and a.text == b.text and a.prompt_tokens == b.prompt_tokens
    assert len(a.logprobs) == len(b.logprobs) == len(a.token_ids)
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.token_id == y.token_id
        assert abs(x.logprob - y.logprob) < 1e-4
        assert [t[0] for t in x.top] == [t[0] for t in y.top] and len(x.top) == 3
        assert max(abs(s[2] - t[2]) for s, t in zip(x.top, y.top)) < 1e-4


class TestOneProcessVersusN:
    """Each case's two engines live for this class only (one tensor-parallel engine per process)."""

    def test_batched_greedy_tokens_and_logprobs_equal_one_process(self, pair):
        """Five requests over three slots (refills, rows finishing at different steps, prompts of
        hundreds of tokens prefilled in chunks of 64), the same tokens and log-probabilities."""
        single, parallel, _ = pair
        requests = _requests()
        want = single.complete_many(requests, ignore_eos=True, logprobs=3)
        got = parallel.complete_many(requests, ignore_eos=True, logprobs=3)
        assert any(c.prompt_tokens > ENGINE["prefill_chunk"] for c in want)
        for a, b in zip(want, got):
            _assert_same(a, b)

    def test_logits_within_fp32_tolerance(self, pair):
        single, parallel, _ = pair
        image = ref.synthetic_image(100, 130, 7)
        want, got = single.logits(image, "Describe it."), parallel.logits(image, "Describe it.")
        assert got.shape == want.shape == (want.shape[0], single.model_config.text.vocab_size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        lw = single.loglikelihood(image, "Describe it.", "A small picture.")
        lg = parallel.loglikelihood(image, "Describe it.", "A small picture.")
        assert lg[1] == lw[1] and abs(lg[0] - lw[0]) < 1e-4

    def test_seeded_sampling_and_streaming_equal_one_process(self, pair):
        single, parallel, _ = pair
        kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=11, ignore_eos=True,
                  repetition_penalty=1.1)
        want = single.complete(None, "Sample something.", **kw)
        assert parallel.complete(None, "Sample something.", **kw).token_ids == want.token_ids
        assert "".join(parallel.stream(None, "Sample something.", **kw)) == want.text

    def test_info_reports_each_ranks_share(self, pair, tp_dirs):
        single, parallel, n = pair
        info = parallel.info()
        assert info["tensor_parallel_size"] == n and single.info()["tensor_parallel_size"] == 1
        cfg = single.model_config.text

        def shard_bytes(rank: int, size: int = n) -> int:  # the decoder share a rank holds, from the plan alone
            with torch.device("meta"):
                lm = Qwen2ForCausalLM(cfg, plan_shards(cfg, rank, size)).float()
            return tensor_parallel.parameter_bytes(lm)

        whole = single.info()["weight_bytes_per_rank"][0]
        rank0_extra = whole - shard_bytes(0, 1)  # vision tower, projector, newline: rank 0's alone
        assert info["weight_bytes_per_rank"] == [rank0_extra + shard_bytes(0)] + [shard_bytes(r) for r in range(1, n)]
        assert sum(info["weight_bytes_per_rank"]) < n * whole
        kv = single.info()["kv_cache_bytes_per_rank"][0]
        assert info["kv_cache_bytes_per_rank"] == [kv * len(plan_shards(cfg, r, n).kv_heads) // cfg.num_kv_heads
                                                   for r in range(n)]

    def test_follow_up_from_the_prefix_cache_equals_one_process(self, pair):
        """Paged KV under tensor parallelism: the workers' pages follow rank 0's block tables, so a
        follow-up served from the prefix cache is the same answer."""
        single, parallel, _ = pair
        image = ref.synthetic_image(80, 120, 9)
        want = single.complete(image, "Describe the picture.", max_new_tokens=8, ignore_eos=True)
        parallel.complete(image, "Describe the picture.", max_new_tokens=8, ignore_eos=True)
        again = parallel.complete(image, "Describe the picture.", max_new_tokens=8, ignore_eos=True)
        assert again.cached_tokens > 0 and again.token_ids == want.token_ids

    def test_one_engine_per_process(self, pair, tp_dirs):
        single, parallel, n = pair
        name = next(k for k, v in tp_dirs.items() if v == str(parallel.checkpoint.path))
        with pytest.raises(ConfigError, match="already running"):
            ovfast.load(tp_dirs[name], tensor_parallel_size=n, **ENGINE)
        assert parallel.complete(None, "Still fine?", max_new_tokens=3).finish_reason in ("stop", "length")


def test_preemption_under_tensor_parallelism_equals_one_process(tp_dirs):
    """A KV budget that forces preemptions: the workers recompute with rank 0 and every answer is
    the one a roomy single-process engine gives."""
    prompts = [(None, f"Tell a long story number {i}.", {"max_new_tokens": 40, "ignore_eos": True}) for i in range(3)]
    with ovfast.load(tp_dirs["gqa-tied"], **ENGINE) as single:
        want = [c.token_ids for c in single.complete_many(prompts)]
    small = {**ENGINE, "kv_cache_tokens": 128, "kv_block_size": 16}
    with ovfast.load(tp_dirs["gqa-tied"], tensor_parallel_size=2, **small) as parallel:
        assert [c.token_ids for c in parallel.complete_many(prompts)] == want
        assert parallel.stats()["preemptions"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_with_cuda_graphs_equal_one_gpu(tp_dirs):
    """NCCL, and the decode step captured as CUDA graphs on both ranks, collectives inside (where
    decode attention is a kernel at this head size), fp32."""
    kw = dict(ENGINE, device="cuda:0")
    requests = _requests()
    with ovfast.load(tp_dirs["mha-untied"], **kw) as single:
        want = single.complete_many(requests, ignore_eos=True, logprobs=3)
    with ovfast.load(tp_dirs["mha-untied"], tensor_parallel_size=2, **kw) as parallel:
        got = parallel.complete_many(requests, ignore_eos=True, logprobs=3)
    for a, b in zip(want, got):
        _assert_same(a, b)


# --- the plan, at the real sizes (no processes) ---------------------------------------------------


@pytest.mark.parametrize("preset,size", [("0.5b", 2), ("7b", 2), ("7b", 4), ("72b", 2), ("72b", 4), ("72b", 8),
                                         ("72b", 16)])
def test_plan_at_real_sizes(preset, size):
    cfg = ModelConfig.from_dict(build_config(preset)).text
    plans = [plan_shards(cfg, r, size) for r in range(size)]
    group = cfg.num_heads // cfg.num_kv_heads
    assert sorted(h for p in plans for h in p.q_heads) == list(range(cfg.num_heads))
    for p in plans:  # every query head of a rank reads a key/value head that rank holds
        assert {h // group for h in p.q_heads} <= set(p.kv_heads) and len(p.kv_heads) == max(1, cfg.num_kv_heads // size)
    assert sum(len(p.intermediate) for p in plans) == cfg.intermediate_size
    assert plans[-1].vocab.stop >= cfg.vocab_size and len({len(p.vocab) for p in plans}) == 1
    assert sum(len(p.vocab_rows) for p in plans) == cfg.vocab_size


@pytest.mark.parametrize("preset,size,needle", [("0.5b", 4, "14 attention heads"), ("7b", 8, "28 attention heads"),
                                                ("0.5b", 7, "2 key/value heads"), ("7b", 0, "positive integer")])
def test_plan_refuses_impossible_cuts(preset, size, needle):
    with pytest.raises(ConfigError, match=needle):
        plan_shards(ModelConfig.from_dict(build_config(preset)).text, 0, size)


def test_checkpoint_without_weights_is_one_model_across_ranks(tmp_path):
    """build_checkpoint(weights=False): every rank makes each tensor from a generator seeded by its
    name and keeps its slice, so N ranks run the model one process makes."""
    path = ovfast.build_checkpoint(tmp_path / "noweights", "tiny", weights=False, seed=3)
    assert not list(path.glob("*.safetensors"))
    with ovfast.load(path, **ENGINE) as single:
        want = single.complete(ref.synthetic_image(80, 60, 2), "Describe.", max_new_tokens=6, ignore_eos=True)
    with ovfast.load(path, tensor_parallel_size=2, **ENGINE) as parallel:
        assert parallel.complete(ref.synthetic_image(80, 60, 2), "Describe.", max_new_tokens=6,
                                 ignore_eos=True).token_ids == want.token_ids
    config = json.loads((path / "config.json").read_text())
    del config["ovfast_random_weights"]  # a real checkpoint without weights is an error, not noise
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        ovfast.load(path)


# --- errors before any process starts -------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if a worker process would start."""
    def refuse(*a, **kw):
        raise AssertionError("a worker process was started")
    monkeypatch.setattr(tensor_parallel, "Launch", refuse)


@pytest.mark.parametrize("kw,needle", [
    (dict(tensor_parallel_size=4), "does not divide the 6 attention heads"),  # gqa-tied: 6 heads
    (dict(tensor_parallel_size=0), "positive integer"),
    (dict(tensor_parallel_size=True), "positive integer"),
    (dict(tensor_parallel_size="2"), "positive integer"),
    (dict(tensor_parallel_size=2, weights={}), "weights= cannot be combined"),
])
def test_config_errors_start_no_process(tp_dirs, no_launch, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        ovfast.load(tp_dirs["gqa-tied"], **kw)


def test_more_ranks_than_gpus(tp_dirs, no_launch):
    first = max(torch.cuda.device_count() - 1, 0)  # from the last GPU, two ranks never fit
    with pytest.raises(ConfigError, match="GPUs"):
        ovfast.load(tp_dirs["mha-untied"], device=f"cuda:{first}", tensor_parallel_size=2)


# --- workers that die -----------------------------------------------------------------------------


def test_worker_that_dies_before_joining_is_reported(tp_dirs, monkeypatch):
    monkeypatch.setattr(sys, "executable", shutil.which("false"))  # the worker's interpreter exits 1 at once
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"rank 1 .*exited with status 1 before joining"):
        ovfast.load(tp_dirs["mha-untied"], tensor_parallel_size=2, **ENGINE)
    assert time.monotonic() - t0 < 60 and not dist.is_initialized()


def test_worker_load_error_is_reported_and_nothing_leaks(tp_dirs, tmp_path):
    """A head too short for rank 1's rows (rank 0's rows are all there): rank 1 fails alone."""
    broken = tmp_path / "broken"
    shutil.copytree(tp_dirs["mha-untied"], broken)
    cut = []
    for f in broken.glob("*.safetensors"):
        tensors = load_file(f)
        for key in [k for k in tensors if k.endswith("lm_head.weight")]:
            tensors[key] = tensors[key][:300].clone()
            save_file(tensors, f, metadata={"format": "pt"})
            cut.append(key)
    assert len(cut) == 1
    with pytest.raises(ModelLoadError, match=r"rank 1: ModelLoadError: .*lm_head.weight .*this rank's slice"):
        ovfast.load(broken, tensor_parallel_size=2, **ENGINE)
    assert not dist.is_initialized()
    with ovfast.load(tp_dirs["mha-untied"], tensor_parallel_size=2, **ENGINE) as engine:  # the next one starts
        assert engine.complete(None, "Hello", max_new_tokens=2).token_ids


def test_worker_that_dies_while_serving_fails_requests_and_stops_cleanly(tp_dirs):
    engine = ovfast.load(tp_dirs["mha-untied"], tensor_parallel_size=4, **ENGINE)
    procs = engine._workers.launch.procs
    handle = engine.submit(None, "A long answer, please.", max_new_tokens=1900, ignore_eos=True)
    pieces = iter(handle)
    next(pieces)  # decoding has started
    procs[1].kill()  # rank 2
    with pytest.raises(EngineBusyError, match=r"rank 2 .*exited"):
        handle.result(timeout=60)
    with pytest.raises(EngineBusyError, match=r"rank 2 .*exited"):
        engine.complete(None, "Anyone there?", max_new_tokens=2)
    deadline = time.monotonic() + 30
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:  # the survivors are ended
        time.sleep(0.05)
    assert all(p.poll() is not None for p in procs)
    t0 = time.monotonic()
    engine.close()
    assert time.monotonic() - t0 < 30 and not dist.is_initialized()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_workers_end_when_rank_0_is_killed(tp_dirs):
    """Rank 0 killed outright (no close, no atexit): its workers notice and exit by themselves."""
    script = ("import os, signal, ovfast\n"
              f"e = ovfast.load({tp_dirs['mha-untied']!r}, tensor_parallel_size=4, dtype='float32', max_seq_len=256)\n"
              "print(*[p.pid for p in e._workers.launch.procs], flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr[-2000:]
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 3
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def test_idle_workers_outlive_the_collective_timeout(tp_dirs, monkeypatch):
    """Workers wait for commands on the control group, which has no practical timeout: idling
    longer than OVFAST_TP_TIMEOUT_S (here 3 s; it bounds the data collectives) breaks nothing."""
    monkeypatch.setenv("OVFAST_TP_TIMEOUT_S", "3")  # every rank reads it as it joins
    with ovfast.load(tp_dirs["gqa-tied"], tensor_parallel_size=2, **ENGINE) as engine:
        first = engine.complete(None, "Hello there", max_new_tokens=4)
        time.sleep(5)
        assert engine.complete(None, "Hello there", max_new_tokens=4).token_ids == first.token_ids
        assert engine._workers.dead() is None


# --- torchrun, the command line, the server -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _isolated(cmd: list[str]) -> list[str]:
    """``cmd`` in a network namespace of its own when the sandbox allows one (torchrun's store
    listens on every interface; there only loopback exists), else as it is, on 127.0.0.1."""
    if shutil.which("unshare") and shutil.which("ip") and subprocess.run(
            ["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0:
        return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
    return cmd


def test_torchrun_two_ranks_equal_one_process(tp_dirs, tmp_path):
    ckpt, out = tp_dirs["gqa-tied"], tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(ROOT / "tests" / "tp_torchrun_main.py"), ckpt, str(out)]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(_isolated(cmd), env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = json.loads(out.read_text())
    with ovfast.load(ckpt, **ENGINE) as single:
        want = single.complete(ref.synthetic_image(90, 140, 1), "What is in the picture?", max_new_tokens=8,
                               ignore_eos=True)
    assert got["tokens"] == want.token_ids
    assert got["tensor_parallel_size"] == 2 and len(got["weight_bytes_per_rank"]) == 2


def test_generate_command_with_tensor_parallel_size(tp_dirs, capsys):
    from ovfast.cli import main

    argv = ["generate", "--model", tp_dirs["mha-untied"], "--dtype", "float32", "--max-new-tokens", "6", "--json",
            "Hello there"]
    assert main(argv) == 0
    want = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(argv + ["--tensor-parallel-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want
    assert not dist.is_initialized()


def test_serve_with_tensor_parallel_size(tp_dirs, tmp_path):
    import openai
    from test_server import NAME, _start, _stop

    ckpt = tp_dirs["gqa-tied"]
    served = _start(ckpt, tmp_path / "server.log", "--tensor-parallel-size", "2", "--max-batch-size", "2")
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none")
        r = client.chat.completions.create(model=NAME, temperature=0, max_tokens=6,
                                           messages=[{"role": "user", "content": "Hello there"}])
    finally:
        assert _stop(served) == 0
    with ovfast.load(ckpt, dtype="float32", max_seq_len=8192) as single:
        want = single.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=6)
    assert r.choices[0].message.content == want.text
    assert "exited" not in (tmp_path / "server.log").read_text()
