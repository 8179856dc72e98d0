"""Where a request's media may come from, and fetching it within limits.

The engine itself opens any path it is given; a server must not let a client name files or
hosts. Every URL in a request goes through ``MediaPolicy.fetch`` first:

* ``data:`` URIs are always accepted (the engine decodes them on its preprocessing workers);
* ``http(s)://`` only for hosts in ``allowed_domains`` (a domain admits its subdomains), fetched
  without following redirects (a redirect could leave the allow-list), with a byte cap and a
  time limit;
* ``file://`` only for files under ``allowed_local_path`` (after resolving links);
* anything else, bare paths included, is refused with ``MediaAccessError`` (HTTP 400).
"""
from __future__ import annotations

import asyncio
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..errors import MediaAccessError


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: tuple[str, ...] = ()
    allowed_local_path: str | None = None
    max_bytes: int = 64 << 20  # one fetched item
    timeout_s: float = 10.0

    def _domain_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == d or host.endswith("." + d) for d in (x.lower().rstrip(".") for x in self.allowed_domains))

    async def fetch(self, url: str) -> str | bytes:
        """The item for the engine: the ``data:`` URI itself, or the fetched bytes."""
        if not isinstance(url, str) or not url:
            raise MediaAccessError("a media url must be a non-empty string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return url
        if scheme in ("http", "https"):
            return await self._fetch_http(url)
        if scheme == "file":
            return await asyncio.to_thread(self._read_file, url)
        raise MediaAccessError(f"media urls must be data:, http(s):// or file:// urls, got {_short(url)}")

    async def _fetch_http(self, url: str) -> bytes:
        import httpx

        host = urllib.parse.urlsplit(url).hostname or ""
        if not self._domain_allowed(host):
            raise MediaAccessError(f"media from {host!r} is not allowed (see --allowed-media-domains)")
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
                async with asyncio.timeout(self.timeout_s):
                    async with client.stream("GET", url) as r:
                        if r.status_code != 200:
                            raise MediaAccessError(f"fetching {_short(url)} gave HTTP {r.status_code}")
                        declared = r.headers.get("content-length")
                        if declared and declared.isdigit() and int(declared) > self.max_bytes:
                            raise MediaAccessError(f"{_short(url)} is {declared} bytes; the limit is {self.max_bytes}")
                        body = bytearray()
                        async for chunk in r.aiter_bytes():
                            body += chunk
                            if len(body) > self.max_bytes:
                                raise MediaAccessError(f"{_short(url)} exceeds the {self.max_bytes}-byte media limit")
                        return bytes(body)
        except TimeoutError:
            raise MediaAccessError(f"fetching {_short(url)} took over {self.timeout_s} s") from None
        except httpx.HTTPError as e:
            raise MediaAccessError(f"fetching {_short(url)} failed: {type(e).__name__}") from None

    def _read_file(self, url: str) -> bytes:
        if self.allowed_local_path is None:
            raise MediaAccessError("file:// media are not allowed (see --allowed-local-media-path)")
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaAccessError(f"file:// urls must name a local file, got host {parts.netloc!r}")
        root = Path(self.allowed_local_path).resolve()
        path = Path(urllib.parse.unquote(parts.path)).resolve()
        if not path.is_relative_to(root):
            raise MediaAccessError(f"{path} is outside the allowed local media path")
        try:
            size = os.path.getsize(path)
            if size > self.max_bytes:
                raise MediaAccessError(f"{path.name} is {size} bytes; the limit is {self.max_bytes}")
            return path.read_bytes()
        except OSError as e:
            raise MediaAccessError(f"cannot read {path.name}: {e.strerror}") from None


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."
