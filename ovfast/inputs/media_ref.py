"""Media references: the one place a string naming an image or video is parsed.

A reference is a ``data:`` URI, an ``http(s)://`` URL, a ``file://`` URL, or (for the Python API
only) a plain path. The scheme is read as RFC 3986 defines it, case-insensitively, so ``Data:``
and ``FILE://`` are what they say they are and never fall through to a path. The engine and the
server both ask ``parse`` and then decide on the ``kind`` alone: the engine opens paths, the
server never does (``ovfast.server.media``).

``open_regular_file`` is how either side reads a local file: ``stat`` before ``open`` so a FIFO,
device or socket is refused without blocking, and one message whether the file is missing,
unreadable or not a regular file.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")  # RFC 3986 section 3.1
_CONTROL = re.compile(r"[\x00-\x20\x7f]")  # never valid unencoded in a URL


class BadReference(ValueError):
    """A reference that cannot be parsed; callers re-raise it as their own typed error."""


class FileTooLarge(BadReference):
    """A local file above the byte limit it was read under."""


@dataclass(frozen=True)
class MediaRef:
    kind: str  # "data", "http", "file" or "path"
    text: str  # the reference as given

    @property
    def short(self) -> str:
        return self.text if len(self.text) <= 80 else self.text[:77] + "..."


def parse(ref: str) -> MediaRef:
    """What ``ref`` names. Only ``data``, ``http``/``https`` and ``file`` are schemes here; anything
    else (``C:\\x.png``, ``clip:1.mp4``) is a path, which only the Python API accepts."""
    m = _SCHEME.match(ref)
    scheme = m.group(1).lower() if m else ""
    if scheme == "data":
        return MediaRef("data", ref)
    if scheme in ("http", "https"):
        return MediaRef("http", ref)
    if scheme == "file":
        return MediaRef("file", ref)
    return MediaRef("path", ref)


def data_bytes(ref: str) -> bytes:
    """The payload of a base64 ``data:`` URI (``data:image/png;base64,...``)."""
    head, sep, payload = ref.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise BadReference("a data: URI must be base64: data:<type>;base64,<payload>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadReference("the data: URI does not hold valid base64") from None


def file_path(ref: str) -> str:
    """The local path of a ``file://`` URL (percent-decoded, absolute, no NUL)."""
    parts = _split(ref)
    if parts.netloc not in ("", "localhost"):
        raise BadReference(f"a file:// url must name a local file, not one on host {parts.netloc!r}")
    if parts.query or parts.fragment:
        raise BadReference("a file:// url takes no query or fragment")
    try:
        path = urllib.parse.unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise BadReference("the file:// url's percent-escapes are not UTF-8") from None
    if "\x00" in path:
        raise BadReference("the file:// url holds a NUL byte")
    if not path.startswith("/"):
        raise BadReference("a file:// url needs an absolute path (file:///dir/name.png)")
    return path


def http_url(ref: str) -> tuple[str, str]:
    """(the URL, its host) for an ``http(s)://`` URL that a client can send as it is."""
    if _CONTROL.search(ref):
        raise BadReference("the url holds spaces or control characters (percent-encode them)")
    parts = _split(ref)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or port == 0:
        raise BadReference(f"malformed url {MediaRef('http', ref).short!r}: it needs a host and a valid port")
    return ref, parts.hostname.lower().rstrip(".")


def _split(ref: str) -> urllib.parse.SplitResult:
    try:
        return urllib.parse.urlsplit(ref)
    except ValueError as e:  # an unclosed "[" in the host, and the like
        raise BadReference(f"malformed url {MediaRef('file', ref).short!r}: {e}") from None


def open_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file, or ``OSError``/``BadReference`` without blocking.

    The stat before the open refuses FIFOs, devices and sockets (opening a FIFO would block);
    O_NONBLOCK and the fstat after it close the gap where the path is swapped in between.
    """
    path = os.fspath(path)
    if "\x00" in path:
        raise BadReference("the path holds a NUL byte")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise IsADirectoryError(path) if os.path.isdir(path) else BadReference("not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadReference("not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileTooLarge(f"{st.st_size} bytes; the limit is {max_bytes}")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:
        raise FileTooLarge(f"over the limit of {max_bytes} bytes")
    return data
