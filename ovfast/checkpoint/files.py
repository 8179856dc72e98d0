"""Finding a checkpoint (local directory or Hub id) and reading its files, without transformers."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

# What a hub download fetches: configs, templates, tokenizer (tokenizer.json, or vocab.json + merges.txt)
# and safetensors weights (no .bin, no .pt).
_HUB_PATTERNS = ["*.json", "*.jinja", "*.safetensors", "chat_template*", "merges.txt"]


@dataclass
class Checkpoint:
    path: Path
    config: dict
    generation_config: dict
    preprocessor_config: dict
    tokenizer_config: dict
    tokenizer_file: Path | None  # tokenizer.json; None: the directory has vocab.json + merges.txt instead
    chat_template: str | None
    weight_files: list[Path]

    @property
    def random_weights(self) -> dict | None:
        """The builder's marker, present when the weights are random (see random_checkpoint.py)."""
        return self.config.get("ovfast_random_weights")


def resolve(model: str | os.PathLike) -> Path:
    """A local checkpoint directory for ``model``: the directory itself, or a Hub snapshot."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(model)
    if path.exists():
        raise ModelLoadError(f"{name!r} is a file; pass the checkpoint directory that holds config.json")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{name!r} is neither a local directory nor a Hugging Face Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:  # a complete cached snapshot needs no network
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        raise ModelLoadError(
            f"could not download {name!r} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Without network access, pass a local directory in the Hugging Face layout (config.json, "
            "model.safetensors, tokenizer.json or vocab.json + merges.txt, preprocessor_config.json, "
            "chat template), for example one downloaded elsewhere, or build a random-weight test checkpoint "
            "with `ovfast build-checkpoint DIR` (in Python: `ovfast.build_checkpoint(dir)`)."
        ) from e


def open_checkpoint(model: str | os.PathLike, need_weights: bool = True) -> Checkpoint:
    path = resolve(model)
    config = _read_json(path / "config.json", required=True)
    tokenizer_file = find_tokenizer_file(path)
    tokenizer_config = _read_json(path / "tokenizer_config.json")
    return Checkpoint(
        path=path,
        config=config,
        generation_config=_read_json(path / "generation_config.json"),
        preprocessor_config=_read_json(path / "preprocessor_config.json"),
        tokenizer_config=tokenizer_config,
        tokenizer_file=tokenizer_file,
        chat_template=_chat_template(path, tokenizer_config),
        weight_files=_weight_files(path) if need_weights and not _random_without_weights(path, config) else [],
    )


def find_tokenizer_file(path: Path) -> Path | None:
    """``path``'s tokenizer.json, or None when it has the slow files (vocab.json + merges.txt) instead.

    Load the tokenizer with ``checkpoint.tokenizer.Tokenizer.from_checkpoint``, which reads either.
    """
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file():
        return tokenizer_file
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return None
    missing = [n for n in ("vocab.json", "merges.txt") if not (path / n).is_file()]
    raise ModelLoadError(
        f"{path} has no tokenizer: ovfast reads tokenizer.json, or vocab.json + merges.txt "
        f"(there is no tokenizer.json and no {' and no '.join(missing)})"
    )


def _read_json(p: Path, required: bool = False) -> dict:
    if not p.is_file():
        if required:
            raise ModelLoadError(f"{p.parent} has no {p.name}; is it a Hugging Face checkpoint directory?")
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{p} is not valid JSON: {e}") from e


def _chat_template(path: Path, tokenizer_config: dict) -> str | None:
    """The processor's template, found where transformers' processor looks, in its order.

    processor_config.json's own entry wins, then the legacy chat_template.json, then
    chat_template.jinja; tokenizer_config.json's template (the text model's, which transformers'
    processor does not use) is the last resort.
    """
    template = _read_json(path / "processor_config.json").get("chat_template")
    if template is None and (path / "chat_template.json").is_file():
        template = _read_json(path / "chat_template.json").get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    if isinstance(template, dict):
        template = template.get("default")
    return template


def _random_without_weights(path: Path, config: dict) -> bool:
    """A random-weight checkpoint written without weights: loading makes them (``random_weights``)."""
    return "ovfast_random_weights" in config and not any(path.glob("*.safetensors"))


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = " (it holds PyTorch .bin weights; convert them to safetensors)" if any(path.glob("*.bin")) else ""
        raise ModelLoadError(f"{path} has no safetensors weights{hint}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{path} is missing weight shards named in its index: {', '.join(missing[:5])}")
    return files
