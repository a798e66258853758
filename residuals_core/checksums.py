"""Checksums of files: running digests while writing, whole-file digests, and checks started early.

Light on purpose: the command line starts checking a residuals folder against its manifest before
the engine's modules are even imported, on the otherwise idle second core, and the engine's check
then takes that result instead of reading the files again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import xxhash

HASH_CHUNK = 8 * 1024 * 1024
CHECKSUMS = {"sha256": hashlib.sha256, "xxh3_64": xxhash.xxh3_64}  # what every manifest entry records

# (path, device, inode, size, mtime) -> its digests, for checks started before they were asked for
_early: dict[tuple, Future] = {}
_early_lock = threading.Lock()


class Checksums:
    """Running digests of one file's bytes, of the kinds asked for (all of CHECKSUMS by default)."""

    def __init__(self, kinds: tuple[str, ...] = tuple(CHECKSUMS)):
        self._digests = {kind: CHECKSUMS[kind]() for kind in kinds}

    def update(self, data) -> None:
        for digest in self._digests.values():
            digest.update(data)

    def hexdigests(self) -> dict[str, str]:
        return {kind: digest.hexdigest() for kind, digest in self._digests.items()}


def read_checksums(path: Path, checksums: Checksums) -> dict[str, str]:
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            checksums.update(chunk)
    return checksums.hexdigests()


def file_digest(path: Path) -> dict[str, Any]:
    """A manifest entry: sha256 (what the Hub and the model card show), xxh3_64 and size.

    xxh3_64 is what `matches_manifest` checks when it is there: it detects a corrupted or
    altered file as surely for this purpose (the manifest sits beside the file, so neither
    stops a deliberate forger) at memory speed, where sha256 costs ~0.6 s per GB.
    """
    return {**read_checksums(path, Checksums()), "size": path.stat().st_size}


def _checked_kind(entry: dict[str, Any]) -> str:
    return "xxh3_64" if "xxh3_64" in entry else "sha256"


def _identity(path: Path) -> tuple:
    """The file as it is now: a file replaced or rewritten since a check began is a different one."""
    stat = os.stat(path)
    return (str(Path(path).resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def matches_manifest(path: Path, entry: dict[str, Any]) -> bool:
    """Whether a file has the checksum its manifest entry records (xxh3_64, or sha256 in older manifests).

    A check of this very file (same inode, size and modification time) started by `check_early` is
    waited for instead of reading the file again.
    """
    kind = _checked_kind(entry)
    with _early_lock:
        started = _early.pop(_identity(path), None)
    if started is not None:
        digests = started.result()
        if digests is not None and kind in digests:
            return digests[kind] == entry[kind]
    return read_checksums(path, Checksums((kind,)))[kind] == entry[kind]


def check_early(folder: str | os.PathLike, manifest_name: str) -> None:
    """Start hashing the files a local folder's manifest lists, in a background thread, as the engine's
    manifest check will; anything odd (no folder, no manifest, bad JSON) is left to that check."""
    try:
        files = json.loads((Path(folder) / manifest_name).read_text(encoding="utf-8"))["files"]
        todo = [
            (Path(folder) / name, _checked_kind(entry))
            for name, entry in files.items()
            if isinstance(entry, dict) and (Path(folder) / name).is_file()
        ]
        started = [(path, kind, _identity(path), Future()) for path, kind in todo]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    with _early_lock:
        for _, _, identity, future in started:
            _early[identity] = future

    def hash_all() -> None:
        for path, kind, _, future in started:
            try:
                future.set_result(read_checksums(path, Checksums((kind,))))
            except OSError:
                future.set_result(None)  # the engine's check reads it again and names the problem

    threading.Thread(target=hash_all, daemon=True, name="early-checksums").start()
