"""Module-level conveniences: ``ovfast.generate`` with a cached engine per model."""
from __future__ import annotations

import os
import threading

from .runtime.engine import Engine, load

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(model: str | os.PathLike | None = None) -> Engine:
    """The engine for ``model`` (default: the 0.5B OneVision checkpoint), loaded once per process."""
    key = os.fspath(model) if model is not None else DEFAULT_MODEL
    with _engines_lock:
        if key not in _engines:
            _engines[key] = load(key)
        return _engines[key]


def generate(images, prompt: str, *, model: str | os.PathLike | None = None, **kw) -> str:
    """Answer ``prompt`` about ``images`` (an image, an ``ovfast.Video``, a list, or None).

    Keyword arguments are those of ``Engine.complete``.
    """
    return get_engine(model).generate(images, prompt, **kw)
