"""`residuals_manifest.json`: every file of a result with its checksums and size, plus what was measured.

Written last into a result folder (or the commit of a Hub result); checked when a residuals
folder is read back: sizes at once, checksums in a background thread that `apply` waits for
before publishing, so a corrupted input still yields no output. For residuals read from the Hub
the weight files are not on disk: the Hub's own sha256 of each (its LFS oid) must equal the
manifest's, and the bytes are checked against it as they stream.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checksums import check_early, file_digest, matches_manifest
from .errors import ResidualsError

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

MANIFEST_NAME = "residuals_manifest.json"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none; a malformed one is refused, named."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    from .checkpoint import read_json

    manifest = read_json(path)
    files = manifest.get("files", {})
    good = isinstance(files, dict) and all(
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and any(isinstance(entry.get(kind), str) for kind in ("sha256", "xxh3_64"))
        for entry in files.values()
    )
    if not good:
        raise ResidualsError(
            f"{path} is malformed: 'files' must map each file to its size and sha256/xxh3_64.",
            "The folder was damaged or edited by hand: copy or download it again (or delete the manifest "
            "to use the files unchecked).",
        )
    return manifest


def check_files_early(folder: str | Path) -> None:
    """Start checking a local residuals folder's files against its manifest before the engine needs it
    (the command line does before the engine loads); `ManifestCheck` then takes the result."""
    check_early(folder, MANIFEST_NAME)


def write_manifest(
    folder: Path, weights: dict[str, dict[str, Any]], extra_files: list[str], sidecar: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Hash the non-weight files too and write the manifest; return {file: {sha256, xxh3_64, size}}."""
    files = dict(weights)
    for name in extra_files:
        files[name] = file_digest(folder / name)
    (folder / MANIFEST_NAME).write_text(
        json.dumps({"files": files, **sidecar}, indent=2) + "\n", encoding="utf-8"
    )
    return files


class ManifestCheck:
    """Check a checkpoint's files against its manifest: sizes at once, checksums in a background thread.

    Reading and hashing a 16 GB residual takes seconds; `apply` starts the check, streams meanwhile (both
    read the same cached pages), and calls `wait()` before its output is published.
    """

    def __init__(self, checkpoint: Checkpoint, manifest: dict[str, Any] | None):
        self.folder = checkpoint.folder
        self.label = checkpoint.label
        self._problem: ResidualsError | None = None
        entries = (manifest or {}).get("files", {})  # no manifest: another tool wrote it, nothing to check
        local: dict[str, dict[str, Any]] = {}
        for name, entry in entries.items():
            reader = checkpoint.readers.get(name) if checkpoint.remote else None
            if reader is not None:  # a weight file on the Hub: its recorded sha256 must be the Hub's
                expected, recorded = entry.get("sha256"), reader.location.sha256
                if recorded is not None and expected is not None and recorded != expected:
                    raise ResidualsError(
                        f"{self.label}: {name} on the Hub is not the file its {MANIFEST_NAME} records "
                        f"(sha256 {recorded[:12]}… vs {expected[:12]}…) — it was altered or replaced.",
                        "Push the residuals again, or use the folder they were computed into.",
                    )
                continue
            path = self.folder / name
            if not path.is_file():
                raise ResidualsError(
                    f"{self.label}: {name} is missing (it is listed in {MANIFEST_NAME}).",
                    "The folder is incomplete: copy or download it again.",
                )
            if path.stat().st_size != entry["size"]:
                raise ResidualsError(
                    f"{self.label}: {name} has {path.stat().st_size} bytes, {entry['size']} were written — truncated or altered.",
                    "Copy or download the folder again.",
                )
            local[name] = entry
        self._thread = threading.Thread(target=self._hash_all, args=(local,), daemon=True)
        self._thread.start()

    def _hash_all(self, entries: dict[str, dict[str, Any]]) -> None:
        try:
            for name, entry in entries.items():
                if not matches_manifest(self.folder / name, entry):
                    self._problem = ResidualsError(
                        f"{self.label}: {name} does not match its recorded checksum — the file was altered or corrupted.",
                        "Copy or download the folder again; do not edit weight files by hand.",
                    )
                    return
        except OSError as exc:
            self._problem = ResidualsError(
                f"{self.label}: could not read {exc.filename}: {exc.strerror}.",
                "Check the folder and try again.",
            )

    def wait(self) -> None:
        self._thread.join()
        if self._problem is not None:
            raise self._problem
