"""Shared fixtures: two random-weight checkpoints in the exact Hugging Face layout.

* "tiny": GQA (6 query heads on 2 kv heads), tied embeddings, fp16 weights, llava-hf names, one
  safetensors file, chat_template.json;
* "tiny-mha": plain multi-head attention, untied head, fp32 weights, transformers 5.x names,
  sharded safetensors with an index, chat_template.jinja.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import ovfast  # noqa: E402

torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with `pytest -m gpu` on a machine that has one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

CHECKPOINTS = {
    "tiny": dict(preset="tiny", dtype="float16", layout="llava-hf", template_file="json"),
    "tiny-mha": dict(preset="tiny-mha", dtype="float32", layout="transformers5", template_file="jinja",
                     max_shard_bytes=150_000),
}


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: str(ovfast.build_checkpoint(root / name, **kw)) for name, kw in CHECKPOINTS.items()}


@pytest.fixture(scope="session")
def engines(checkpoint_dirs) -> dict[str, ovfast.Engine]:
    # fp32 everywhere (also on a GPU machine, where the default would be bf16): the reference is fp32.
    return {name: ovfast.load(path, max_seq_len=12288, dtype="float32") for name, path in checkpoint_dirs.items()}


@pytest.fixture(params=sorted(CHECKPOINTS))
def ckpt(request, checkpoint_dirs, engines):
    """(checkpoint directory, ovfast engine) for each test checkpoint."""
    return checkpoint_dirs[request.param], engines[request.param]


@pytest.fixture(scope="session")
def tiny(checkpoint_dirs, engines):
    return checkpoint_dirs["tiny"], engines["tiny"]
