"""Media references are parsed once (scheme case-insensitive), local files are read without
blocking, and prompts with nothing to run are refused before prefill: engine-level checks."""
from __future__ import annotations

import asyncio
import base64
import io
import os
import time

import pytest
import reference as ref

import ovfast
from ovfast.inputs import media_ref
from ovfast.inputs.media import to_rgb
from ovfast.server.media import MediaPolicy
from ovfast.server.protocol import chat_logprobs
from ovfast.runtime.generation import TokenLogprob


def _png(seed: int = 3) -> bytes:
    buf = io.BytesIO()
    ref.synthetic_image(40, 50, seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("text, kind", [
    ("data:image/png;base64,AAAA", "data"), ("Data:/../../secret.png", "data"), ("DATA:x", "data"),
    ("http://a/b.png", "http"), ("HTTPS://a/b.png", "http"), ("File:///x.png", "file"), ("fIlE://localhost/x", "file"),
    ("/abs/x.png", "path"), ("rel/x.png", "path"), ("clip:1.mp4", "path"), ("1data:x", "path"), (":x", "path"),
])
def test_parse_reads_the_scheme_case_insensitively(text, kind):
    assert media_ref.parse(text).kind == kind


def test_data_uris_of_any_case_decode_and_never_become_paths(tmp_path, monkeypatch):
    payload = _png()
    uri = "DaTa:image/png;BASE64," + base64.b64encode(payload).decode()
    assert media_ref.data_bytes(uri) == payload
    # A "Data:" path that exists relative to the working directory is still a data: URI (and a bad one).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Data:").mkdir()
    (tmp_path / "secret.png").write_bytes(payload)
    (tmp_path / "Data:secret.png").write_bytes(payload)
    for text in ("Data:/../secret.png", "Data:secret.png", "DATA:secret.png"):
        with pytest.raises(ovfast.ImageReadError, match="data: URI must be base64"):
            to_rgb(text)
        with pytest.raises(ovfast.VideoReadError, match="data: URI must be base64"):
            ovfast.Video(text)


def test_file_urls_and_special_files_in_the_python_api(tmp_path):
    good = tmp_path / "a b.png"
    good.write_bytes(_png())
    direct = to_rgb(str(good))
    via_url = to_rgb("file://" + str(good).replace(" ", "%20"))
    assert (direct == via_url).all()
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(ovfast.ImageReadError, match="not a regular file"):
        to_rgb(str(fifo))
    with pytest.raises(ovfast.VideoReadError, match="not a regular file"):
        ovfast.Video(str(fifo))
    assert time.monotonic() - t0 < 5  # refused, not blocked on the FIFO
    with pytest.raises(ovfast.ImageReadError, match="NUL"):
        to_rgb("x\x00.png")
    with pytest.raises(ovfast.ImageReadError, match="NUL"):
        to_rgb("file:///tmp/x%00.png")
    with pytest.raises(ovfast.UnsupportedInputError, match="not fetched"):
        to_rgb("HTTP://example.com/a.png")


def test_oversized_image_is_our_error_without_pillows_warning(recwarn):
    old = ovfast.inputs.media.max_image_pixels()
    ovfast.set_max_image_pixels(100)
    try:
        with pytest.raises(ovfast.ImageTooLargeError, match=r"the encoded image is 50x40"):
            to_rgb(_png())
    finally:
        ovfast.set_max_image_pixels(old)
    import PIL.Image
    saved = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = 1500  # 2000 pixels: above Pillow's warning line, below its error line
    try:
        to_rgb(_png())
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = saved
    assert not [w for w in recwarn if issubclass(w.category, PIL.Image.DecompressionBombWarning)]


def _fetch(policy: MediaPolicy, url: str):
    return asyncio.run(policy.fetch(url))


def test_media_policy_reads_only_regular_files_under_the_root(tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "ok.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.mkfifo(root / "pipe.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "sub").mkdir()
    policy = MediaPolicy(allowed_local_path=str(root))
    assert _fetch(policy, f"file://{root}/ok.png") == b"png"
    assert _fetch(policy, f"FILE://localhost{root}/ok.png") == b"png"
    assert isinstance(_fetch(policy, "Data:text/plain;base64,cG5n"), bytes)  # decoded here, never a path
    # Missing, FIFO, directory and a link out of the root: one message, not a hint of what exists.
    said = set()
    for name in ("missing.png", "pipe.png", "sub", "link.png"):
        with pytest.raises(ovfast.MediaAccessError) as e:
            _fetch(policy, f"file://{root}/{name}")
        said.add(str(e.value).replace(name, "NAME"))
    assert len(said) == 1 and "not a readable file" in said.pop()
    for url, match in [(f"file://{root}/../secret.png", "outside"), ("file:///etc/passwd", "outside"),
                       (f"file://{root}/%00.png", "NUL"), (f"file://{root}/%ff.png", "UTF-8"),
                       (f"file://other-host{root}/ok.png", "host"), ("Data:/../secret.png", "base64"),
                       (str(root / "ok.png"), "data:, http"), ("ftp://x/y.png", "data:, http"),
                       ("http://[::1/a.png", "malformed"), ("http://a.com:99999/a.png", "malformed"),
                       ("http:///a.png", "malformed"), ("http://a.com/a b.png", "spaces"),
                       ("http://example.com/a.png", "not allowed")]:
        with pytest.raises(ovfast.MediaAccessError, match=match):
            _fetch(policy, url)
    with pytest.raises(ovfast.MediaAccessError, match="not allowed"):
        _fetch(MediaPolicy(), f"file://{root}/ok.png")
    with pytest.raises(ovfast.MediaAccessError, match="limit"):
        _fetch(MediaPolicy(allowed_local_path=str(root), max_bytes=2), f"file://{root}/ok.png")


@pytest.fixture(scope="module")
def engine(checkpoint_dirs):
    return ovfast.load(checkpoint_dirs["tiny"], max_seq_len=512, max_batch_size=2, dtype="float32")


def test_an_empty_prompt_never_reaches_prefill(engine):
    before = engine.complete(None, "Hello there", chat=False, max_new_tokens=4).token_ids
    for prompt in ("", ):
        with pytest.raises(ovfast.PromptError, match="empty"):
            engine.complete(None, prompt, chat=False, max_new_tokens=4)
        with pytest.raises(ovfast.PromptError):
            engine.submit(None, prompt, chat=False).result(timeout=30)
    assert engine.complete(None, "Hello there", chat=False, max_new_tokens=4).token_ids == before


def test_lone_surrogates_are_a_prompt_error(engine):
    for call in (lambda: engine.complete(None, "a\ud800b", chat=False, max_new_tokens=2),
                 lambda: engine.complete(None, "a\udfffb", max_new_tokens=2),
                 lambda: engine.chat([{"role": "user", "content": "x\ud800"}], max_new_tokens=2)):
        with pytest.raises(ovfast.PromptError, match="surrogate"):
            call()


def test_seeds_are_any_64_bit_value_and_top_k_any_size(engine):
    kw = dict(max_new_tokens=6, temperature=1.0)
    # 2**64 - 1 and -1 are the same 64 bits: the same draws.
    a = engine.complete(None, "Count", seed=2**64 - 1, **kw).token_ids
    assert engine.complete(None, "Count", seed=-1, **kw).token_ids == a
    assert engine.complete(None, "Count", seed=-(2**63), **kw).token_ids
    for bad in (2**64, -(2**63) - 1, 2**100):
        with pytest.raises(ovfast.GenerationParamsError, match="seed"):
            engine.complete(None, "Count", seed=bad, **kw)
    off = engine.complete(None, "Count", seed=7, top_k=0, **kw).token_ids
    assert engine.complete(None, "Count", seed=7, top_k=2**63, **kw).token_ids == off


def test_token_bytes_are_the_raw_bytes_of_each_token(engine):
    tok = engine.tokenizer
    ids = tok.encode("héllo wörld, 日本語 and emoji 🙂 ✓")
    assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8") == tok.decode(ids)
    partial = [i for i in ids if tok.decode([i]) == "\ufffd"]
    assert partial, "the text should split a multi-byte character across tokens"
    for i in partial:
        raw = tok.token_bytes(i)
        assert raw != "\ufffd".encode() and raw
        lp = chat_logprobs([TokenLogprob(i, "\ufffd", -0.5, ((i, "\ufffd", -0.5),))], tok.token_bytes)
        entry = lp["content"][0]
        assert entry["bytes"] == list(raw) and entry["top_logprobs"][0]["bytes"] == list(raw)
    im_end = tok.token_id("<|im_end|>")
    assert tok.token_bytes(im_end) == b"<|im_end|>"
