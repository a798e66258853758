"""Byte readers behind every checkpoint file: a local file, or a file of a Hub repo read as it streams.

Both give `read_into(offset, view)` and `finish()`, so the engine never knows where bytes come
from. A local file is read with positioned reads into the caller's buffer (no mmap: mapped pages
of a large file count towards resident memory), while a background thread asks the kernel to read
the next LOCAL_READ_AHEAD_BYTES of it into the page cache: an input not yet cached then streams at
the disk's speed instead of one request at a time. A Hub file is read with ranged GETs through
huggingface_hub's HTTP helpers, sequentially, by a background thread that keeps a bounded
read-ahead queue full, resumes where a cut connection stopped, and hashes every byte: `finish()`
compares the sha256 with the one the Hub records for the file (its LFS oid). Nothing of a Hub
file is ever written to disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass

import xxhash

from .errors import ResidualsError

CHUNK_BYTES = 1024 * 1024  # the stream's unit: hashed, queued and (when read again) verified per chunk
RECEIVE_BYTES = 64 * 1024  # what one socket read hands over: a cut loses at most this much
DEFAULT_READ_AHEAD_BYTES = 32 * 1024 * 1024
# Measured on a cold 1B merge here (interleaved runs): 7-11 s with the kernel's own read-ahead alone,
# 3.1-4.2 s asking 64 MB ahead.
LOCAL_READ_AHEAD_BYTES = 64 * 1024 * 1024
ADVICE_STEP_BYTES = 2 * 1024 * 1024
EARLY_PREFETCH_BYTES = 256 * 1024 * 1024  # of each local input, asked for while the engine's imports load
RETRIES = 8  # consecutive failed attempts before a Hub read gives up (progress resets the count)
FIRST_RETRY_WAIT_S = 0.5
MAX_RETRY_WAIT_S = 8.0


class ByteReader:
    """One input file: `size` bytes, read at any offset into a caller's buffer."""

    label: str
    size: int

    def read_into(self, offset: int, view: memoryview) -> None:
        raise NotImplementedError

    def read_bytes(self, offset: int, length: int) -> bytes:
        data = bytearray(length)
        self.read_into(offset, memoryview(data))
        return bytes(data)

    def read_only(self, spans: list[tuple[int, int]]) -> None:
        """Only these [start, stop) byte spans will be read (a share of a split run); a reader that
        fetches ahead (a Hub file) fetches nothing else, a local file needs no telling."""

    def finish(self) -> None:
        """Check what was read (a Hub file: its sha256); called once the work is done, before publishing."""

    def close(self) -> None:
        """Release handles and threads; the reader can be used again afterwards."""


class LocalFile(ByteReader):
    def __init__(self, path: os.PathLike | str):
        self.path = os.fspath(path)
        self.label = self.path
        self.size = os.stat(self.path).st_size
        self._fd: int | None = None
        self._asked = 0  # the kernel was asked to read the file up to here

    def read_into(self, offset: int, view: memoryview) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        if offset + len(view) > self._asked - LOCAL_READ_AHEAD_BYTES // 2:
            start = max(self._asked, offset)
            self._asked = start + LOCAL_READ_AHEAD_BYTES
            _ask_kernel(self.path, start, LOCAL_READ_AHEAD_BYTES)
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise ResidualsError(
                    f"{self.path} ended early (at byte {offset + done} of the {self.size} its header describes).",
                    "The file is truncated: download or copy it again.",
                )
            done += got

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_requests: queue.SimpleQueue = queue.SimpleQueue()
_asker: threading.Thread | None = None
_asker_lock = threading.Lock()


def _ask_kernel(path: str, offset: int, length: int) -> None:
    """Queue a read-ahead request for the background thread: posix_fadvise(WILLNEED) can block while it
    submits the reads, and the engine must not wait for that."""
    global _asker
    if not hasattr(os, "posix_fadvise"):
        return
    _requests.put((path, offset, length))
    with _asker_lock:
        if _asker is None:
            _asker = threading.Thread(target=_serve_requests, daemon=True, name="read-ahead")
            _asker.start()


def _serve_requests() -> None:
    while True:
        path, offset, length = _requests.get()
        try:  # by path: the page cache is the file's, whichever descriptor asks
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:  # the kernel reads at most its read-ahead size (a few MB) per call: ask in steps
            for start in range(offset, offset + length, ADVICE_STEP_BYTES):
                os.posix_fadvise(fd, start, ADVICE_STEP_BYTES, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def prefetch_local_inputs(
    folders: list[str | os.PathLike | None], length: int = EARLY_PREFETCH_BYTES
) -> None:
    """Ask for the head of each local input folder's first weight file: the command line calls this
    before it imports the engine and plans, while the disk would idle otherwise."""
    for folder in folders:
        try:
            first = min(
                (f for f in os.scandir(folder) if f.name.endswith(".safetensors")), key=lambda f: f.name
            )
        except (OSError, TypeError, ValueError):  # not a local folder (a Hub id, demo:…), or no weights
            continue
        _ask_kernel(first.path, 0, length)


@dataclass(frozen=True)
class HubLocation:
    """Where a Hub file lives, pinned to one commit, and what the Hub says its bytes are."""

    repo_id: str
    commit: str
    filename: str
    size: int
    sha256: str | None  # the LFS oid; None for a file the Hub stores in git (small files only)
    token: str | bool | None = None


class HubFile(ByteReader):
    """A Hub file read in file order with read-ahead, retried and resumed, its sha256 checked.

    Reads at or after the stream's position are served from the stream (bytes skipped on the way
    are still hashed); reads behind it, which only happen when inputs order their tensors
    differently, are fetched again by range and checked against the per-chunk digests the stream
    recorded, so every byte the engine uses is verified.

    `read_only(spans)` narrows the stream to those byte spans (a run split over several Jobs reads
    only its share of each file): each span is one ranged GET, nothing outside them is fetched, and
    the file's sha256 cannot be checked, since no job reads it whole.
    """

    def __init__(self, location: HubLocation, *, read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES):
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        self.location = location
        self.label = f"{location.repo_id}/{location.filename}"
        self.size = location.size
        self.url = hf_hub_url(location.repo_id, location.filename, revision=location.commit)
        self._headers = build_hf_headers(token=location.token)
        self._read_ahead_chunks = max(2, read_ahead_bytes // CHUNK_BYTES)
        self._spans: list[tuple[int, int]] | None = None  # None: the whole file, hashed
        self._stream: _Stream | None = None
        self._held: tuple[int, bytes] | None = None  # (offset, bytes) last taken from the stream
        self._recent: tuple[int, bytes] | None = None  # (offset, bytes) last fetched again by range

    def read_only(self, spans: list[tuple[int, int]]) -> None:
        """Stream only these [start, stop) byte spans (sorted, adjacent ones joined); before any read."""
        joined: list[list[int]] = []
        for start, stop in sorted(spans):
            if stop <= start:
                continue
            if joined and start <= joined[-1][1]:
                joined[-1][1] = max(joined[-1][1], stop)
            else:
                joined.append([start, stop])
        self.close()
        self._spans = [(a, b) for a, b in joined]

    # ---- reading -------------------------------------------------------------------------------
    def read_into(self, offset: int, view: memoryview) -> None:
        if offset + len(view) > self.size:
            raise ResidualsError(
                f"{self.label}: a read past its end (byte {offset + len(view)} of {self.size}).",
                "The file's header does not match the file: it is corrupt on the Hub.",
            )
        done = 0
        while done < len(view):
            position = offset + done
            start, chunk = self._piece_at(position)
            at = position - start
            count = min(len(view) - done, len(chunk) - at)
            view[done : done + count] = chunk[at : at + count]
            done += count

    def read_range(self, offset: int, length: int) -> bytes:
        """One ranged GET outside the stream (headers before any work): not hashed, nothing kept."""
        from huggingface_hub.utils import hf_raise_for_status, http_backoff

        end = min(offset + length, self.size) - 1
        try:
            with _hub_read_errors(self.label):
                response = http_backoff(
                    "GET", self.url, headers={**self._headers, "Range": f"bytes={offset}-{end}"}, timeout=60
                )
                hf_raise_for_status(response)
        except _RetryableRead as exc:
            if exc.rate_limit is not None:
                from .hub import rate_limited_error

                raise rate_limited_error(f"reads of {self.label}", exc.rate_limit[1]) from exc
            raise ResidualsError(
                f"The Hub kept failing to send {self.label} ({exc}).", "Try again later."
            ) from exc
        data = response.content
        if len(data) != end - offset + 1:
            raise ResidualsError(
                f"{self.label}: the Hub sent {len(data)} bytes for a {end - offset + 1}-byte range.",
                "Try again later; if it persists the file on the Hub is damaged.",
            )
        return data

    def _piece_at(self, position: int) -> tuple[int, bytes]:
        """(offset, bytes) of a piece holding `position`: held, from the stream, or fetched again."""
        for piece in (self._held, self._recent):
            if piece is not None and piece[0] <= position < piece[0] + len(piece[1]):
                return piece
        if self._stream is None:
            self._stream = _Stream(self, self._read_ahead_chunks, self._spans)
        if position >= self._stream.position:  # ahead of the stream: take pieces up to it
            while self._stream.position <= position:
                piece = self._stream.take()
                self._held = piece
                if piece[0] <= position < piece[0] + len(piece[1]):
                    return piece
                if piece[0] > position:
                    break  # outside the spans: fetched by range below
        return self._fetch_again(position)

    def _fetch_again(self, position: int) -> tuple[int, bytes]:
        """Bytes the stream already passed (or never holds): fetched by range; in a whole-file stream
        checked against the digest it recorded for that chunk."""
        index = position // CHUNK_BYTES
        start = index * CHUNK_BYTES
        data = self.read_range(start, min(CHUNK_BYTES, self.size - start))
        if self._spans is None and xxhash.xxh3_64_intdigest(data) != self._stream.chunk_digests[index]:
            raise ResidualsError(
                f"{self.label}: bytes {start}–{start + len(data)} differ from the first time they were read.",
                "The Hub served inconsistent data; try again later.",
            )
        self._recent = (start, data)
        return self._recent

    # ---- checking and closing ----------------------------------------------------------------------
    def verify(self) -> None:
        """Stream the whole file once and check its sha256 now, before any of it is used.

        For readers that jump around (a model instance updated tensor by tensor): later reads are
        then fetched by range and checked against the verified stream's chunk digests.
        """
        self._spans = None
        if self._stream is None:
            self._stream = _Stream(self, self._read_ahead_chunks, None)
        self.finish()

    def finish(self) -> None:
        if self._stream is None:
            return  # nothing of this file was used
        if self._spans is not None:
            self._stream.check()  # a share of the file: no sha256 to check it against
            return
        digest = self._stream.drain()
        expected = self.location.sha256
        if expected is not None and digest != expected:
            raise ResidualsError(
                f"{self.label}: its bytes have sha256 {digest[:16]}…, the Hub records {expected[:16]}… for it — "
                "the download was corrupted or the file was altered.",
                "Nothing was written. Run again; if it persists, the file on the Hub is damaged.",
            )

    def close(self) -> None:
        if self._stream is not None:
            self._stream.stop()
        self._stream = None
        self._held = self._recent = None


class _Stream:
    """A background thread reading one Hub file into a bounded queue of (offset, bytes) pieces:
    the whole file from byte 0 (hashed: sha256 of the file, xxh3 per chunk), or only some spans,
    one ranged GET each. Hashing overlaps the engine's arithmetic. A cut connection, a timeout or
    a 5xx is retried with exponential backoff from the byte where it stopped.
    """

    def __init__(self, file: HubFile, depth: int, spans: list[tuple[int, int]] | None):
        self.file = file
        self.spans = [(0, file.size)] if spans is None else spans
        self.hashing = spans is None
        self.chunk_digests: list[int] = []
        self.position = self.spans[0][0] if self.spans else file.size  # end of the pieces taken
        self._sha256 = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"hub-read {file.label}", daemon=True)
        self._thread.start()

    def take(self) -> tuple[int, bytes]:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise self._failure or RuntimeError(
                        f"{self.file.label}: the read stream ended early"
                    ) from None
                continue
            if item is None:
                raise self._failure or RuntimeError(f"{self.file.label}: read past the end of the stream")
            self.position = item[0] + len(item[1])
            return item

    def drain(self) -> str:
        """Read what is left to the end of the file (usually nothing); the file's sha256."""
        while self.position < self.file.size:
            self.take()
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self._sha256.hexdigest()

    def check(self) -> None:
        """Stop the stream; raise what made it fail, if anything did."""
        self.stop()
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        self._thread.join()

    def _put(self, item: tuple[int, bytes] | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _emit(self, offset: int, chunk: bytes) -> bool:
        if self.hashing:
            self._sha256.update(chunk)
            self.chunk_digests.append(xxhash.xxh3_64_intdigest(chunk))
        return self._put((offset, chunk))

    def _run(self) -> None:
        try:
            for start, stop in self.spans:
                if not self._read_span(start, stop):
                    return
            self._put(None)
        except BaseException as exc:
            self._failure = exc
            self._put(None)

    def _read_span(self, span_start: int, span_stop: int) -> bool:
        """Bytes [span_start, span_stop) as pieces of CHUNK_BYTES; False when stopped."""
        from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff, httpx

        file = self.file
        position = span_start  # bytes emitted as whole pieces
        pending = bytearray()  # bytes of the current, incomplete piece
        failures, wait = 0, FIRST_RETRY_WAIT_S
        while position + len(pending) < span_stop:
            start = position + len(pending)
            headers = {**file._headers, "Range": f"bytes={start}-{span_stop - 1}"}
            try:
                with (
                    _hub_read_errors(file.label),
                    http_stream_backoff("GET", file.url, headers=headers, timeout=60) as response,
                ):
                    hf_raise_for_status(response)
                    if response.status_code != 206 and start > 0:
                        raise ResidualsError(
                            f"{file.label}: the Hub ignored a ranged read.", "Try again later."
                        )
                    # a cut inside the body is handled here, not thrown into the backoff helper (which
                    # retries only until the response starts): resume from the byte it stopped at
                    cut: Exception | None = None
                    try:
                        for data in response.iter_bytes(RECEIVE_BYTES):
                            pending += data
                            while len(pending) >= CHUNK_BYTES:
                                if not self._emit(position, bytes(pending[:CHUNK_BYTES])):
                                    return False
                                del pending[:CHUNK_BYTES]
                                position += CHUNK_BYTES
                            if self._stop.is_set():
                                return False
                            failures, wait = 0, FIRST_RETRY_WAIT_S  # progress: a later cut starts over
                    except httpx.TransportError as exc:
                        cut = exc
                if cut is not None:
                    raise cut
            except (httpx.TransportError, _RetryableRead) as exc:
                failures += 1
                limited = getattr(exc, "rate_limit", None)
                if failures >= RETRIES:
                    if limited is not None:
                        from .hub import rate_limited_error

                        where = f"reads of {file.label} at byte {position + len(pending)} of {file.size}"
                        raise rate_limited_error(f"{where}, after {failures} waits", limited[1]) from exc
                    raise ResidualsError(
                        f"Reading {file.label} failed at byte {position + len(pending)} of {file.size} "
                        f"after {failures} attempts ({type(exc).__name__}: {exc}).",
                        "Check the network connection and run again.",
                    ) from exc
                if limited is not None:  # wait as long as the Hub says, and say so
                    from .hub import wait_out

                    wait_out(limited, failures, RETRIES)
                else:
                    time.sleep(wait)
                    wait = min(MAX_RETRY_WAIT_S, wait * 2)
            if position + len(pending) > span_stop:
                raise ResidualsError(
                    f"{file.label}: the Hub sent more bytes than the file's size ({file.size}).",
                    "Try again later.",
                )
        return not pending or self._emit(position, bytes(pending))


class _RetryableRead(Exception):
    """A Hub answer worth retrying that huggingface_hub already gave up on (a 5xx or a 429 after its own
    retries); `rate_limit` is (seconds to wait, which limit) for a 429."""

    def __init__(self, message: str, rate_limit: tuple[float, str] | None = None):
        super().__init__(message)
        self.rate_limit = rate_limit


class _hub_read_errors:
    """Hub errors during a read: 5xx become retryable, the rest a clear ResidualsError naming the file."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, ResidualsError):
            return False
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(exc, HfHubHTTPError):
            from huggingface_hub.errors import GatedRepoError

            from .hub import hub_refusal, rate_limit_wait

            if isinstance(exc, GatedRepoError):
                raise hub_refusal(exc, self.label) from exc

            status = exc.response.status_code if exc.response is not None else None
            if status == 429:
                raise _RetryableRead("HTTP 429 Too Many Requests", rate_limit_wait(exc.response)) from exc
            if status is not None and status >= 500:
                raise _RetryableRead(f"HTTP {status}") from exc
            raise ResidualsError(
                f"The Hub refused to send {self.label} (HTTP {status}).",
                "Check the id and that your token can read the repo.",
            ) from exc
        return False
