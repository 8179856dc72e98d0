"""The static decode step (fixed buffers, batch buckets, tokens fed back on the device) against a
plain dynamic decode loop, and CUDA graphs against eager steps on a GPU."""
from __future__ import annotations

import pytest
import reference as ref
import torch

import ovfast
from ovfast.models.qwen2 import ForwardBatch
from ovfast.runtime.decode import buckets
from ovfast.runtime.request import SamplingParams


def _dynamic_greedy(engine, images, prompt, n):
    """Prefill, then one freshly built batch-1 forward per token: no static buffers, no feedback."""
    req = engine.requests.prepare(images, prompt, True, SamplingParams.make(max_new_tokens=n))
    lm = engine.model.language_model
    # A scratch cache of its own, pages in order: the engine's pages (and its prefix cache) stay untouched.
    pages = -(-(len(req.input_ids) + n + 1) // engine.cache.block_size)
    cache, table = engine.cache.sized(pages + 1), torch.arange(1, pages + 1, dtype=torch.int32)
    with torch.inference_mode():
        hidden = engine.runner.prompt_hidden(req, cache, table)
        token = int(lm.logits(hidden[-1:]).argmax(-1))
        out, position = [token], len(req.input_ids)
        while len(out) < n and token not in engine.eos_ids:
            batch = ForwardBatch.decode(torch.tensor([position]), table[None], cache.block_size)
            h = lm(lm.embed(torch.tensor([token])), batch, cache.k, cache.v)
            token = int(lm.logits(h).argmax(-1))
            out.append(token)
            position += 1
    return out


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(4) == [1, 2, 4]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(8) == [1, 2, 4, 8]


@pytest.mark.parametrize("n_requests", [1, 2, 3, 5])
def test_static_step_equals_dynamic_decoding(ckpt, n_requests):
    """Several batch widths (buckets 1, 2 and 4 of 4 slots, 3 rows padded to 4), lengths that end
    while others continue, and a fifth request refilling a freed slot."""
    _, engine = ckpt
    requests = [
        ([ref.synthetic_image(90, 120, 1)], "Describe.", 9),
        (None, "A text question that is a little longer than the others.", 4),
        ([ref.synthetic_image(200, 130, 2), ref.synthetic_image(64, 64, 3)], "Compare.", 12),
        (None, "Short.", 1),
        (ovfast.Video(ref.video_frames(2, 60, 80, 4)), "And this?", 7),
    ][:n_requests]
    expected = [_dynamic_greedy(engine, im, p, n) for im, p, n in requests]
    got = engine.complete_many([(im, p, {"max_new_tokens": n}) for im, p, n in requests])
    assert [c.token_ids for c in got] == expected
    assert not engine.runner.decode.active.any()


def test_rows_idle_on_their_last_position(tiny):
    """After a call, retired rows neither advance nor leave stale state behind."""
    _, engine = tiny
    engine.complete_many([(None, "a", {"max_new_tokens": 2}), (None, "b", {"max_new_tokens": 6})])
    before = engine.runner.decode.positions.clone()
    engine.runner.decode.step(2, sampling=False)
    assert torch.equal(engine.runner.decode.positions, before)


@pytest.mark.gpu
def test_cuda_graphs_equal_eager_steps(checkpoint_dirs, monkeypatch):
    path = checkpoint_dirs["tiny"]
    prompts = [(None, f"Question {i} about something.", {"max_new_tokens": 5 + 3 * i}) for i in range(5)]
    graphs = ovfast.load(path, device="cuda", dtype="bfloat16", max_batch_size=4, max_seq_len=1024)
    assert graphs.runner.use_graphs, "graphs need the Triton attention_decode kernel"
    capture_ms = graphs.runner.capture_graphs()
    assert capture_ms > 0 and len(graphs.runner.decode.graphs) == 4 * len(graphs.runner.decode.buckets)
    monkeypatch.setenv("OVFAST_CUDA_GRAPHS", "0")
    eager = ovfast.load(path, device="cuda", dtype="bfloat16", max_batch_size=4, max_seq_len=1024)
    assert not eager.runner.use_graphs
    a = [c.token_ids for c in graphs.complete_many(prompts)]
    b = [c.token_ids for c in eager.complete_many(prompts)]
    assert a == b
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    assert graphs.complete(None, "Sample.", **kw).token_ids == eager.complete(None, "Sample.", **kw).token_ids
