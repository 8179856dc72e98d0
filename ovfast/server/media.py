"""Where a request's media may come from, and fetching it within limits.

The engine opens any path it is given; a server must not let a client name files or hosts.
Every media url in a request goes through ``MediaPolicy.fetch``, which parses it once
(``ovfast.inputs.media_ref``: the scheme case-insensitively) and always hands the engine
bytes, never a string it could read as a path:

* ``data:`` URIs (base64) are always accepted;
* ``http(s)://`` only for hosts in ``allowed_domains`` (a domain admits its subdomains), fetched
  without following redirects (a redirect could leave the allow-list), with a byte cap and a
  time limit;
* ``file://`` only for regular files under ``allowed_local_path`` (after resolving links), read
  without blocking; a missing, unreadable or special file gets one message, so answers do not
  tell which files exist;
* anything else, bare paths included, is refused.

Every refusal is a ``MediaAccessError`` (HTTP 400).
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from ..errors import MediaAccessError
from ..inputs import media_ref

_INLINE_DECODE = 1 << 20  # base64 payloads above this are decoded on a thread, off the event loop


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: tuple[str, ...] = ()
    allowed_local_path: str | None = None
    max_bytes: int = 64 << 20  # one fetched item
    timeout_s: float = 10.0

    def _domain_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == d or host.endswith("." + d) for d in (x.lower().rstrip(".") for x in self.allowed_domains))

    async def fetch(self, url: str) -> bytes:
        """The bytes of the item ``url`` names, or ``MediaAccessError``."""
        if not isinstance(url, str) or not url:
            raise MediaAccessError("a media url must be a non-empty string")
        ref = media_ref.parse(url)
        try:
            if ref.kind == "data":
                if len(url) > _INLINE_DECODE:
                    return await asyncio.to_thread(media_ref.data_bytes, url)
                return media_ref.data_bytes(url)
            if ref.kind == "http":
                return await self._fetch_http(*media_ref.http_url(url))
            if ref.kind == "file":
                return await asyncio.to_thread(self._read_file, media_ref.file_path(url))
        except media_ref.BadReference as e:
            raise MediaAccessError(str(e)) from None
        raise MediaAccessError(f"media urls must be data:, http(s):// or file:// urls, got {ref.short!r}")

    async def _fetch_http(self, url: str, host: str) -> bytes:
        import httpx

        if not self._domain_allowed(host):
            raise MediaAccessError(f"media from {host!r} is not allowed (see --allowed-media-domains)")
        short = media_ref.MediaRef("http", url).short
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
                async with asyncio.timeout(self.timeout_s):
                    async with client.stream("GET", url) as r:
                        if r.status_code != 200:
                            raise MediaAccessError(f"fetching {short} gave HTTP {r.status_code}")
                        declared = r.headers.get("content-length")
                        if declared and declared.isdigit() and int(declared) > self.max_bytes:
                            raise MediaAccessError(f"{short} is {declared} bytes; the limit is {self.max_bytes}")
                        body = bytearray()
                        async for chunk in r.aiter_bytes():
                            body += chunk
                            if len(body) > self.max_bytes:
                                raise MediaAccessError(f"{short} exceeds the {self.max_bytes}-byte media limit")
                        return bytes(body)
        except TimeoutError:
            raise MediaAccessError(f"fetching {short} took over {self.timeout_s} s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise MediaAccessError(f"fetching {short} failed: {type(e).__name__}") from None

    def _read_file(self, path: str) -> bytes:
        if self.allowed_local_path is None:
            raise MediaAccessError("file:// media are not allowed (see --allowed-local-media-path)")
        # Decided on the name first (no filesystem access), then again after resolving links.
        if not _under(os.path.normpath(path), os.path.abspath(self.allowed_local_path)):
            raise MediaAccessError(f"{path} is outside the allowed local media path")
        unreadable = MediaAccessError(f"file://{path} is not a readable file under the allowed local media path")
        real = os.path.realpath(path)
        if not _under(real, os.path.realpath(self.allowed_local_path)):
            raise unreadable  # a link out of the root: said as if it were missing
        try:
            return media_ref.open_regular_file(real, self.max_bytes)
        except media_ref.FileTooLarge as e:
            raise MediaAccessError(f"{os.path.basename(path)} is {e}") from None
        except (media_ref.BadReference, OSError):
            raise unreadable from None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
