"""studio.session on its own: who owns a folder, when a session ends, what the sweep removes."""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path

import pytest

from residuals_core.errors import Cancelled
from studio.session import RUNNING, SessionClosed, SessionRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(tmp_path):
    clock = Clock()
    sessions = SessionRegistry(tmp_path / "work", tmp_path / "downloads", idle_seconds=60, clock=clock)
    sessions.clock_ = clock
    return sessions


def files_under(*roots: Path) -> list[Path]:
    return sorted(p for root in roots if root.exists() for p in root.rglob("*"))


def test_one_folder_pair_per_session_named_without_the_session_hash(registry):
    first = registry.session("hash-one")
    again = registry.session("hash-one")
    other = registry.session("hash-two")
    assert first is again and first.folder != other.folder
    assert first.folder.parent == registry.root and first.downloads.parent == registry.downloads_root
    assert "hash-one" not in str(first.folder) and "hash-one" not in str(first.downloads)


def test_an_ended_session_refuses_its_calls_and_leaves_nothing(registry):
    session = registry.session("tab")
    (session.folder / "residuals").mkdir()
    (session.downloads / "residuals-1.zip").write_text("zip")
    closed = []
    registry.on_close(closed.append)
    registry.close("tab")
    assert closed == ["tab"] and files_under(registry.root, registry.downloads_root) == []
    with pytest.raises(SessionClosed, match=r"session has ended.*Reload the page"):
        registry.check_open("tab")  # a call that waited in the queue while the tab closed
    with pytest.raises(SessionClosed):
        registry.session("tab")


def test_a_running_job_is_cancelled_and_its_session_removed_when_it_stops(registry):
    session = registry.session("tab")
    with session.job("busy") as cache:
        cache.mkdir()
        registry.close("tab")
        assert session.folder.is_dir()  # the job still runs: its files stay until it stops …
        with pytest.raises(Cancelled):
            session.raise_if_cancelled()  # … which it does at its next tensor
    registry.job_ended("tab")
    assert not session.folder.exists() and not session.downloads.exists()


def test_one_job_per_session(registry):
    session = registry.session("tab")
    with session.job("busy"):
        assert (session.folder / RUNNING).exists()
        with pytest.raises(Exception, match="busy"), session.job("busy"):
            pass
    assert not (session.folder / RUNNING).exists()
    assert not session.cancel()  # nothing to cancel now


def test_the_sweep_ends_idle_sessions_but_not_running_ones(registry):
    idle = registry.session("idle")
    busy = registry.session("busy")
    fresh = registry.session("fresh")
    (busy.folder / RUNNING).touch()
    registry.clock_.now += 61
    registry.session("fresh")  # used just now
    removed = registry.sweep()
    assert idle.folder in removed and not idle.folder.exists()
    assert busy.folder.exists() and fresh.folder.exists()
    with pytest.raises(SessionClosed):
        registry.check_open("idle")


def test_the_sweep_removes_what_no_live_session_owns(registry):
    live = registry.session("live")
    stray_folder = registry.root / "left-by-a-crash"
    stray_folder.mkdir()
    (stray_folder / "model.safetensors").write_bytes(b"x" * 100)
    stray_zip = registry.downloads_root / "orphan.zip"
    stray_zip.write_text("zip")
    young = registry.root / "being-made-by-another-process"
    young.mkdir()
    old = time.time() - 3600
    for path in (stray_folder, stray_folder / "model.safetensors", stray_zip):
        os.utime(path, (old, old))
    removed = registry.sweep()
    assert set(removed) == {stray_folder, stray_zip}
    assert live.folder.exists() and live.downloads.exists() and young.exists()


def test_a_new_zip_does_not_overwrite_the_one_being_downloaded(registry, tmp_path):
    session = registry.session("tab")
    result = tmp_path / "result"
    result.mkdir()
    (result / "weights.bin").write_bytes(os.urandom(200_000))
    first = session.zip(result, "residuals")
    with open(first, "rb") as download:  # a download still reading the first zip
        head = download.read(1000)
        (result / "weights.bin").write_bytes(os.urandom(300_000))
        second = session.zip(result, "residuals")
        assert second != first and not first.exists()  # the page links to the new one only
        data = head + download.read()
    with open(tmp_path / "got.zip", "wb") as f:
        f.write(data)
    with zipfile.ZipFile(tmp_path / "got.zip") as zipped:
        assert zipped.testzip() is None and zipped.getinfo("weights.bin").file_size == 200_000
