"""The whole engine with the decoder kernels forced on (``kernel_mode("triton")``) against transformers.

On the CPU the kernels run in Triton's interpreter (fp32 test checkpoints): greedy tokens must be
transformers' exactly and prefill logits as close as with the torch ops (1e-4). On a GPU the same
tests run compiled, on fp32 CUDA engines (the shared fixtures would default to bf16 there). Each
test also checks that every decoder kernel ran, so a silent fallback to torch cannot pass.
"""
from __future__ import annotations

import collections
import functools

import ovfast.kernels
import pytest
import reference as ref
import torch

import ovfast
from ovfast.ops import backends

N = 6  # new tokens: several decode steps over the paged cache
DECODER_OPS = ("rms_norm", "rope", "silu_mul", "attention_prefill", "attention_chunk", "attention_decode")
# What every generation runs; attention_chunk only runs for prompts split into several chunks.
ALWAYS = tuple(op for op in DECODER_OPS if op != "attention_chunk")
_cuda_engines: dict[str, ovfast.Engine] = {}


def _engine(path, engine):
    """The shared CPU engine, or an fp32 CUDA engine for the same checkpoint on a GPU machine."""
    if not torch.cuda.is_available():
        engine.reset_caches()  # a prompt an earlier test cached would skip the prefill kernels counted here
        return engine
    if path not in _cuda_engines:
        _cuda_engines[path] = ovfast.load(path, device="cuda", dtype="float32", max_seq_len=4096)
    return _cuda_engines[path]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Kernel mode "triton" for the test, counting the calls of each decoder kernel."""
    calls = collections.Counter()
    for name in DECODER_OPS:
        fn = getattr(ovfast.kernels, name)

        @functools.wraps(fn)
        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(ovfast.kernels, name, counted)
    with backends.kernel_mode("triton"):
        yield calls


def _ran(calls, names=ALWAYS):
    missing = [n for n in names if calls[n] == 0]
    assert not missing, f"kernels never called: {missing}"


@pytest.mark.parametrize(
    "images,prompt",
    [([], "Tell me a story about a lighthouse."), ([(64, 48)], "What is shown in this image?")],
    ids=["text", "image"],
)
def test_greedy_with_kernels_matches_transformers(ckpt, images, prompt, kernel_calls):
    path, engine = ckpt
    engine = _engine(path, engine)
    pics = [ref.synthetic_image(h, w, seed=h + w) for h, w in images]
    expected = ref.greedy(path, pics, prompt, N)
    assert engine.complete(pics, prompt, max_new_tokens=N).token_ids == expected
    _ran(kernel_calls)


def test_complete_many_with_kernels(tiny, kernel_calls):
    """Batched decode rows over the shared cache (slots refilled) with the split-KV kernel.

    Text only: the image path is covered above, and the interpreter makes each image cost seconds.
    """
    path, engine = tiny
    engine = _engine(path, engine)
    requests = [
        (None, "A text-only question, somewhat longer than the others."),
        (None, "First?"),
        (None, "Short."),
        (None, "Another one."),
        (None, "Fifth request: more than the four cache slots."),
    ]
    expected = [ref.greedy(path, [], p, N) for _, p in requests]
    got = engine.complete_many(requests, max_new_tokens=N)
    assert [c.token_ids for c in got] == expected
    _ran(kernel_calls)


def test_chunked_prefill_with_kernels_matches_transformers(checkpoint_dirs, kernel_calls):
    """A prompt fed in 7-token chunks: every chunk after the first attends to its cached pages
    through the chunk kernel, and the greedy tokens stay transformers'."""
    path = checkpoint_dirs["tiny"]
    prompt = "Tell me a story about a lighthouse."
    expected = ref.greedy(path, [], prompt, N)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with ovfast.load(path, device=device, dtype="float32", max_seq_len=4096, prefill_chunk=7) as engine:
        assert engine.complete([], prompt, max_new_tokens=N).token_ids == expected
    _ran(kernel_calls, DECODER_OPS)


@pytest.mark.parametrize("case", ["text", "image"])
def test_prefill_logits_with_kernels(ckpt, case, kernel_calls):
    path, engine = ckpt
    engine = _engine(path, engine)
    images = [ref.synthetic_image(50, 60, seed=11)] if case == "image" else []
    prompt = "What is shown in this image?" if images else "Write one sentence about the sea."
    x = ref.inputs(path, images, prompt)
    with torch.no_grad():
        expected = ref.model(path)(**x).logits[0]
    ours = engine.logits(images, prompt).cpu()
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected.float(), rtol=1e-4, atol=1e-4)
    _ran(kernel_calls, ("rms_norm", "rope", "silu_mul", "attention_prefill"))
