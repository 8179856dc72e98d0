"""Video files with PyAV: an index of the packets first, then only the frames asked for.

Opening a file demuxes its packets without decoding them. That gives the exact frame count and
every frame's presentation timestamp, also for variable-frame-rate files and headers that carry
no frame count or duration. Decoding then seeks to the keyframe before each wanted frame and
decodes forward (threaded), so 32 frames of a long video cost 32 short runs, not the whole stream.
Streams whose packets carry no timestamps (raw elementary streams) are counted, then read, by
decoding from the start.

Every failure is a ``VideoReadError``; the work is bounded by the packet count, so a broken
file ends in frames or an error, never a hang.
"""
from __future__ import annotations

import bisect
import io
import itertools
import os
import stat
from collections.abc import Sequence

import av
import numpy as np

from ..errors import ImageTooLargeError, UnsupportedInputError, VideoReadError

DEFAULT_NUM_FRAMES = 32  # lmms-eval's max_frames_num for LLaVA-OneVision
MAX_PACKETS = 10_000_000  # about 46 hours at 60 fps: the index pass stops there


class VideoFile:
    """One video stream of a file or of encoded bytes: its frame count, timestamps and frames."""

    def __init__(self, source: str | os.PathLike | bytes, max_pixels: int):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._data: bytes | None = bytes(source)
            self.name = "the video bytes"
        else:
            self._data = None
            self._path = os.fspath(source)
            self.name = f"video file {self._path!r}"
            try:
                mode = os.stat(self._path).st_mode
            except (OSError, ValueError):  # ValueError: a NUL in the path
                raise VideoReadError(f"{self.name} does not exist") from None
            if stat.S_ISDIR(mode):
                raise VideoReadError(f"{self.name} is a directory; pass the frame files as a list")
            if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
                raise VideoReadError(f"{self.name} is not a regular file")
        self.truncated = False
        with self._open() as container:
            stream = self._stream(container)
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise ImageTooLargeError(f"{self.name} has {width}x{height} frames, above the limit of {max_pixels} pixels")
            self._time_base = stream.time_base
            self._pts, self._keyframes = self._index(container, stream)
        self.frame_count = len(self._pts) if self._pts is not None else self._count_by_decoding()
        if self.frame_count == 0:
            raise VideoReadError(f"{self.name} has no video frames")

    # --- sampling -------------------------------------------------------------------------------

    def sample(self, num_frames: int | None = None, fps: float | None = None,
               indices: Sequence[int] | None = None) -> list[int]:
        """Frame indices to decode: uniform (the default, 32 frames), every 1/fps seconds, or explicit."""
        if sum(x is not None for x in (num_frames, fps, indices)) > 1:
            raise UnsupportedInputError("pass at most one of num_frames, fps and indices")
        n = self.frame_count
        if indices is not None:
            picked = list(indices)
            if not picked or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in picked):
                raise UnsupportedInputError("indices must be a non-empty list of integer frame indices")
            bad = [int(i) for i in picked if not 0 <= i < n]
            if bad:
                raise UnsupportedInputError(f"frame indices {bad[:5]} are outside the {n} frames of {self.name}")
            return [int(i) for i in picked]
        if fps is not None:
            return self._sample_fps(fps)
        k = DEFAULT_NUM_FRAMES if num_frames is None else num_frames
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise UnsupportedInputError(f"num_frames must be a positive integer, got {num_frames!r}")
        if n <= k:
            return list(range(n))  # fewer frames than asked: each frame once (linspace would repeat them)
        # The original LLaVA-OneVision sampling: np.linspace(0, N - 1, k, dtype=int).
        return np.linspace(0, n - 1, int(k), dtype=int).tolist()

    def _sample_fps(self, fps) -> list[int]:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not np.isfinite(fps) or fps <= 0:
            raise UnsupportedInputError(f"fps must be a positive number, got {fps!r}")
        if self._pts is None:
            raise UnsupportedInputError(f"{self.name} has no timestamps: sample it with num_frames or indices")
        seconds = [float((p - self._pts[0]) * self._time_base) for p in self._pts]
        steps = int(seconds[-1] * fps) + 1
        # The frame on screen at each sampling time: the last one that started at or before it.
        picked = {bisect.bisect_right(seconds, j / fps + 1e-9) - 1 for j in range(steps)}
        return sorted(picked)

    # --- decoding -------------------------------------------------------------------------------

    def decode(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        """{index: (H, W, 3) uint8} for every index that decodes; broken frames are left out."""
        wanted = sorted(set(indices))
        if self._pts is not None:
            with self._open() as container:
                got = self._decode_seeking(container, self._stream(container), wanted)
            if got:
                return got
        # No timestamps, or seeking found nothing (an unseekable file): decode from the start.
        with self._open() as container:
            return self._decode_sequential(container, self._stream(container), wanted)

    def _decode_seeking(self, container, stream, wanted: list[int]) -> dict[int, np.ndarray]:
        reader = _Reader(container, stream, self, budget=self.frame_count + 64 * len(wanted))
        out: dict[int, np.ndarray] = {}
        for index in wanted:
            try:
                frame = reader.frame_at(self._pts[index])
            except av.FFmpegError:
                reader.frames = None  # a broken packet: skip this frame, seek afresh for the next
                continue
            if frame is None:
                break  # the stream ended: later frames cannot be decoded either
            out[index] = _rgb(frame)
        return out

    def _decode_sequential(self, container, stream, wanted: list[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        pending = set(wanted)
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in pending:
                    out[i] = _rgb(frame)
                    pending.discard(i)
                if not pending or i >= self.frame_count:
                    break
        except av.FFmpegError:
            self.truncated = True  # a broken tail: keep the frames decoded before it
        return out

    # --- opening and indexing -------------------------------------------------------------------

    def _open(self):
        try:
            # "file:" keeps FFmpeg from reading a path as one of its protocols (concat:, http:, pipe:).
            source = io.BytesIO(self._data) if self._data is not None else "file:" + os.path.abspath(self._path)
            return av.open(source, metadata_errors="ignore")
        except av.FFmpegError as e:
            raise VideoReadError(f"{self.name} is not a video PyAV can read: {e}") from e
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise VideoReadError(f"{self.name} could not be opened: {e}") from e

    def _stream(self, container):
        if not container.streams.video:
            raise VideoReadError(f"{self.name} has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoReadError(f"{self.name}: PyAV has no decoder for its video codec")
        stream.thread_type = "AUTO"  # frame and slice threads
        return stream

    def _index(self, container, stream) -> tuple[list[int] | None, list[int]]:
        """Sorted presentation timestamps of all frames and of the keyframes (None: no timestamps)."""
        pts, keyframes = [], []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream flush packet
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None:
                    return None, []
                pts.append(t)
                if packet.is_keyframe:
                    keyframes.append(t)
                if len(pts) > MAX_PACKETS:
                    raise VideoReadError(f"{self.name} has more than {MAX_PACKETS} frames")
        except av.FFmpegError as e:
            if not pts:
                raise VideoReadError(f"{self.name} could not be read: {e}") from e
            self.truncated = True  # a cut or damaged file: index the packets before the damage
        return sorted(pts), sorted(keyframes)

    def _count_by_decoding(self) -> int:
        count = 0
        with self._open() as container:
            try:
                for _ in container.decode(self._stream(container)):
                    count += 1
                    if count > MAX_PACKETS:
                        raise VideoReadError(f"{self.name} has more than {MAX_PACKETS} frames")
            except av.FFmpegError:
                self.truncated = True
        return count


class _Reader:
    """The decoder's forward position in one open container; it seeks only when that saves decoding."""

    def __init__(self, container, stream, video: VideoFile, budget: int):
        self.container, self.stream, self.video, self.budget = container, stream, video, budget
        self.frames = None  # iterator over decoded frames, or None: seek first
        self.position = None  # pts of the last frame taken

    def frame_at(self, target: int):
        """The first frame whose pts is >= target (None when the stream ends before it)."""
        if self.frames is None or self._worth_seeking(target):
            self._seek(target)
        for frame in self.frames:
            self.budget -= 1
            if self.budget < 0:
                raise VideoReadError(f"{self.video.name}: the decoder did not reach the wanted frames")
            if frame.pts is None:
                raise VideoReadError(f"{self.video.name}: decoded frames carry no timestamps")
            if frame.pts >= target:
                self.position = frame.pts
                return frame
        return None

    def _worth_seeking(self, target: int) -> bool:
        """Seek back when already past the target; forward when a keyframe lies on the way to it."""
        if self.position is None or self.position >= target:
            return True
        keys = self.video._keyframes
        k = bisect.bisect_right(keys, target) - 1
        return k >= 0 and keys[k] > self.position

    def _seek(self, target: int) -> None:
        self.container.seek(int(target), stream=self.stream, backward=True, any_frame=False)
        frames = self.container.decode(self.stream)
        first = next(frames, None)
        if first is not None and first.pts is not None and first.pts > target:
            # The seek landed past the frame (an inexact index): decode from the start instead.
            self.container.seek(int(self.video._pts[0]), stream=self.stream, backward=True, any_frame=False)
            frames = self.container.decode(self.stream)
            first = next(frames, None)
        self.frames = frames if first is None else itertools.chain([first], frames)
        self.position = None


def _rgb(frame) -> np.ndarray:
    return np.ascontiguousarray(frame.to_ndarray(format="rgb24"))
