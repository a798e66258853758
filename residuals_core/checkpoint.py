"""The index of a checkpoint: which file holds which tensor, from headers alone, local or on the Hub.

One rule decides which files hold the weights (`select_weight_files`: the index's `weight_map`,
else `model.safetensors`, else every `*.safetensors`), for a folder and for a Hub repo alike.
Headers are parsed and validated by one function (`parse_header`) whichever reader fetched them,
so compatibility checks run in seconds before any weight is read. A `Checkpoint` then reads flat
element ranges of any tensor through its files' byte readers (`sources`); `StateDictSource`
gives an in-memory state dict the same interface, so one engine serves files and instances.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dtypes import BY_CODE, DType, dtype_from_name, from_torch
from .errors import ResidualsError
from .sources import DEFAULT_READ_AHEAD_BYTES, ByteReader, HubFile, HubLocation, LocalFile

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADER_PROBE_BYTES = 256 * 1024  # one ranged read usually holds a Hub file's whole header


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is; `file` (a file name of its checkpoint) is None in memory."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: str | None = None
    offset: int = 0  # absolute byte offset of the data in `file`

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# ---- the one rule for weight files ---------------------------------------------------------------------
def select_weight_files(
    listing: list[str], read_index: Callable[[], dict], label: str, *, allow_pickle: bool = False
) -> list[str]:
    """The files a loader reads: the index's `weight_map` shards, else model.safetensors, else all.

    `listing` holds the top-level file names (of a folder or a Hub repo); `read_index` returns
    the parsed index when there is one. The index is data, not instructions: its entries must
    be plain file names of this checkpoint, and pickles load only with `allow_pickle`.
    """
    names = set(listing)
    if INDEX_NAME in names:
        shards = sorted(set(index_weight_map(read_index(), label).values()))
        for shard in shards:
            if not shard.endswith(".safetensors") and not allow_pickle:
                raise ResidualsError(
                    f"{label}: {INDEX_NAME} names {shard!r} as a shard, which is not a .safetensors file.",
                    "Loading a pickle can run arbitrary code. Convert the checkpoint to safetensors, or pass "
                    "allow_pickle=True (--allow-pickle) if you trust its source.",
                )
        missing = [s for s in shards if s not in names]
        if missing:
            raise ResidualsError(
                f"{label}: shard(s) {missing[:3]} listed in {INDEX_NAME} are missing.",
                "Download or copy the whole checkpoint again.",
            )
        return shards
    if "model.safetensors" in names:
        return ["model.safetensors"]
    found = sorted(n for n in names if n.endswith(".safetensors") and not n.startswith("."))
    if found:
        return found
    pickles = sorted(
        n for n in names if n.endswith(PICKLE_SUFFIXES) and "optimizer" not in n and "training_args" not in n
    )
    if pickles and allow_pickle:
        return pickles
    if pickles:
        raise ResidualsError(
            f"{label} holds only pickle checkpoints ({', '.join(pickles[:3])}), no .safetensors.",
            "Loading a pickle can run arbitrary code. Convert it to safetensors (e.g. load it in transformers "
            "and call save_pretrained(..., safe_serialization=True)), or pass allow_pickle=True "
            "(--allow-pickle) if you trust its source.",
        )
    raise ResidualsError(
        f"{label} contains no model weights (no .safetensors files).",
        "Point at the folder or repo that holds model.safetensors (or its shards and model.safetensors.index.json).",
    )


def index_weight_map(index: Any, label: str) -> dict[str, str]:
    """The index's tensor -> file map, refused unless every entry is a plain file name of the checkpoint."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ResidualsError(
            f"{label}: {INDEX_NAME} has no weight_map object.", "Download or copy the checkpoint again."
        )
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or not _is_plain_name(file):
            raise ResidualsError(
                f"{label}: {INDEX_NAME} maps tensor {tensor!r} to {file!r}, which is not a file name of this "
                "checkpoint (paths, '..' and folders are not allowed).",
                "The index is corrupt or was made to read other files: download or copy the checkpoint again.",
            )
    return weight_map


def _is_plain_name(name: str) -> bool:
    return (
        bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
    )


def unindexed_weight_files(listing: list[str], files: list[str]) -> list[str]:
    """Weight files of a folder or repo that the index does not name (a stale index, or strays)."""
    chosen = set(files)
    return sorted(
        n for n in listing if n.endswith(".safetensors") and not n.startswith(".") and n not in chosen
    )


# ---- headers ----------------------------------------------------------------------------------------
def header_length(prefix: bytes, file_size: int, label: str) -> int:
    if len(prefix) < 8 or file_size < 8:
        raise ResidualsError(
            f"{label} is not a valid safetensors file (only {file_size} bytes).",
            "The file is truncated: download or copy it again.",
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise ResidualsError(
            f"{label} is not a valid safetensors file (header length {length} does not fit in {file_size} bytes).",
            "The file is truncated or not safetensors: download or copy it again.",
        )
    return length


def parse_header(raw: bytes, file_size: int, label: str, file: str) -> dict[str, TensorInfo]:
    """Tensors of one safetensors file from its header bytes, validated completely before any use.

    A header is data from a stranger: it must be a JSON object of tensor entries, each with a
    known dtype, a shape of non-negative integers and offsets whose length is shape × dtype, and
    the entries must tile the data section exactly (no gaps, no overlaps, nothing past the end),
    as the safetensors format requires.
    """

    def corrupt(problem: str) -> ResidualsError:
        return ResidualsError(
            f"{label} has a corrupt safetensors header: {problem}.",
            "The file is damaged or was not written by safetensors: download or copy it again.",
        )

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise corrupt(f"tensor {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
        return dict(pairs)

    try:
        header = json.loads(raw, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResidualsError(
            f"{label} has an unreadable safetensors header ({exc}).", "Download or copy the file again."
        ) from exc
    if not isinstance(header, dict):
        raise corrupt(f"it is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise corrupt("__metadata__ is not an object of strings")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise corrupt(f"the entry of tensor {name!r} is not an object")
        code = entry.get("dtype")
        if not isinstance(code, str) or code not in BY_CODE:
            raise ResidualsError(
                f"{label}: tensor {name!r} has dtype {code!r}, which this tool does not handle.",
                "Convert the checkpoint to float32/bfloat16/float16 safetensors first.",
            )
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise corrupt(f"tensor {name!r} has shape {shape!r} (dimensions must be non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise corrupt(f"tensor {name!r} has data_offsets {offsets!r} (two non-negative integers needed)")
        begin, end = offsets
        info = TensorInfo(name, BY_CODE[code], tuple(shape), file, data_start + begin)
        if end < begin or end - begin != info.nbytes:
            raise corrupt(
                f"tensor {name!r} spans bytes {begin}-{end} but its shape {shape} and dtype {code} need {info.nbytes}"
            )
        if end > data_size:
            raise ResidualsError(
                f"{label} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {file_size}.",
                "Download or copy the file again (an interrupted download or copy leaves such files).",
            )
        spans.append((begin, end, name))
        tensors[name] = info
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise corrupt(
                f"tensor {name!r} starts at byte {begin} of the data, where "
                + (
                    f"{position} was expected (a gap)"
                    if begin > position
                    else "an earlier tensor still runs (overlap)"
                )
            )
        position = end
    if position != data_size:
        raise corrupt(f"its tensors cover {position} data bytes but the file holds {data_size}")
    return tensors


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(reader: ByteReader, file: str) -> dict[str, TensorInfo]:
    """A file's tensors, read through its reader (a local file, or a few ranged reads of a Hub file)."""
    probe = min(reader.size, HEADER_PROBE_BYTES)
    fetch = reader.read_range if isinstance(reader, HubFile) else reader.read_bytes
    prefix = fetch(0, probe) if probe else b""
    length = header_length(prefix, reader.size, reader.label)
    raw = prefix[8 : 8 + length]
    if len(raw) < length:
        raw += fetch(len(prefix), 8 + length - len(prefix))
    return parse_header(raw, reader.size, reader.label, file)


# ---- sources ----------------------------------------------------------------------------------------
class TensorSource:
    """Anything that can list tensors and read flat element ranges of them."""

    tensors: dict[str, TensorInfo]
    label: str
    vocab_size: int | None = None  # the model's vocabulary rows, when known (config or instance)

    def read_elements(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements [start, stop) of a tensor in its flat (row-major) order, into `out` when given.

        Elements come as stored (numpy arrays of the dtype's `storage`: bfloat16 as uint16 bits);
        `dtypes.to_torch` hands them to torch without a copy.
        """
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return self.read_elements(name, 0, info.numel).reshape(info.shape)

    def position(self, name: str) -> tuple[int, int]:
        """Sort key of a tensor's bytes (file, offset): the engine reads in this order."""
        return (0, 0)

    def read_only(self, names: set[str]) -> None:
        """Only these tensors will be read: a streamed source fetches nothing else."""

    def finish(self) -> None:
        """Check everything read (Hub files: sha256); before anything is published."""

    def close(self) -> None:
        """Release open files and streams; sources are reusable after close."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Checkpoint(TensorSource):
    """A checkpoint (a folder, or a Hub repo at one commit) seen through its headers.

    `folder` holds its small files (config, tokenizer, index, manifest): the folder itself, or for
    a Hub repo a cache folder with only those (`small_file_bytes` of them); `readers` read the
    weight files' bytes.
    """

    small_file_bytes: int = 0  # downloaded to open a Hub repo (a local folder's are already here)

    def __init__(
        self,
        label: str,
        folder: Path,
        readers: dict[str, ByteReader],
        config: dict | None,
        *,
        weight_map: dict[str, str] | None = None,
        remote: bool = False,
        unindexed: list[str] | None = None,
    ):
        self.label = label
        self.unindexed = unindexed or []  # weight files beside an index that does not name them
        self.folder = folder
        self.readers = readers
        self.config = config
        self.remote = remote
        self._order = {name: i for i, name in enumerate(readers)}
        self.tensors: dict[str, TensorInfo] = {}
        for file, reader in readers.items():
            for name, info in read_header(reader, file).items():
                if name in self.tensors:
                    raise ResidualsError(
                        f"{label}: tensor {name!r} appears in both {self.tensors[name].file} and {file}.",
                        "The checkpoint is inconsistent: remove the stray file.",
                    )
                self.tensors[name] = info
        if not self.tensors:
            raise ResidualsError(
                f"{label} holds no tensors: its weight files ({', '.join(list(readers)[:3])}) are empty.",
                "Point at a complete model folder or repo (an empty file is a failed save or download).",
            )
        if weight_map is not None:
            missing = sorted(
                n for n, f in weight_map.items() if n not in self.tensors or self.tensors[n].file != f
            )
            if missing:
                raise ResidualsError(
                    f"{label}: {INDEX_NAME} lists tensors that their shard does not contain, e.g. {missing[:3]}.",
                    "A shard is missing or truncated: download or copy the checkpoint again.",
                )

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
        """A local folder by the one weight-file rule."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ResidualsError(
                f"{folder} is not a folder.", "Give the folder that holds the model's .safetensors files."
            )
        listing = [p.name for p in folder.iterdir() if p.is_file()]
        files = select_weight_files(
            listing, lambda: read_json(folder / INDEX_NAME), str(folder), allow_pickle=allow_pickle
        )
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
        if not all(f.endswith(".safetensors") for f in files):
            return PickleCheckpoint(str(folder), folder, [folder / f for f in files], config)
        weight_map = (
            index_weight_map(read_json(folder / INDEX_NAME), str(folder)) if INDEX_NAME in listing else None
        )
        return cls(
            str(folder),
            folder,
            {f: LocalFile(folder / f) for f in files},
            config,
            weight_map=weight_map,
            unindexed=unindexed_weight_files(listing, files) if weight_map is not None else None,
        )

    @classmethod
    def open_hub(
        cls,
        label: str,
        small_files: Path,
        locations: list[HubLocation],
        config: dict | None,
        *,
        read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES,
        unindexed: list[str] | None = None,
    ) -> Checkpoint:
        """A Hub repo at one commit: headers by ranged reads now, weights streamed when read."""
        index = small_files / INDEX_NAME
        return cls(
            label,
            small_files,
            {loc.filename: HubFile(loc, read_ahead_bytes=read_ahead_bytes) for loc in locations},
            config,
            weight_map=index_weight_map(read_json(index), label) if index.is_file() else None,
            remote=True,
            unindexed=unindexed,
        )

    # ---- facts from the headers ----------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def tie_word_embeddings(self) -> bool:
        cfg = self.config or {}
        text_cfg = cfg.get("text_config") or {}
        return bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))

    @property
    def vocab_size(self) -> int | None:
        cfg = self.config or {}
        return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")

    # ---- reading ---------------------------------------------------------------------------
    def position(self, name: str) -> tuple[int, int]:
        info = self.tensors[name]
        return (self._order[info.file], info.offset)

    def read_elements(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        info = self.tensors[name]
        count = stop - start
        out = np.empty(count, dtype=info.dtype.numpy) if out is None else out[:count]
        if count > 0:
            self.readers[info.file].read_into(
                info.offset + start * info.dtype.itemsize, memoryview(out.view(np.uint8))
            )
        return out

    def read_only(self, names: set[str]) -> None:
        """Narrow each streamed file to the byte spans of these tensors (a share of a split run)."""
        spans: dict[str, list[tuple[int, int]]] = {file: [] for file in self.readers}
        for name in names:
            info = self.tensors[name]
            spans[info.file].append((info.offset, info.offset + info.nbytes))
        for file, reader in self.readers.items():
            reader.read_only(spans[file])

    def finish(self) -> None:
        for reader in self.readers.values():
            reader.finish()

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


class PickleCheckpoint(Checkpoint):
    """A `.bin`/`.pt` checkpoint the caller explicitly allowed; loaded with weights_only and mmap."""

    def __init__(self, label: str, folder: Path, files: list[Path], config: dict | None):
        self.label = label
        self.folder = folder
        self.readers = {}
        self.config = config
        self.remote = False
        import torch

        self._state: dict[str, Any] = {}
        for file in files:
            self._state.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
        self.tensors = {
            name: TensorInfo(name, dtype_from_name(t.dtype), tuple(t.shape))
            for name, t in self._state.items()
            if isinstance(t, torch.Tensor)
        }

    def position(self, name: str) -> tuple[int, int]:
        return (0, 0)

    def read_elements(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        return _elements_of(self._state[name], start, stop)


class StateDictSource(TensorSource):
    """An in-memory state dict (e.g. a model instance's) with tied duplicates removed.

    `model.state_dict()` lists a tied `lm_head.weight` next to the embedding it shares storage
    with; the checkpoint on disk holds it once, so keep the first name per storage.
    """

    def __init__(
        self, state: Mapping[str, Any], label: str = "model instance", vocab_size: int | None = None
    ):
        self.label = label
        self.vocab_size = vocab_size
        self._state: dict[str, Any] = {}  # torch tensors
        self.aliases: dict[str, str] = {}  # dropped tied name -> kept name
        seen: dict[tuple, str] = {}
        for name, tensor in state.items():
            key = (
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tensor.dtype,
            )
            if tensor.numel() and key in seen:
                self.aliases[name] = seen[key]
                continue
            seen[key] = name
            self._state[name] = tensor
        self.tensors = {
            n: TensorInfo(n, dtype_from_name(t.dtype), tuple(t.shape)) for n, t in self._state.items()
        }

    def read_elements(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        return _elements_of(self._state[name], start, stop)


def _elements_of(tensor: Any, start: int, stop: int) -> np.ndarray:
    """Elements of a torch tensor (on any device) as a host array of its storage type."""
    return from_torch(tensor.detach().reshape(-1)[start:stop])


# ---- helpers ------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """A JSON object from a file; anything else (bad JSON, a list, bad bytes) is the file's fault, named."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResidualsError(f"{path} is not valid JSON ({exc}).", "Fix or replace the file.") from exc
    if not isinstance(data, dict):
        raise ResidualsError(
            f"{path} holds a JSON {type(data).__name__}, not an object.", "Fix or replace the file."
        )
    return data


def element_ranges(numel: int, max_piece_bytes: int) -> Iterator[tuple[int, int]]:
    """Split a tensor's elements [0, numel) into pieces of at most `max_piece_bytes` in float32.

    Flat ranges, whatever the tensor's shape: a fused 3-D expert tensor or a single giant row
    streams in pieces as small as any other (vocabulary padding is a zero tail in flat order).
    """
    step = max(1, max_piece_bytes // 4)
    for start in range(0, max(numel, 1), step):
        yield start, min(start + step, numel)


def hub_weight_locations(
    repo_id: str,
    commit: str,
    siblings: list[Any],
    small_files: Path,
    token: str | bool | None,
    *,
    allow_pickle: bool = False,
) -> list[HubLocation]:
    """The Hub repo's weight files by the one rule, with the sizes and sha256 the Hub records."""
    by_name = {s.rfilename: s for s in siblings if "/" not in s.rfilename}
    files = select_weight_files(
        list(by_name), lambda: read_json(small_files / INDEX_NAME), repo_id, allow_pickle=allow_pickle
    )
    return [
        HubLocation(
            repo_id,
            commit,
            f,
            by_name[f].size if by_name[f].size is not None else by_name[f].lfs.size,
            by_name[f].lfs.sha256 if by_name[f].lfs else None,
            token,
        )
        for f in files
    ]
