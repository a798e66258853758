"""Header-only views of checkpoints, and tensor reads one piece at a time.

A `Checkpoint` learns every tensor's name, dtype, shape and byte range from the safetensors
headers alone (a few kilobytes per file), so compatibility checks run before any weight is read.
Tensors are then read with plain positioned file reads into small buffers rather than through
mmap: mapped pages of a multi-gigabyte file count towards a process's resident memory, plain
reads don't. `StateDictSource` gives an in-memory state dict the same interface, so one engine
serves files and model instances alike.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ResidualsError

# safetensors dtype codes <-> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """Accept torch dtypes and the spellings people type: 'bf16', 'bfloat16', 'torch.float16', 'F32'."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    aliases = {
        "fp32": "float32",
        "f32": "float32",
        "float": "float32",
        "fp16": "float16",
        "f16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "fp64": "float64",
        "f64": "float64",
        "double": "float64",
    }
    key = aliases.get(key, key)
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype):
        raise ResidualsError(
            f"Unknown dtype {name!r}.",
            "Use one of float32, bfloat16 or float16 (or a torch.dtype).",
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is; `file` is None for in-memory tensors."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path | None = None
    offset: int = 0  # absolute byte offset of the data in `file`

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def row_count(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors header; refuse truncated or corrupt files with the file's name."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ResidualsError(
                f"{path} is not a valid safetensors file (only {size} bytes).",
                "The file is truncated: download or copy it again.",
            )
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise ResidualsError(
                f"{path} is not a valid safetensors file (header length {header_len} does not fit in {size} bytes).",
                "The file is truncated or not safetensors: download or copy it again.",
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ResidualsError(
                f"{path} has an unreadable safetensors header ({exc}).", "Download or copy the file again."
            ) from exc
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        code = entry.get("dtype")
        if code not in SAFETENSORS_DTYPES:
            raise ResidualsError(
                f"{path}: tensor {name!r} has dtype {code!r}, which this tool does not handle.",
                "Convert the checkpoint to float32/bfloat16/float16 safetensors first.",
            )
        begin, end = entry["data_offsets"]
        info = TensorInfo(name, SAFETENSORS_DTYPES[code], tuple(entry["shape"]), path, data_start + begin)
        if end - begin != info.nbytes:
            raise ResidualsError(
                f"{path}: tensor {name!r} claims {end - begin} bytes but its shape and dtype need {info.nbytes}.",
                "The file is corrupt: download or copy it again.",
            )
        end_max = max(end_max, end)
        tensors[name] = info
    if data_start + end_max > size:
        raise ResidualsError(
            f"{path} is truncated: its header describes {data_start + end_max} bytes but the file has {size}.",
            "Download or copy the file again (an interrupted download or copy leaves such files).",
        )
    return tensors, metadata


class TensorSource:
    """Anything that can list tensors and read row ranges of them."""

    tensors: dict[str, TensorInfo]
    label: str
    vocab_size: int | None = None  # the model's vocabulary rows, when known (config or instance)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.read_rows(name, 0, info.row_count).reshape(info.shape)

    def close(self) -> None:
        """Release open files; sources are reusable after close."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Checkpoint(TensorSource):
    """A checkpoint folder (single file or sharded index) seen through its headers."""

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo], files: list[Path], config: dict | None):
        self.folder = folder
        self.tensors = tensors
        self.files = files
        self.config = config
        self.label = str(folder)
        self._handles: dict[Path, Any] = {}

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise ResidualsError(
                f"{folder} is not a folder.", "Give the folder that holds the model's .safetensors files."
            )
        files = weight_files(folder, allow_pickle=allow_pickle)
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
        if files[0].suffix != ".safetensors":
            return PickleCheckpoint(folder, files, config)
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            file_tensors, _ = read_safetensors_header(file)
            for name, info in file_tensors.items():
                if name in tensors:
                    raise ResidualsError(
                        f"{folder}: tensor {name!r} appears in both {tensors[name].file.name} and {file.name}.",
                        "The checkpoint is inconsistent: remove the stray file.",
                    )
                tensors[name] = info
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            listed = set(read_json(index).get("weight_map", {}))
            missing = sorted(listed - set(tensors))
            if missing:
                raise ResidualsError(
                    f"{folder}: the index lists tensors that no shard contains, e.g. {missing[:3]}.",
                    "A shard is missing or truncated: download or copy the checkpoint again.",
                )
        return cls(folder, tensors, files, config)

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
    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = open(file, "rb", buffering=0)  # noqa: SIM115 (kept open across reads)
        return handle

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read rows [start, stop) of a tensor as a flat tensor, into `out` when given (a reused buffer)."""
        info = self.tensors[name]
        count = (stop - start) * info.row_numel
        out = torch.empty(count, dtype=info.dtype) if out is None else out[:count]
        if count == 0:
            return out
        view = memoryview(out.view(torch.uint8).numpy())
        position = info.offset + start * info.row_numel * info.dtype.itemsize
        handle = self._handle(info.file)
        done = 0
        while done < len(view):
            got = os.preadv(handle.fileno(), [view[done:]], position + done)
            if got == 0:
                raise ResidualsError(
                    f"{info.file} ended early while reading {name!r}.",
                    "The file is truncated: download or copy it again.",
                )
            done += got
        return out

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


class RemoteCheckpoint(Checkpoint):
    """A Hub model seen through its safetensors headers (ranged reads) before any weight is downloaded.

    Plans and compatibility checks run on it; `fetch()` then downloads the weights and returns
    the local `Checkpoint` to read from.
    """

    def __init__(self, preview, config: dict | None):
        tensors = {
            name: TensorInfo(name, SAFETENSORS_DTYPES[code], tuple(shape), None, begin)
            for name, (code, shape, (begin, _end)) in preview.headers.items()
            if code in SAFETENSORS_DTYPES
        }
        super().__init__(preview.folder, tensors, [], config)
        self.preview = preview
        self.label = preview.repo_id

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        raise RuntimeError(f"{self.label}: weights not downloaded yet; call fetch() first")

    def fetch(self, *, token: str | None = None, cache_dir=None, allow_pickle: bool = False) -> Checkpoint:
        from .hub import download_weights

        folder = download_weights(self.preview, token=token, cache_dir=cache_dir)
        local = Checkpoint.open(folder, allow_pickle=allow_pickle)
        local.label = self.label
        return local


class PickleCheckpoint(Checkpoint):
    """A `.bin`/`.pt` checkpoint the caller explicitly allowed; loaded with weights_only and mmap."""

    def __init__(self, folder: Path, files: list[Path], config: dict | None):
        self._state: dict[str, torch.Tensor] = {}
        for file in files:
            self._state.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
        tensors = {
            name: TensorInfo(name, t.dtype, tuple(t.shape), file=None)
            for name, t in self._state.items()
            if isinstance(t, torch.Tensor)
        }
        super().__init__(folder, tensors, files, config)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return _rows_of(self._state[name], start, stop)


class StateDictSource(TensorSource):
    """An in-memory state dict (e.g. a model instance's) with tied duplicates removed.

    `model.state_dict()` lists a tied `lm_head.weight` next to the embedding it shares storage
    with; the checkpoint on disk holds it once, so keep the first name per storage.
    """

    def __init__(
        self, state: Mapping[str, torch.Tensor], label: str = "model instance", vocab_size: int | None = None
    ):
        self.label = label
        self.vocab_size = vocab_size
        self._state: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}  # dropped tied name -> kept name
        seen: dict[tuple[int, int, tuple, torch.dtype], str] = {}
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
        self.tensors = {n: TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in self._state.items()}

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return _rows_of(self._state[name], start, stop)


def _rows_of(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.dim() == 0:
        return tensor.reshape(1).cpu()
    return tensor[start:stop].reshape(-1).cpu()


# ---- folder helpers ---------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ResidualsError(f"{path} is not valid JSON ({exc}).", "Fix or replace the file.") from exc


def weight_files(folder: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint's weight files: the index's shards, else model.safetensors, else any *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ResidualsError(
                f"{folder}: shard(s) {missing[:3]} listed in model.safetensors.index.json are missing.",
                "Download or copy the whole checkpoint again.",
            )
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    found = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if found:
        return found
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    pickles = [p for p in pickles if "optimizer" not in p.name and "training_args" not in p.name]
    if pickles and allow_pickle:
        return pickles
    if pickles:
        raise ResidualsError(
            f"{folder} holds only pickle checkpoints ({', '.join(p.name for p in pickles[:3])}), no .safetensors.",
            "Loading a pickle can run arbitrary code. Convert it to safetensors (e.g. load it in transformers "
            "and call save_pretrained(..., safe_serialization=True)), or pass allow_pickle=True "
            "(--allow-pickle) if you trust its source.",
        )
    raise ResidualsError(
        f"{folder} contains no model weights (no .safetensors files).",
        "Point at the folder that holds model.safetensors (or its shards and model.safetensors.index.json).",
    )


def iter_row_ranges(info: TensorInfo, rows_total: int, max_piece_bytes: int) -> Iterator[tuple[int, int]]:
    """Split rows [0, rows_total) into ranges of at most `max_piece_bytes` in float32."""
    row_bytes = max(1, info.row_numel * 4)
    step = max(1, max_piece_bytes // row_bytes)
    for start in range(0, max(rows_total, 1), step):
        yield start, min(start + step, max(rows_total, 1))
