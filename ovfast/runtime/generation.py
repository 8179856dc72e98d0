"""Per-request generation state: produced tokens, their text, stop conditions and timings."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..checkpoint.tokenizer import IncrementalDecoder, Tokenizer
from .handle import RequestHandle
from .request import PreparedRequest


@dataclass
class Timings:
    preprocess_ms: float = 0.0  # media decoding, resizing, tiling, prompt rendering and tokenisation
    vision_ms: float = 0.0  # SigLIP, projector and feature packing
    prefill_ms: float = 0.0  # the decoder over the prompt, up to the first token
    decode_ms: float = 0.0  # every later token
    decode_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    @property
    def time_to_first_token_ms(self) -> float:
        return self.preprocess_ms + self.vision_ms + self.prefill_ms

    @property
    def total_ms(self) -> float:
        return self.time_to_first_token_ms + self.decode_ms

    def as_dict(self) -> dict:
        return {
            "preprocess_ms": self.preprocess_ms, "vision_ms": self.vision_ms, "prefill_ms": self.prefill_ms,
            "decode_ms": self.decode_ms, "decode_tokens_per_s": self.decode_tokens_per_s,
        }


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model, and the most likely alternatives."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, token text, log-probability), most likely first


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated ids, the final eos included when one ended the answer
    prompt_tokens: int  # prompt length with every placeholder expanded
    finish_reason: str  # "stop" (eos or a stop string), "length" (max_new_tokens) or "cancelled"
    timings: Timings
    logprobs: list[TokenLogprob] | None = None  # with ``logprobs=``: one per token of token_ids
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not recomputed)


class TextAssembler:
    """The answer's text as tokens arrive, cut before the first stop string.

    ``pending()`` returns only text that can no longer turn out to be part of a stop string:
    the last len(longest stop) - 1 characters wait until more text or the end proves them clean.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.stopped = False  # a stop string was found
        self._closed = False
        self._sent = 0

    def push(self, token_id: int) -> None:
        self._add(self._decoder.push(token_id))

    def close(self) -> None:
        self._add(self._decoder.flush())
        self._closed = True

    def _add(self, delta: str) -> None:
        if not delta or self.stopped:
            return
        start = max(0, len(self.text) - self._hold)  # a stop string spanning old and new text starts here or later
        self.text += delta
        hits = [i for s in self._stop if (i := self.text.find(s, start)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def pending(self) -> str:
        end = len(self.text) if (self.stopped or self._closed) else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent : end]
        self._sent = end
        return out


class Status(enum.Enum):
    """Where a request is in its life; exactly one at a time (docs/request-lifecycle.md).

    PREPROCESSING -> READY -> PREFILLING (vision pieces, then prompt chunks) -> DECODING -> one of
    FINISHED, CANCELLED, FAILED. A request can be cancelled or fail from any earlier status.
    """

    PREPROCESSING = "preprocessing"  # accepted; a worker decodes media and tokenises
    READY = "ready"  # prepared, waiting for a KV-cache slot
    PREFILLING = "prefilling"  # in a slot: vision pieces, then prefill chunks, up to the first token
    DECODING = "decoding"  # in a decode step with every other decoding sequence
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (Status.FINISHED, Status.CANCELLED, Status.FAILED)

    @property
    def in_slot(self) -> bool:
        return self in (Status.PREFILLING, Status.DECODING)


@dataclass(eq=False)  # identity: sequences are kept in sets and compared by who they are
class Sequence:
    """One request from acceptance to its end: its status, and once prepared, its generation state."""

    handle: RequestHandle
    status: Status = Status.PREPROCESSING
    request: PreparedRequest | None = None  # set when preprocessing is done
    slot: int = -1  # its KV-cache slot while PREFILLING or DECODING
    text: TextAssembler | None = None
    seed: int = 0  # keys the draws of a sampling request (see ``sampling.keyed_noise``)
    timings: Timings = field(default_factory=Timings)
    vision: object | None = None  # the model runner's plan for the media still to encode
    marks: list = field(default_factory=list)  # (kind, start, end) device-time marks of its prefill pieces
    blocks: list[int] = field(default_factory=list)  # its KV-cache pages, in position order (its block table)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of its full pages so far
    registered: int = 0  # pages whose hash the pool knows (full and written)
    cached_tokens: int = 0  # prompt positions whose KV came from the prefix cache (first admission)
    resuming: bool = False  # preempted earlier: its prefill recomputes prompt + answer so far, chooses nothing
    embeds: torch.Tensor | None = None  # the prompt's input rows (media merged) until prefilled
    prefilled: int = 0  # prompt positions already in the cache
    length: int = 0  # positions of this sequence already in the cache
    decode_start: float = 0.0  # perf_counter() when the first token was out
    last_token: float = 0.0  # perf_counter() of the latest token
    previous_token: float = 0.0  # ... and of the one before (inter-token latency)
    tokens: list[int] = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None  # set with the token that ends it ("stop", "length") or by cancel()
    grammar: object | None = None  # a constrained request's ``constraints.GrammarState`` (kept across a preemption)

    @property
    def submitted(self) -> float:
        return self.handle.submitted

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.input_ids) if self.request is not None else 0

    def context_ids(self) -> list[int]:
        """The ids whose K/V its prefill writes: the prompt, and after a preemption also the answer
        so far except its last token (the next decode step's input)."""
        return self.request.input_ids + self.tokens[:-1] if self.resuming else self.request.input_ids

    def id_at(self, position: int) -> int:
        """The token at ``position`` of prompt + answer."""
        n = len(self.request.input_ids)
        return self.request.input_ids[position] if position < n else self.tokens[position - n]

    @property
    def done_generating(self) -> bool:
        """A token ended it (eos, a stop string, max_new_tokens) or it was cancelled."""
        return self.finish_reason is not None

    def add_token(self, token: int, eos_ids: frozenset[int]) -> None:
        self.tokens.append(token)
        self.text.push(token)
        if (token in eos_ids and not self.request.params.ignore_eos) or self.text.stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.request.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason:
            self.text.close()

    def end(self, reason: str) -> None:
        """It ends now, with ``reason`` (its grammar is complete: "stop"; cancelled: "cancelled")."""
        if not self.finish_reason:
            self.finish_reason = reason
            if self.text is not None:
                self.text.close()

    def cancel(self) -> None:
        self.end("cancelled")

    def completion(self) -> Completion:
        if self.text is None:  # ended before it was prepared or admitted
            return Completion("", [], self.prompt_tokens, self.finish_reason or "cancelled", self.timings)
        return Completion(self.text.text, list(self.tokens), self.prompt_tokens, self.finish_reason,
                          self.timings, self.logprobs, self.cached_tokens)
