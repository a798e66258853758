"""Writing outputs: sharded safetensors streamed piece by piece, inside folders that appear atomically.

Every output tensor's name, dtype and shape is known from the input headers before any arithmetic
runs, so each shard's header is written first and the data then streams straight to disk: no
shard is ever assembled in memory. The shard plan and file names come from huggingface_hub's
splitter, so outputs look exactly like `save_pretrained`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory

from .checkpoint import TORCH_TO_SAFETENSORS, TensorInfo
from .errors import ResidualsError

DEFAULT_MAX_SHARD_SIZE = "5GB"
HASH_CHUNK = 8 * 1024 * 1024
QUEUED_PIECES = 4


def fsync_enabled() -> bool:
    """Whether outputs are fsync'ed before they are renamed into place (RESIDUALS_FSYNC=1, CLI --fsync).

    Off by default, as with `save_pretrained`: the rename already makes a killed or failed run
    leave nothing that looks complete, and the manifest's sha256 detects a folder damaged by a
    power loss. On a slow disk an fsync costs more than the whole computation.
    """
    return os.environ.get("RESIDUALS_FSYNC", "") not in ("", "0")


class AtomicFolder:
    """Build a folder under a hidden temporary name next to `dest`; rename it into place on success.

    A failure (or a kill) never leaves anything at `dest` that looks complete, and an existing
    `dest` is replaced only after the new folder is whole, and only when `overwrite=True`.
    """

    def __init__(self, dest: str | os.PathLike, *, overwrite: bool = False):
        self.dest = Path(dest).absolute()
        self.overwrite = overwrite
        self.path = self.dest.parent / f".{self.dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> AtomicFolder:
        if self.dest.exists() and not self.dest.is_dir():
            raise ResidualsError(f"{self.dest} exists and is a file.", "Choose another output folder.")
        if self.dest.is_dir() and any(self.dest.iterdir()) and not self.overwrite:
            raise ResidualsError(
                f"The output folder {self.dest} already exists and is not empty.",
                "Choose a new folder, or pass overwrite=True (--overwrite) to replace it once the new one is complete.",
            )
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(self.dest)
        self.path.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        old = None
        if self.dest.exists():
            old = self.dest.parent / f".{self.dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.dest, old)
        if fsync_enabled():
            _fsync_tree(self.path)
        os.rename(self.path, self.dest)
        if fsync_enabled():
            _fsync_path(self.dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and directory below `folder`, deepest first (already-flushed files cost nothing)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync_path(path)
    _fsync_path(folder)


def _remove_stale_partials(dest: Path) -> None:
    """Remove leftovers of earlier runs for the same destination whose process is gone."""
    for leftover in dest.parent.glob(f".{dest.name}.partial-*"):
        try:
            pid = int(leftover.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            continue


class ShardWriter:
    """Stream tensors into `model.safetensors` or `model-0000k-of-0000n.safetensors` + index.

    Call `write(name, piece)` for every tensor of `specs`, in order, with flat pieces whose
    concatenation is the tensor; `close()` checks everything arrived and returns the manifest.
    """

    def __init__(
        self,
        folder: Path,
        specs: list[TensorInfo],
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        split = split_state_dict_into_shards_factory(
            {s.name: s for s in specs},
            get_storage_size=lambda s: s.nbytes,
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
        self.split = split
        self._specs = {s.name: s for s in specs}
        self._queue: list[tuple[str, list[str]]] = [
            (filename, [n for n in (s.name for s in specs) if split.tensor_to_filename[n] == filename])
            for filename in split.filename_to_tensors
        ]
        self.manifest: dict[str, dict[str, Any]] = {}
        self._file = None
        self._hash = None
        self._failure: BaseException | None = None
        self._queue_out: queue.Queue = queue.Queue(maxsize=QUEUED_PIECES)
        self._free: list[torch.Tensor] = []  # piece buffers the background thread has finished with
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> buffer handed out by `buffer()`
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._background, daemon=True)
        self._thread.start()
        self._filename = ""
        self._pending: list[str] = []
        self._remaining = 0  # bytes left of the current tensor

    @property
    def order(self) -> list[str]:
        """The order tensors must be written in (shard by shard, as the splitter grouped them)."""
        return [name for _, names in self._queue for name in names]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self._specs.values())

    def _open_next_file(self) -> None:
        filename, names = self._queue.pop(0)
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for name in names:
            spec = self._specs[name]
            header[name] = {
                "dtype": TORCH_TO_SAFETENSORS[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-(8 + len(encoded)) % 8)  # align the data start to 8 bytes, as safetensors does
        self._file = open(self.folder / filename, "wb")  # noqa: SIM115 (closed in _finish_file/abort)
        self._hash = hashlib.sha256()
        self._filename = filename
        self._pending = list(names)
        self._emit(len(encoded).to_bytes(8, "little") + encoded)

    def buffer(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        """A flat tensor to fill with the next piece; it is recycled once written (no fresh pages per piece)."""
        nbytes = count * dtype.itemsize
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fitting:
                storage = self._free.pop(fitting[0])
            else:
                storage = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self._lent[storage.data_ptr()] = storage
        return storage[:nbytes].view(dtype)

    def _emit(self, data, owner: torch.Tensor | None = None) -> None:
        """Hand bytes to the background thread that writes and hashes them (bounded queue).

        Writing and sha256 overlap the arithmetic of the next piece: hashlib and file writes release
        the GIL. `data` must not be modified afterwards; `owner`, a buffer lent by `buffer()`, goes
        back to the pool once its bytes are written.
        """
        self._check_background()
        self._queue_out.put((self._file, self._hash, data, owner))

    def _background(self) -> None:
        while True:
            item = self._queue_out.get()
            try:
                if item is None:
                    return
                file, digest, data, owner = item
                if self._failure is None:
                    file.write(data)
                    digest.update(data)
                if owner is not None:
                    del data
                    with self._lock:
                        self._free.append(owner)
            except BaseException as exc:  # reported to the caller on its next call
                self._failure = exc
            finally:
                self._queue_out.task_done()

    def _check_background(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _drain(self) -> None:
        self._queue_out.join()
        self._check_background()

    def _finish_file(self) -> None:
        self._drain()
        self._file.flush()
        if fsync_enabled():
            os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        self.manifest[self._filename] = {"sha256": self._hash.hexdigest(), "size": size}
        self._file = None

    def write(self, name: str, piece: torch.Tensor) -> None:
        if self._file is None and self._remaining == 0:
            if not self._queue:
                raise RuntimeError(f"tensor {name!r} written after all shards were complete")
            self._open_next_file()
        if self._remaining == 0:
            expected = self._pending.pop(0)
            if name != expected:
                raise RuntimeError(f"tensors written out of order: got {name!r}, expected {expected!r}")
            self._remaining = self._specs[name].nbytes
        spec = self._specs[name]
        if piece.dtype != spec.dtype:
            raise RuntimeError(f"{name}: piece dtype {piece.dtype} != planned {spec.dtype}")
        owner = self._lent.pop(piece.data_ptr(), None) if piece.numel() else None
        data = piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > self._remaining:
            raise RuntimeError(f"{name}: more data than its shape holds")
        self._emit(memoryview(data), owner)
        self._remaining -= data.nbytes
        if self._remaining == 0 and not self._pending:
            self._finish_file()

    def close(self) -> dict[str, dict[str, Any]]:
        """Check completeness, write the index when sharded, and return {file: {sha256, size}}."""
        # zero-byte tensors still need their header entries: flush any shard made only of them
        while self._pending or self._queue:
            if self._file is None:
                self._open_next_file()
            while self._pending and self._specs[self._pending[0]].nbytes == 0:
                self._pending.pop(0)
            if self._pending:
                raise RuntimeError(f"tensor {self._pending[0]!r} was never written")
            self._finish_file()
        if self.split.is_sharded:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": dict(self.split.tensor_to_filename),
            }
            path = self.folder / "model.safetensors.index.json"
            path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            self.manifest[path.name] = file_digest(path)
        self._stop()
        return self.manifest

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue_out.put(None)
            self._thread.join()

    def abort(self) -> None:
        self._failure = self._failure or RuntimeError("aborted")  # the thread drops what is still queued
        self._stop()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def file_digest(path: Path) -> dict[str, Any]:
    """sha256 and size of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "size": path.stat().st_size}
