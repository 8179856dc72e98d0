"""Engine.loglikelihood against transformers (fp32, CPU): the summed log-softmax of the
continuation tokens from the reference model's logits over the same ids, and the greedy flag."""
from __future__ import annotations

import secrets

import numpy as np
import pytest
import reference as ref
import torch

import ovfast
from ovfast.errors import ContextLengthError, PlaceholderError, UnsupportedInputError
from ovfast.errors import EmptyContinuationError

WORDS = ["sea", "cat", "red", "tree", "the", "of", "moon", "quick", "blue", "over", "river", "stone", "light"]


def _rng():
    seed = secrets.randbits(32)
    return seed, np.random.default_rng(seed)


def _text(rng, n: int) -> str:
    return "".join(" " + WORDS[i] for i in rng.integers(0, len(WORDS), n))


def _reference(path: str, images: list, prompt: str, cont: list[int], videos=()) -> tuple[float, bool]:
    """transformers' logits over prompt + continuation ids: (sum of log p(cont), all argmax)."""
    x = ref.inputs(path, images, prompt, videos)
    n = x["input_ids"].shape[1]
    x["input_ids"] = torch.cat([x["input_ids"], torch.tensor([cont])], dim=1)
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    with torch.no_grad():
        logits = ref.model(path)(**x).logits[0].float()
    pred = logits[n - 1 : n - 1 + len(cont)]
    target = torch.tensor(cont)
    total = torch.log_softmax(pred, -1).gather(1, target[:, None]).sum()
    return float(total), bool(torch.equal(pred.argmax(-1), target))


@pytest.mark.parametrize("case", ["text", "image", "two_images", "video"])
def test_matches_transformers(ckpt, case):
    path, engine = ckpt
    seed, rng = _rng()
    images, videos = [], []
    if case == "image":
        images = [ref.synthetic_image(int(rng.integers(40, 500)), int(rng.integers(40, 500)), int(rng.integers(1 << 30)))]
    elif case == "two_images":
        images = [ref.synthetic_image(200, 300, int(rng.integers(1 << 30))), ref.synthetic_image(90, 70, 5)]
    elif case == "video":
        videos = [ref.video_frames(2, 120, 160, seed=int(rng.integers(1 << 20)))]
    prompt = "Describe:" + _text(rng, 4)
    continuation = _text(rng, int(rng.integers(1, 6)))
    cont = engine.tokenizer.encode(continuation)
    expected, expected_greedy = _reference(path, images, prompt, cont, videos)
    items = images + [ovfast.Video(v) for v in videos]
    logprob, greedy = engine.loglikelihood(items, prompt, continuation)
    assert isinstance(logprob, float) and isinstance(greedy, bool)
    assert logprob == pytest.approx(expected, abs=1e-4), f"seed {seed}"
    assert greedy == expected_greedy
    # the same continuation as ids scores the same
    assert engine.loglikelihood(items, prompt, cont) == pytest.approx((logprob, greedy), abs=1e-5)
    assert engine.stats()["free_slots"] == engine.max_batch_size  # the lent slot is free again


def test_chat_false_uses_the_prompt_verbatim(tiny):
    path, engine = tiny
    seed, rng = _rng()
    image = ref.synthetic_image(64, 96, int(rng.integers(1 << 30)))
    prompt = "<image>\nUSER:" + _text(rng, 3) + "\nANSWER:"
    cont = engine.tokenizer.encode(_text(rng, 3))
    x = ref.inputs(path, [image], prompt, chat=False)
    n = x["input_ids"].shape[1]
    x["input_ids"] = torch.cat([x["input_ids"], torch.tensor([cont])], dim=1)
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    with torch.no_grad():
        logits = ref.model(path)(**x).logits[0, n - 1 : n - 1 + len(cont)].float()
    expected = float(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum())
    assert engine.loglikelihood([image], prompt, cont, chat=False)[0] == pytest.approx(expected, abs=1e-4), seed


def test_greedy_flag(ckpt):
    _, engine = ckpt
    seed, rng = _rng()
    cfg = engine.model_config
    placeholders = (cfg.image_token_id, cfg.video_token_id)
    for _ in range(20):
        image = ref.synthetic_image(int(rng.integers(40, 300)), int(rng.integers(40, 300)), int(rng.integers(1 << 30)))
        prompt = "What is it?" + _text(rng, 2)
        c = engine.complete([image], prompt, max_new_tokens=5, ignore_eos=True, logprobs=True)
        # random weights may emit a placeholder id, which a continuation may not hold: keep what precedes it
        n = next((i for i, t in enumerate(c.token_ids) if t in placeholders), len(c.token_ids))
        if n >= 2:
            break
    ids = list(c.token_ids[:n])
    logprob, greedy = engine.loglikelihood([image], prompt, ids)
    assert greedy, f"seed {seed}"
    assert logprob == pytest.approx(sum(t.logprob for t in c.logprobs[:n]), abs=1e-4)
    # one token that is not the argmax at its position
    other = next(t for t in range(cfg.text.vocab_size - 1, 0, -1)
                 if t != ids[-1] and t not in placeholders)
    worse, greedy = engine.loglikelihood([image], prompt, ids[:-1] + [other])
    assert not greedy
    assert worse < logprob
    # a prefix of the greedy answer is greedy too
    assert engine.loglikelihood([image], prompt, ids[:2])[1]


def test_errors(tiny):
    _, engine = tiny
    for empty in ("", []):
        with pytest.raises(EmptyContinuationError, match="empty"):
            engine.loglikelihood(None, "Hello", empty)
    assert issubclass(EmptyContinuationError, ovfast.OvfastError)
    too_long = [11] * engine.max_seq_len
    with pytest.raises(ContextLengthError, match="continuation"):
        engine.loglikelihood(None, "Hello", too_long)
    n_prompt = len(engine.requests.prepare(None, "Hello", True, ovfast.runtime.request.SamplingParams.make()).input_ids)
    engine.loglikelihood(None, "Hello", [11] * 4)  # fits
    with pytest.raises(ContextLengthError):
        engine.loglikelihood(None, "Hello", [11] * (engine.max_seq_len - n_prompt + 1))
    with pytest.raises(UnsupportedInputError):
        engine.loglikelihood(None, "Hello", [engine.model_config.text.vocab_size])
    with pytest.raises(UnsupportedInputError):
        engine.loglikelihood(None, "Hello", 3)
    with pytest.raises(PlaceholderError):
        engine.loglikelihood(None, "Hello", [engine.model_config.image_token_id])
    # the engine is untouched: the next request runs normally
    assert engine.stats()["free_slots"] == engine.max_batch_size
    assert isinstance(engine.loglikelihood(None, "Hello", " world")[0], float)
