"""Scoring a given continuation: its summed log-probability and whether greedy decoding yields it.

``Engine.loglikelihood`` prefills prompt + continuation in one pass and hands the logits at the
positions that predict the continuation tokens to ``score``. Everything here is host-side checks
and one fp32 log-softmax; the forward pass is the engine's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..errors import ContextLengthError, EmptyContinuationError, PlaceholderError, UnsupportedInputError


def continuation_ids(tokenizer, continuation, vocab_size: int, reserved: Sequence[int] = ()) -> list[int]:
    """The token ids of ``continuation``: a string (encoded without special tokens) or a list of ids.

    ``reserved`` are ids a continuation may not hold (the media placeholders: they would ask for
    pixels nobody passed).
    """
    if isinstance(continuation, str):
        ids = tokenizer.encode(continuation)
    elif isinstance(continuation, Sequence) and not isinstance(continuation, (bytes, bytearray)):
        ids = list(continuation)
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise UnsupportedInputError(
                f"continuation token ids must be integers in [0, {vocab_size}); got {bad[:5]!r}"
            )
    else:
        raise UnsupportedInputError(
            f"continuation must be a string or a list of token ids, not {type(continuation).__name__}"
        )
    if not ids:
        raise EmptyContinuationError(
            "the continuation is empty (no tokens): loglikelihood scores at least one token after the prompt"
        )
    placeholders = sorted(set(ids) & set(reserved))
    if placeholders:
        raise PlaceholderError(
            f"the continuation holds media placeholder ids {placeholders} (<image>/<video>); "
            "media belong in the prompt"
        )
    return ids


def score(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """(sum of log p(target_i), every target_i the argmax) for logits (n, vocab) predicting ``targets``."""
    logits = logits.float()
    target = torch.tensor(targets, dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits, dim=-1)
    total = logprobs.gather(1, target[:, None]).sum()
    greedy = torch.equal(logits.argmax(dim=-1), target)
    return float(total), bool(greedy)


def with_continuation(prepare, continuation: list[int], max_seq_len: int):
    """``prepare(n)`` (the prompt as ``Engine.logits`` prepares it, leaving room for ``n`` tokens),
    with the continuation's ids appended to its ``input_ids``."""
    try:
        req = prepare(len(continuation))
    except ContextLengthError as e:
        raise ContextLengthError(
            f"the prompt and its {len(continuation)}-token continuation do not fit in this engine's context "
            f"of {max_seq_len} tokens ({e})"
        ) from e
    return replace(req, input_ids=req.input_ids + list(continuation))
