"""A visitor's session on a shared Space: its folders, its one running job, its Cancel, its zips.

Folders belong to one registry keyed by the session (Gradio's session hash), not to the page's
state: whatever a client does to its state, every folder made for a session is known here and
goes when the session does — when its tab closes, when it has been idle too long, or, for a
folder no live session owns (a crash, a restart), at the next sweep. A closed session's running
job is cancelled, and its calls still waiting in the queue are refused when their turn comes.

Nothing here imports Gradio: the app passes the folders' roots and calls in with session keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from residuals_core.errors import Cancelled, ResidualsError

RUNNING, CANCEL = ".job-running", ".job-cancel"  # marker files: they work across processes (ZeroGPU)


class SessionClosed(ResidualsError):
    """A call of a session that has ended (its tab closed, or it was idle too long)."""


@dataclass
class Session:
    """One visitor's working folder (results, a job's Hub cache) and downloads folder (zips)."""

    key: str
    folder: Path
    downloads: Path
    last_seen: float
    zips: dict[str, Path] = field(default_factory=dict)  # kind -> the zip the page links to now

    @property
    def running(self) -> bool:
        return (self.folder / RUNNING).exists()

    def output(self, kind: str) -> Path:
        """Where a job writes its result; the session's previous result stays until the new one is whole."""
        path = self.folder / f"{kind}.new"
        shutil.rmtree(path, ignore_errors=True)  # a crashed job's leftover, never a result
        return path

    def keep(self, kind: str, written: Path) -> Path:
        """The new result replaces the session's previous one of its kind."""
        final = self.folder / kind
        shutil.rmtree(final, ignore_errors=True)
        os.rename(written, final)
        return final

    def zip(self, folder: Path, kind: str) -> Path:
        """The result as a zip under a name of its own: a download of the previous zip that is still
        running keeps reading its file (unlinked, not overwritten) and is not cut."""
        archive = Path(
            shutil.make_archive(
                str(self.downloads / f"{kind}-{secrets.token_hex(4)}"), "zip", root_dir=folder
            )
        )
        previous = self.zips.get(kind)
        self.zips[kind] = archive
        if previous is not None:
            previous.unlink(missing_ok=True)
        return archive

    @contextlib.contextmanager
    def job(self, busy_message: str) -> Iterator[Path]:
        """The session's one job slot; yields the job's own Hub cache folder, removed after it."""
        try:
            os.close(os.open(self.folder / RUNNING, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise ResidualsError(busy_message, "Wait for it to finish, or press Cancel.") from None
        (self.folder / CANCEL).unlink(missing_ok=True)
        cache = self.folder / "hub-cache"
        try:
            yield cache
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            (self.folder / CANCEL).unlink(missing_ok=True)
            (self.folder / RUNNING).unlink(missing_ok=True)

    def raise_if_cancelled(self) -> None:
        """Called between tensors: Cancel, or the session's end, stops the job there."""
        if (self.folder / CANCEL).exists() or not self.folder.is_dir():
            raise Cancelled(
                "The job was cancelled.", "Nothing it wrote was kept; run it again when you want."
            )

    def cancel(self) -> bool:
        """Ask the running job to stop at its next tensor; False when none runs."""
        if not self.running:
            return False
        (self.folder / CANCEL).touch()
        return True


class SessionRegistry:
    """Every session's folders, under two roots this registry alone writes into."""

    def __init__(
        self,
        root: Path,
        downloads_root: Path,
        *,
        idle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.root, self.downloads_root = Path(root), Path(downloads_root)
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._closed: dict[str, float] = {}  # key -> when it ended; forgotten a day later
        self._secret = secrets.token_bytes(16)  # folder names: one per session, in any process of this app
        self._lock = threading.Lock()
        self._on_close: list[Callable[[str], None]] = []

    def on_close(self, callback: Callable[[str], None]) -> None:
        """`callback(key)` when a session ends (e.g. to free the models it loaded)."""
        self._on_close.append(callback)

    def session(self, key: str) -> Session:
        """The session's folders, made on its first call; refused once the session has ended."""
        self.check_open(key)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                # not the session hash itself: a download link someone shares must not reveal it
                name = hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()[:20]
                session = Session(key, self.root / name, self.downloads_root / name, self.clock())
                self._sessions[key] = session
            session.folder.mkdir(parents=True, exist_ok=True)
            session.downloads.mkdir(parents=True, exist_ok=True)
            session.last_seen = self.clock()
            return session

    def find(self, key: str) -> Session | None:
        """The session's folders if it has any, without making or touching them."""
        with self._lock:
            return self._sessions.get(key)

    def check_open(self, key: str) -> None:
        """Refuse a call of an ended session (a call that waited in the queue while its tab closed)."""
        with self._lock:
            if key in self._closed:
                raise SessionClosed(
                    "This page's session has ended (its tab was closed, it lost its connection, or it was "
                    "idle too long), so its results and any job it had were removed.",
                    "Reload the page to start a new session.",
                )
            if key in self._sessions:
                self._sessions[key].last_seen = self.clock()

    def close(self, key: str) -> list[Path]:
        """The session ended: its job is cancelled, its calls refused, its folders removed (now, or
        when its job has stopped, so the job ends on its Cancel rather than on missing files)."""
        with self._lock:
            self._closed[key] = self.clock()
            session = self._sessions.get(key)
        removed = self._remove(session) if session is not None and not session.cancel() else []
        for callback in self._on_close:
            callback(key)
        return removed

    def job_ended(self, key: str) -> None:
        """After a job: a session that ended while it ran is removed now."""
        with self._lock:
            session = self._sessions.get(key) if key in self._closed else None
        if session is not None and not session.running:
            self._remove(session)

    def sweep(self) -> list[Path]:
        """Close sessions idle longer than `idle_seconds` (none with a running job), remove ended
        sessions' folders, and any folder under the roots that no live session owns and nothing has
        touched for `idle_seconds` (a crash's or another process's leftover); returns what went."""
        now = self.clock()
        with self._lock:
            self._closed = {k: t for k, t in self._closed.items() if now - t < 86400}
            idle = [
                k
                for k, s in self._sessions.items()
                if k not in self._closed and now - s.last_seen > self.idle_seconds and not s.running
            ]
        removed = [path for key in idle for path in self.close(key)]
        with self._lock:
            ended = [s for k, s in self._sessions.items() if k in self._closed and not s.running]
        for session in ended:
            removed += self._remove(session)
        entries = [e for root in (self.root, self.downloads_root) if root.is_dir() for e in root.iterdir()]
        with self._lock:  # listed first: a session made after the listing is not in it
            owned = {p for s in self._sessions.values() for p in (s.folder, s.downloads)}
        wall = time.time()
        for entry in entries:
            if entry not in owned and wall - _last_change(entry) > self.idle_seconds:
                _remove_path(entry)
                removed.append(entry)
        return removed

    def start_sweeping(self, every_seconds: float) -> threading.Thread:
        """A daemon thread that sweeps every `every_seconds` for as long as the app runs."""

        def loop() -> None:
            while True:
                time.sleep(every_seconds)
                with contextlib.suppress(OSError):
                    self.sweep()

        thread = threading.Thread(target=loop, name="studio-session-sweep", daemon=True)
        thread.start()
        return thread

    def _remove(self, session: Session) -> list[Path]:
        with self._lock:
            if self._sessions.get(session.key) is session:
                del self._sessions[session.key]
        for path in (session.folder, session.downloads):
            _remove_path(path)
        return [session.folder, session.downloads]


def _last_change(path: Path) -> float:
    """When anything directly in `path` last changed (a job writing into it keeps it fresh)."""
    try:
        times = [path.lstat().st_mtime]
        if path.is_dir() and not path.is_symlink():
            times += [child.lstat().st_mtime for child in path.iterdir()]
        return max(times)
    except OSError:
        return 0.0


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
