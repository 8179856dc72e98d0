"""lmms-eval's ``ovfast`` model: an ovfast engine behind lmms-eval's ``lmms`` interface.

    lmms-eval --model ovfast --model_args pretrained=lmms-lab/llava-onevision-qwen2-0.5b-ov,semantics=original \\
        --tasks mme --batch_size 8

Requests are read the way lmms-eval's own ``llava_onevision`` model reads them: each
``Instance.args`` names its document (``task_dict[task][split][doc_id]``) and the function that
gives its visuals. PIL images are images; a string is an image file when its suffix says so and a
video file otherwise (``ovfast.Video(path, num_frames=max_frames_num)``: ``linspace`` sampling, 32
frames by default, as ``llava_onevision``); a list of frames with the task metadata
``task_type: video`` and ``sample_frames`` is one video. Under the original semantics the context
keeps the task's ``<image>`` markers; without any, one per visual is put before it
(``"<image> <image>\\n" + context``, LLaVA-NeXT's placement) and the qwen_1_5 conversation is
rendered around it. Under the transformers semantics the markers are dropped and the checkpoint's
chat template places the media.

``generate_until`` submits every request to the engine (a window of them at a time), so they
decode together in its continuous batch; answers come back stripped, in request order.
``loglikelihood`` returns ``Engine.loglikelihood``: the summed log-probability of the
continuation after the prompt and whether greedy decoding yields it.
"""
from __future__ import annotations

import os
import warnings
from collections import deque
from pathlib import Path

import numpy as np
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from ..checkpoint.prompts import IMAGE_MARKER as IMAGE, VIDEO_MARKER as VIDEO
from ..errors import (
    ConfigError,
    GenerationParamsError,
    OvfastError,
    UnsupportedInputError,
)
from ..inputs import media_ref
from ..inputs.media import Video
from ..runtime.engine import load

__all__ = ["OvfastLMM", "manifest"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
# gen_kwargs lmms-eval tasks pass that mean nothing to ovfast (or are llava_onevision's own knobs).
_IGNORED_GEN_KWARGS = {"image_aspect_ratio", "use_cache", "modalities", "stopping_criteria", "pad_token_id"}
DEFAULT_MAX_NEW_TOKENS = 1024  # llava_onevision's default when a task gives none


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval 0.7 registers plugins from a ``ModelManifest``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="ovfast", simple_class_path=f"{__name__}.OvfastLMM")


def sampling_params(gen_kwargs: dict | None) -> dict:
    """lmms-eval generation kwargs -> ovfast parameters.

    ``until`` (a string or a list) become stop strings; greedy unless ``do_sample`` (then
    ``temperature``, default 1, ``top_p``, ``top_k``); ``max_new_tokens`` defaults to 1024;
    ``num_beams`` > 1 is refused.
    """
    kw = dict(gen_kwargs or {})
    num_beams = kw.pop("num_beams", 1)
    if num_beams not in (None, 1):
        raise GenerationParamsError(
            f"num_beams={num_beams!r}: ovfast decodes greedily or samples; beam search is not supported"
        )
    until = kw.pop("until", None)
    stop = [until] if isinstance(until, str) else list(until or [])
    if not all(isinstance(s, str) for s in stop):
        raise GenerationParamsError(f"until must be a string or a list of strings, got {until!r}")
    max_new_tokens = kw.pop("max_new_tokens", None)
    params: dict = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens}
    if [s for s in stop if s]:
        params["stop"] = [s for s in stop if s]
    do_sample = bool(kw.pop("do_sample", False))
    temperature, top_p, top_k = kw.pop("temperature", None), kw.pop("top_p", None), kw.pop("top_k", None)
    if do_sample:  # as transformers' generate: without do_sample, temperature and top_p are ignored
        params["temperature"] = 1.0 if temperature is None else temperature
        if top_p is not None:
            params["top_p"] = top_p
        if top_k:
            params["top_k"] = top_k
    for name in ("seed", "repetition_penalty"):
        if name in kw:
            params[name] = kw.pop(name)
    unknown = sorted(set(kw) - _IGNORED_GEN_KWARGS)
    if unknown:
        warnings.warn(f"ovfast ignores the generation kwargs {unknown}", stacklevel=3)
    return params


class OvfastLMM(lmms):
    """lmms-eval model ``ovfast``.

    Model args: ``pretrained`` (a Hub id or a local directory; required), ``device``, ``dtype``,
    ``max_batch_size`` (KV-cache slots: requests decoded together; default lmms-eval's
    ``batch_size`` when above 1, else 4), ``max_seq_len``, ``semantics`` ("original", the default,
    or "transformers"), ``max_frames_num`` (frames sampled from a video file, 32).
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = None,
                 max_batch_size: int | None = None, max_seq_len: int | None = None, semantics: str | None = "original",
                 max_frames_num: int = 32, batch_size: int | str | None = 1, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ConfigError(f"ovfast: unknown model_args {sorted(kwargs)}")
        if not pretrained:
            raise ConfigError("ovfast: model_args needs pretrained=<Hub id or local checkpoint directory>")
        if isinstance(max_frames_num, bool) or not isinstance(max_frames_num, int) or max_frames_num < 1:
            raise ConfigError(f"ovfast: max_frames_num must be a positive integer, got {max_frames_num!r}")
        if isinstance(semantics, str) and semantics.lower() in ("", "none", "default"):
            semantics = None  # the checkpoint family's default
        if max_batch_size is None:
            max_batch_size = batch_size if isinstance(batch_size, int) and batch_size > 1 else 4
        self.batch_size_per_gpu = batch_size
        self.max_frames_num = max_frames_num
        load_kw = {"device": device, "dtype": dtype, "max_batch_size": int(max_batch_size), "max_seq_len": max_seq_len,
                   "max_video_frames": max(64, max_frames_num)}
        if semantics is not None:
            load_kw["semantics"] = semantics
        self.engine = load(pretrained, **load_kw)
        self.semantics = self.engine.model_config.semantics
        self.chat_template = None  # prompts are rendered by the engine (see _prompt)
        self._window = min(self.engine.config.max_queue, 4 * self.engine.max_batch_size)

    # --- what lmms-eval reads ------------------------------------------------------------------

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.engine.device

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # --- requests -> engine calls --------------------------------------------------------------

    def _items(self, visual, metadata: dict | None) -> list:
        """The doc's visuals as ovfast items (images, ``ovfast.Video``)."""
        if visual is None:
            return []
        if not isinstance(visual, (list, tuple)):
            visual = [visual]
        visual = [v for v in visual if v is not None]
        if not visual:
            return []
        metadata = metadata or {}
        if metadata.get("task_type") == "video" and metadata.get("sample_frames"):  # frames that make one video
            keep = np.linspace(0, len(visual) - 1, int(metadata["sample_frames"]), dtype=int)
            return [Video([visual[i] for i in keep])]
        items = []
        for v in visual:
            if isinstance(v, (str, os.PathLike)) and media_ref.parse(str(v)).kind == "path":
                if Path(v).suffix.lower() in _IMAGE_SUFFIXES:
                    items.append(str(v))
                else:
                    items.append(Video(str(v), num_frames=self.max_frames_num))
            elif isinstance(v, dict):
                raise UnsupportedInputError(
                    f"ovfast takes images and videos; this visual is a dict with keys {sorted(v)[:5]} (audio?)"
                )
            else:  # PIL images, arrays, bytes, ovfast.Video: the engine checks them
                items.append(v)
        return items

    def _prompt(self, context: str, n_items: int) -> str:
        """The context with its media markers placed as the engine's semantics expects them."""
        if self.semantics == "original":
            if n_items and IMAGE not in context and VIDEO not in context:
                return " ".join([IMAGE] * n_items) + "\n" + context
            return context
        # transformers semantics: the chat template places every item before the text.
        for marker in (IMAGE + "\n", VIDEO + "\n", IMAGE, VIDEO):
            context = context.replace(marker, "")
        return context

    def _doc(self, task, split, doc_id):
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as e:
            raise UnsupportedInputError(f"ovfast: no document {task}/{split}/{doc_id} in task_dict") from e

    @staticmethod
    def _where(inst: Instance, e: OvfastError) -> OvfastError:
        return type(e)(f"{inst.task_name} doc {inst.doc_id}: {e}")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        pending: deque = deque()

        def finish():
            i, inst, context, gen_kwargs, handle = pending.popleft()
            try:
                text = handle.result().text.strip()
            except OvfastError as e:
                raise self._where(inst, e) from e
            results[i] = text
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)

        try:
            for i, inst in enumerate(requests):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = inst.args[:6]
                try:
                    items = self._items(doc_to_visual(self._doc(task, split, doc_id)), inst.metadata)
                    params = sampling_params(gen_kwargs)
                    handle = self.engine.submit(items, self._prompt(context, len(items)), **params)
                except OvfastError as e:
                    raise self._where(inst, e) from e
                pending.append((i, inst, context, gen_kwargs, handle))
                while len(pending) >= self._window:
                    finish()
            while pending:
                finish()
        finally:
            for *_, handle in pending:  # on an error the rest stop
                handle.cancel()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for inst in requests:
            if len(inst.args) < 6:
                raise UnsupportedInputError(
                    f"ovfast: loglikelihood requests need (context, target, doc_to_visual, doc_id, task, split), "
                    f"got {len(inst.args)} arguments"
                )
            context, doc_to_target, doc_to_visual, doc_id, task, split = inst.args[:6]
            try:
                doc = self._doc(task, split, doc_id)
                continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
                items = self._items(doc_to_visual(doc), inst.metadata)
                result = self.engine.loglikelihood(items, self._prompt(context, len(items)), continuation)
            except OvfastError as e:
                raise self._where(inst, e) from e
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "ovfast does not implement lmms-eval's generate_until_multi_round (multi-round tasks); "
            "run them with another model, or ask for it in an issue"
        )

    def clean(self) -> None:
        self.engine.close()
        super().clean()
