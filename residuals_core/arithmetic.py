"""Compute, apply and merge as streaming loops: one tensor piece at a time, combined in float32.

Every operation first builds a plan from headers alone (names, shapes, dtypes, vocabulary rows),
which is where incompatible inputs are rejected in seconds. Executing the plan then reads each
output tensor in flat element ranges of at most `piece_bytes` (float32) from every input, pads
vocabulary rows an input lacks with zeros (a zero tail in flat order), combines, checks the
result is finite, collects norms, and hands the piece to a sink (a shard writer or a dict).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checkpoint import TensorInfo, TensorSource, element_ranges
from .dtypes import (
    FLOAT32,
    INT64,
    DType,
    all_finite,
    convert,
    dtype_from_name,
    overflow_count,
    same_bits,
    store,
    to_float32,
    to_torch,
    written_finite,
)
from .errors import ResidualsError

# float32 bytes per piece. On the CPU, 2 MB pieces keep a piece's buffers in cache between the
# steps that touch them (measured on a 1B merge: 1.9 s at 2 MB, 2.6 s at 8 MB); a GPU wants
# fewer, larger host-to-device copies.
DEFAULT_PIECE_BYTES = 2 * 1024 * 1024
DEVICE_PIECE_BYTES = 8 * 1024 * 1024
TIED_OUTPUT_NAMES = ("lm_head.weight",)
MAX_VOCAB_GROWTH = 2  # a tokenizer that needs more than twice the model's rows is corrupt, not extended

Progress = Callable[[int, int, str], None]


@dataclass
class OutputTensor:
    """One tensor of the result: its shape and dtype, and which input tensor feeds each operand."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    operands: list[tuple[TensorSource, str]]  # (source, tensor name) per operand
    # operand slot -> slot whose values stand in for its missing vocabulary rows (else zeros)
    fills: dict[int, int] = field(default_factory=dict)

    def fill_for(self, slot: int) -> tuple[TensorSource, str] | None:
        other = self.fills.get(slot)
        return None if other is None else self.operands[other]

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.name, self.dtype, self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


@dataclass
class TensorStats:
    """Norms gathered while streaming; `reference_norm` is the norm of the tensor the delta is relative to."""

    numel: int = 0
    norm_sq: float = 0.0
    reference_norm_sq: float = 0.0
    mismatched: int = 0  # compute only: elements where base + stored residual != instruct
    max_abs_error: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "numel": self.numel,
            "norm": math.sqrt(self.norm_sq),
            "reference_norm": math.sqrt(self.reference_norm_sq),
            "mismatched": self.mismatched,
            "max_abs_error": self.max_abs_error,
        }


@dataclass
class Plan:
    outputs: list[OutputTensor]
    vocab_rows: int | None = None  # rows of the vocabulary tensors in the result, when known
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(o.info.nbytes for o in self.outputs)


# ---- planning (headers only) ------------------------------------------------------------------
def _differs_only_in_rows(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) >= 1 and tuple(a[1:]) == tuple(b[1:]) and a[0] != b[0]


def _name_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … and {len(names) - limit} more" if len(names) > limit else "")


def plan_tensors(
    roles: Sequence[tuple[str, TensorSource]],
    *,
    out_dtype: Callable[[TensorInfo], DType],
    normalize_embeddings: bool,
    vocab_sizes: Sequence[int | None] = (),
    min_vocab_rows: int | None = None,
    optional_extra: Callable[[str, str], bool] = lambda role, name: False,
    mismatch_hint: str = "",
    pad_from: dict[str, str] | None = None,
    tokenizer_label: str = "the tokenizer",
) -> Plan:
    """Match tensors across inputs by name and shape; decide padding of vocabulary rows.

    `roles` is [(role name, source)], the first being the one whose names define the output.
    A tensor whose first dimension differs between inputs (vocabulary rows) is padded up to the
    largest, when `normalize_embeddings`; nothing is ever shrunk. Missing rows count as zeros,
    except for a role in `pad_from` ({"instruct": "base"}), whose missing rows are read from the
    other role: a token the instruct model lacks then gets a zero difference, instead of one
    that would wipe that token's row (−θ_base) when applied. Tensors whose first dimension
    equals a model's vocabulary size also grow to `min_vocab_rows` (the tokenizer's length) when
    that is larger, as `resize_token_embeddings` would. The plan's notes say which rows were
    filled how.
    """
    pad_from = pad_from or {}
    slot_of = {role: i for i, (role, _) in enumerate(roles)}
    first_role, first = roles[0]
    names = list(first.tensors)
    problems_missing: list[str] = []
    for role, source in roles[1:]:
        missing = [n for n in names if n not in source.tensors]
        extra = [n for n in source.tensors if n not in first.tensors and not optional_extra(role, n)]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing from {role}: {_name_list(missing)}")
            if extra:
                parts.append(f"only in {role}: {_name_list(extra)}")
            problems_missing.append(f"{first_role} vs {role} — " + "; ".join(parts))
    if problems_missing:
        strays = [
            f"{source.label} holds weight files its index does not list ({_name_list(source.unindexed, 3)})"
            for _, source in roles
            if getattr(source, "unindexed", None)
        ]
        if strays:
            raise ResidualsError(
                "The models do not have the same tensors: "
                + " | ".join(problems_missing)
                + ". "
                + "; ".join(strays)
                + ".",
                "The index (model.safetensors.index.json) is stale or those files are strays: regenerate the "
                "index so it names every shard, or remove the stray files, then run again.",
            )
        raise ResidualsError(
            "The models do not have the same tensors: " + " | ".join(problems_missing) + ".",
            "They are not the same architecture. Use models of one family and size "
            "(e.g. a base model and its own instruct version)." + mismatch_hint,
        )

    vocab = {v for v in vocab_sizes if v}
    outputs: list[OutputTensor] = []
    row_mismatches: list[str] = []
    other_mismatches: list[str] = []
    vocab_rows: set[int] = set()
    rows_by_role: dict[str, int] = {}
    overgrown: tuple[str, int] | None = None  # a vocabulary tensor the tokenizer would grow absurdly
    for name in names:
        infos = [source.tensors[name] for _, source in roles]
        shapes = [i.shape for i in infos]
        if all(s == shapes[0] for s in shapes):
            shape = shapes[0]
            is_vocab = bool(shape) and shape[0] in vocab and len(shape) <= 2
        elif all(s == shapes[0] or _differs_only_in_rows(s, shapes[0]) for s in shapes) and (
            not vocab or any(s[0] in vocab for s in shapes)  # rows of a vocabulary, not another layer size
        ):
            is_vocab = True
            shape = shapes[0]
            row_mismatches.append(
                f"{name}: "
                + " vs ".join(f"{role} {list(s)}" for (role, _), s in zip(roles, shapes, strict=True))
            )
        else:
            other_mismatches.append(
                f"{name}: "
                + " vs ".join(f"{role} {list(s)}" for (role, _), s in zip(roles, shapes, strict=True))
            )
            continue
        fills: dict[int, int] = {}
        if is_vocab:
            rows = max(s[0] for s in shapes)
            if normalize_embeddings and min_vocab_rows and min_vocab_rows > rows:
                if min_vocab_rows > MAX_VOCAB_GROWTH * rows:
                    overgrown = overgrown or (name, rows)
                rows = min_vocab_rows
            shape = (rows, *shape[1:])
            vocab_rows.add(rows)
            if not rows_by_role and any(s[0] < rows for s in shapes):
                rows_by_role = {role: s[0] for (role, _), s in zip(roles, shapes, strict=True)}
            fills = {slot_of[r]: slot_of[f] for r, f in pad_from.items() if r in slot_of and f in slot_of}
        outputs.append(
            OutputTensor(
                name=name,
                shape=tuple(shape),
                dtype=dtype_from_name(out_dtype(infos[0])),  # a torch dtype is taken too
                operands=[(source, name) for _, source in roles],
                fills=fills,
            )
        )
    if other_mismatches:
        raise ResidualsError(
            f"{len(other_mismatches)} tensor(s) have different shapes: {_name_list(other_mismatches, 3)}.",
            "The models are different architectures or sizes; use models of one family and size."
            + mismatch_hint,
        )
    if overgrown is not None:
        name, rows = overgrown
        raise ResidualsError(
            f"{tokenizer_label} has {min_vocab_rows} tokens (its largest token id is {min_vocab_rows - 1}), "
            f"but {name} has {rows} vocabulary rows: growing it {min_vocab_rows / rows:.0f}× is not an added "
            "token or two but a corrupt tokenizer.",
            "Fix the added tokens in its tokenizer.json / tokenizer_config.json, or pass the right tokenizer "
            "(--instruct-tokenizer / instruct_tokenizer_name).",
        )
    if row_mismatches and not normalize_embeddings:
        raise ResidualsError(
            f"Shape mismatch in the vocabulary rows: {_name_list(row_mismatches, 3)}.",
            "If tokenizers differ (e.g., added tokens), set normalize_embeddings=True or provide "
            "instruct_tokenizer/instruct_tokenizer_name to enable resizing.",
        )
    plan = Plan(outputs, vocab_rows=max(vocab_rows) if vocab_rows else None)
    if rows_by_role and plan.vocab_rows:
        filled = [
            _fill_note(role, rows, plan.vocab_rows, pad_from.get(role), rows_by_role)
            for role, rows in rows_by_role.items()
            if rows < plan.vocab_rows
        ]
        plan.notes.append(
            f"vocabulary rows aligned to {plan.vocab_rows}: "
            + "; ".join(filled)
            + (f" (tensors: {_name_list(row_mismatches, 3)})" if row_mismatches else "")
        )
    return plan


def _fill_note(role: str, rows: int, total: int, source: str | None, rows_by_role: dict[str, int]) -> str:
    """What the result holds on the vocabulary rows one input lacks, exactly."""
    span = f"row {rows}" if total - rows == 1 else f"rows {rows}–{total - 1}"
    if source is not None:
        have = min(rows_by_role.get(source, 0), total)
        if have > rows:
            return (
                f"the {role} model has {rows} rows, so on {span} it is taken equal to the {source} model and the "
                f"difference there is zero (applying it leaves those rows of the target unchanged)"
            )
    meaning = {
        "base": "the residual there is the instruct model's own rows (its added tokens)",
        "target": "the result there is scale × the residual",
        "residuals": "the target's rows there are kept unchanged",
    }.get(role, "they count as zeros")
    return f"the {role} model has {rows} rows, so its {span} are zero-filled: {meaning}"


# ---- execution --------------------------------------------------------------------------------
class DictSink:
    """Collects output tensors in memory (used for model instances); torch tensors at the end."""

    def __init__(self, plan: Plan):
        self._outputs = {o.name: o for o in plan.outputs}
        self._pieces: dict[str, list[np.ndarray]] = {}

    def buffer(self, dtype: DType, count: int) -> np.ndarray:
        return np.empty(count, dtype=dtype.numpy)  # kept: every piece is a fresh array

    def write(self, name: str, piece: np.ndarray) -> None:
        self._pieces.setdefault(name, []).append(piece)

    def tensors(self) -> dict[str, Any]:
        result = {}
        for name, pieces in self._pieces.items():
            out = self._outputs[name]
            values = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)  # one piece: no copy
            result[name] = to_torch(values, out.dtype).reshape(out.shape)
        return result


def _xp(array: Any) -> Any:
    """numpy for host arrays, torch for device tensors: the operations' arithmetic serves both."""
    return np if isinstance(array, np.ndarray) else sys.modules["torch"]


class _HostMath:
    """The arithmetic on the CPU, in numpy: a command-line run never imports torch for it.

    Work buffers are reused, one per (purpose, operand slot, dtype): allocating fresh ones per piece
    makes the kernel zero new pages for every piece, which here costs as much as the arithmetic.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, np.ndarray] = {}

    def host_buffer(self, key: tuple, dtype: DType, count: int) -> np.ndarray:
        full = (*key, dtype.storage)
        buffer = self._buffers.get(full)
        if buffer is None or buffer.size < count:
            buffer = self._buffers[full] = np.empty(count, dtype=dtype.numpy)
        return buffer[:count]

    work_buffer = host_buffer

    def load(self, key: tuple, raw: np.ndarray, dtype: DType, work_dtype: DType) -> np.ndarray:
        """The values of a piece as read (elements of `dtype`) in a reused work buffer."""
        work = self.work_buffer(key, work_dtype, raw.size)
        if work_dtype == FLOAT32:
            return to_float32(raw, dtype, work)
        np.copyto(work, raw, casting="unsafe")  # integers: int64
        return work

    @staticmethod
    def norm_sq(values: np.ndarray) -> float:
        return float(np.dot(values, values))  # flat float32 pieces: one BLAS call

    @staticmethod
    def written_finite(values: np.ndarray, dtype: DType) -> bool:
        return written_finite(values, dtype)

    @staticmethod
    def overflow_count(values: np.ndarray, dtype: DType) -> int:
        return overflow_count(values, dtype)

    @staticmethod
    def store(values: np.ndarray, stored: np.ndarray, dtype: DType) -> np.ndarray:
        return store(values, stored, dtype)


class _DeviceMath(_HostMath):
    """The same steps on a GPU with torch: pieces are read on the host, combined on the device, and
    rounded there before they come back into the sink's host buffer."""

    def __init__(self, device: Any) -> None:
        import torch

        super().__init__()
        self._torch, self._device = torch, device
        self._tensors: dict[tuple, Any] = {}

    def work_buffer(self, key: tuple, dtype: DType, count: int) -> Any:
        full = (*key, dtype.name)
        buffer = self._tensors.get(full)
        if buffer is None or buffer.numel() < count:
            buffer = self._tensors[full] = self._torch.empty(count, dtype=dtype.torch, device=self._device)
        return buffer[:count]

    def load(self, key: tuple, raw: np.ndarray, dtype: DType, work_dtype: DType) -> Any:
        return self.work_buffer(key, work_dtype, raw.size).copy_(to_torch(raw, dtype))

    def norm_sq(self, values: Any) -> float:
        return float(self._torch.dot(values, values))

    def written_finite(self, values: Any, dtype: DType) -> bool:
        if values.numel() == 0:
            return True
        if dtype.overflow == math.inf:
            return math.isfinite(float(values.sum()))
        low, high = self._torch.aminmax(values)
        return -dtype.overflow < float(low) and float(high) < dtype.overflow  # NaN compares false

    def overflow_count(self, values: Any, dtype: DType) -> int:
        finite = self._torch.isfinite(values) & (values.abs() < dtype.overflow)
        return int(values.numel() - finite.count_nonzero())

    def store(self, values: Any, stored: np.ndarray, dtype: DType) -> np.ndarray:
        to_torch(stored, dtype).copy_(values.to(dtype.torch))  # rounded on the device, then copied back
        return stored


def _read_elements(
    operand: tuple[TensorSource, str],
    start: int,
    stop: int,
    buffer: np.ndarray | None,
    fill: tuple[TensorSource, str] | None = None,
) -> np.ndarray:
    """Elements [start, stop) of an operand (into `buffer` when the source can); past its end, the
    `fill` operand's elements where it has them, else zeros.

    An input with fewer vocabulary rows than the result ends earlier in flat order: its missing
    rows are exactly the tail.
    """
    source, name = operand
    info = source.tensors[name]
    have = min(stop, info.numel) - start
    if have >= stop - start:
        return source.read_elements(name, start, stop, out=buffer)
    piece = np.zeros(stop - start, dtype=info.dtype.numpy)  # vocabulary padding: rare
    if have > 0:
        piece[:have] = source.read_elements(name, start, start + have)
    if fill is not None:
        begin = start + max(have, 0)
        end = min(stop, fill[0].tensors[fill[1]].numel)
        if end > begin:
            filled = _read_elements(fill, begin, end, None)
            piece[begin - start : end - start] = convert(filled, fill[0].tensors[fill[1]].dtype, info.dtype)
    return piece


def _non_finite_inputs(out: OutputTensor, start: int, stop: int) -> list[str]:
    """Which inputs hold NaN/Inf in these elements (re-read: the work buffers were overwritten)."""
    return [
        source.label
        for slot, (source, name) in enumerate(out.operands)
        if not all_finite(
            _read_elements((source, name), start, stop, None, out.fill_for(slot)), source.tensors[name].dtype
        )
    ]


def _not_finite(out: OutputTensor, start: int, stop: int, combine: Callable, count: int) -> ResidualsError:
    """Why a piece would be written with NaN/Inf: bad inputs, or a value beyond the output dtype's range at this α."""
    scale = getattr(combine, "scale", None)
    at = f" at scale α = {scale:g}" if scale is not None else ""
    bad = _non_finite_inputs(out, start, stop)
    if bad:
        return ResidualsError(
            f"The result for tensor {out.name!r} contains NaN or Inf: the input(s) {', '.join(bad)} already hold "
            "non-finite values there.",
            "Check those checkpoints (a corrupt or overflowed model); nothing was written.",
        )
    if out.dtype != FLOAT32:
        return ResidualsError(
            f"Tensor {out.name!r} overflows {out.dtype}{at}: {count} value(s) of one "
            f"piece exceed its range (±{out.dtype.max:.5g}) once rounded, and would be written as "
            f"{'NaN' if out.dtype.name == 'float8_e4m3fn' else 'Inf'}.",
            "Use a smaller scale, or write float32 (--dtype float32 / dtype=torch.float32); nothing was written.",
        )
    return ResidualsError(
        f"The result for tensor {out.name!r} overflows float32{at} ({count} value(s) of one piece are Inf).",
        "Use a smaller scale; nothing was written.",
    )


_SQRT_FLOAT32_MAX = math.sqrt(FLOAT32.max)  # ≈ 1.8e19


def _finite_by_norms(stored_dtype: DType, reference_sq: float, delta_sq: float) -> bool:
    """Whether the norms already taken prove a piece finite as written, saving a pass over it.

    A finite float32 sum of squares bounds every element by √(float32 max) ≈ 1.8e19 (an overflow,
    NaN or Inf could not come back to finite). The result is the delta, or the reference plus the
    delta, so it is bounded by 3.7e19: finite in any output dtype whose largest value is above that
    (float32, bfloat16), not in float16, whose pieces keep the range check.
    """
    return (
        math.isfinite(reference_sq) and math.isfinite(delta_sq) and stored_dtype.max >= 2 * _SQRT_FLOAT32_MAX
    )


def reading_order(plan: Plan) -> Plan:
    """The plan with tensors in the order their bytes lie in the inputs' files.

    Hub inputs are read as one sequential stream per file; following the first streamed
    input's layout (usually every input's: one family saves alike) keeps every stream moving
    forward. Local folders follow the first input's layout, which suits the page cache.
    """
    if not plan.outputs:
        return plan
    operands = plan.outputs[0].operands
    lead = next((i for i, (s, _) in enumerate(operands) if getattr(s, "remote", False)), 0)
    ordered = sorted(plan.outputs, key=lambda o: o.operands[lead][0].position(o.operands[lead][1]))
    return Plan(ordered, plan.vocab_rows, plan.notes)


def execute(
    plan: Plan,
    combine: Callable[[list[Any], OutputTensor, Any], tuple[Any, Any]],
    sink,
    *,
    reference_operand: int | None = None,
    check_reconstruction: Callable[
        [list[np.ndarray], list[Any], np.ndarray, OutputTensor, Any], tuple[int, float]
    ]
    | None = None,
    device: str | Any = "cpu",
    piece_bytes: int | None = None,
    progress: Progress | None = None,
    stats: dict[str, TensorStats] | None = None,
) -> dict[str, TensorStats]:
    """Stream every output tensor through `combine` into `sink`; return per-tensor norms.

    Each operand's elements are read into a reused host buffer and converted into a reused work
    buffer (float32, or int64 for integer tensors) on the host, or on `device` (float32 inputs on
    the host are read straight into it). `combine` may overwrite those work buffers and returns
    (result, delta): the result is checked finite as it will be written, then rounded into a buffer
    the sink provides (computed straight into it when the output is float32 on the host) and
    written; the delta's norm is recorded (the residual itself for compute, the scaled residual
    actually added for apply and merge). The result must be the delta, or the reference operand
    plus the delta: their norms then prove most pieces finite without another pass.
    `check_reconstruction` gets the inputs as read, the work buffers after `combine`, the stored
    piece and the kernels (host or device: their buffers and conversions). `stats`: the dict to fill (a tensor's entry is final before
    its last piece is written, so a sink may read it when the file is done).
    """
    device = check_device(device)
    on_host = device == "cpu"
    piece_bytes = piece_bytes or (DEFAULT_PIECE_BYTES if on_host else DEVICE_PIECE_BYTES)
    stats = {} if stats is None else stats
    kernels = _HostMath() if on_host else _DeviceMath(device)
    total = len(plan.outputs)
    # overflows are found by the checks below and refused with their reason, not warned about
    with (
        np.errstate(over="ignore", invalid="ignore"),
        _torch_threads(_engine_threads()) if on_host else contextlib.nullcontext(),
    ):
        for index, out in enumerate(plan.outputs):
            if progress:
                progress(index, total, out.name)
            info = out.info
            st = stats[out.name] = TensorStats(numel=info.numel)
            work_dtype = FLOAT32 if out.is_float else INT64
            for start, stop in element_ranges(info.numel, piece_bytes):
                count = stop - start
                raw: list[np.ndarray] = []
                work: list[Any] = []
                for slot, operand in enumerate(out.operands):
                    in_dtype = operand[0].tensors[operand[1]].dtype
                    # read straight into the work buffer when no conversion is needed and no one needs the
                    # input as read afterwards; otherwise read, then convert in one pass
                    if in_dtype == work_dtype and on_host and check_reconstruction is None:
                        piece = _read_elements(
                            operand,
                            start,
                            stop,
                            kernels.work_buffer(("work", slot), work_dtype, count),
                            out.fill_for(slot),
                        )
                        raw.append(piece)
                        work.append(piece)
                        continue
                    read_buffer = kernels.host_buffer(("read", slot), in_dtype, count)
                    piece = _read_elements(operand, start, stop, read_buffer, out.fill_for(slot))
                    raw.append(piece)
                    work.append(kernels.load(("work", slot), piece, in_dtype, work_dtype))
                reference_sq = 0.0
                if out.is_float and reference_operand is not None:  # before combine overwrites it
                    reference_sq = kernels.norm_sq(work[reference_operand])
                    st.reference_norm_sq += reference_sq
                stored = sink.buffer(out.dtype, count)
                into = stored if out.dtype == work_dtype and on_host else None
                result, delta = combine(work, out, into)
                if out.is_float:
                    delta_sq = kernels.norm_sq(delta)
                    if not (
                        _finite_by_norms(out.dtype, reference_sq, delta_sq)
                        or kernels.written_finite(result, out.dtype)
                    ):
                        raise _not_finite(
                            out, start, stop, combine, kernels.overflow_count(result, out.dtype)
                        )
                    st.norm_sq += delta_sq
                if result is not stored:
                    kernels.store(result, stored, out.dtype)  # the one rounding to the output dtype
                if check_reconstruction is not None and out.is_float:
                    mismatched, max_err = check_reconstruction(raw, work, stored, out, kernels)
                    st.mismatched += mismatched
                    st.max_abs_error = max(st.max_abs_error, max_err)
                sink.write(out.name, stored)
    if progress:
        progress(total, total, "done")
    return stats


def check_scale(scale: float) -> float:
    """α must be a finite number: NaN or Inf would only be found after reading the first tensor."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ResidualsError(f"scale {scale!r} is not a finite number.", "Give a number such as 1.0 or 0.5.")
    return value


def check_device(device: str | Any) -> str | Any:
    """The device to combine on, refused up front with a clear message when it cannot be used.

    "cpu" stays a string (the host's arithmetic needs no torch); anything else is a torch device.
    """
    if str(device) == "cpu":
        return "cpu"
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ResidualsError(
            f"{device!r} is not a device name ({exc}).", "Use 'cpu', or 'cuda' on a machine with a GPU."
        ) from None
    if resolved.type == "cpu":
        return "cpu"
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ResidualsError(
            f"device {device!r} was asked for, but this machine has no usable CUDA GPU.",
            "Use device 'cpu' (the default), or run on a machine with a CUDA GPU.",
        )
    if resolved.type != "cuda":
        raise ResidualsError(
            f"device {device!r} is not supported.", "Use 'cpu', or 'cuda' on a machine with a GPU."
        )
    return resolved


def _engine_threads() -> int:
    """Threads for torch's elementwise work: the cores the writer's hashing and writing threads leave.

    The work is memory-bound; on two cores, intra-op threads only spin against those threads
    (measured here: 12.4 s of CPU for a 1B compute with two, 6.6 s with one).
    """
    return max(1, (os.cpu_count() or 1) - 2)


@contextlib.contextmanager
def _torch_threads(count: int):
    """Limit torch's threads while the engine runs, where torch is loaded at all (sources such as
    DARE's draw with it inside the loop); the host's own arithmetic is numpy on one thread."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---- the three operations' arithmetic (on float32 work buffers they may overwrite) ------------
# numpy arrays on the host, torch tensors on a device: both spell these operations alike.
def residual_of(pieces: list[Any], out: OutputTensor, into: Any = None) -> tuple[Any, Any]:
    """R = instruct − base (operands: base, instruct), into `into` when given (base is kept)."""
    base, instruct = pieces
    residual = _xp(base).subtract(instruct, base, out=instruct if into is None else into)
    return residual, residual


def make_apply(scale: float) -> Callable:
    """out = target + scale·R (operands: target, residual); integer tensors get R unscaled."""
    check_scale(scale)

    def apply(pieces: list[Any], out: OutputTensor, into: Any = None) -> tuple[Any, Any]:
        target, residual = pieces
        xp = _xp(target)
        if scale != 1.0 and out.is_float:
            residual = xp.multiply(residual, scale, out=residual)
        return xp.add(target, residual, out=target if into is None else into), residual

    apply.scale = scale  # named in overflow messages
    return apply


def make_merge(scale: float) -> Callable:
    """out = target + scale·(instruct − base) (operands: target, base, instruct), no residual written."""

    apply = make_apply(scale)

    def merge(pieces: list[Any], out: OutputTensor, into: Any = None) -> tuple[Any, Any]:
        target, base, instruct = pieces
        return apply([target, _xp(base).subtract(instruct, base, out=instruct)], out, into)

    merge.scale = scale
    return merge


def reconstruction_check(
    raw: list[np.ndarray], work: list[Any], stored: np.ndarray, out: OutputTensor, kernels: _HostMath
) -> tuple[int, float]:
    """For compute: does base + stored residual give back instruct, bit for bit, in instruct's own dtype?

    `raw` holds the inputs as read; `work[0]` still holds the base in float32 (`residual_of` never
    overwrites it) and is reused for the sum, which is rounded into a reused buffer of the
    instruct's dtype: no fresh memory per piece.
    """
    source, name = out.operands[1]
    instruct, instruct_dtype = raw[1], source.tensors[name].dtype
    residual = (
        stored
        if (out.dtype == FLOAT32 and isinstance(work[0], np.ndarray))
        else (kernels.load(("stored",), stored, out.dtype, FLOAT32))
    )
    base = work[0]
    summed = _xp(base).add(base, residual, out=base)
    rebuilt = kernels.store(
        summed, kernels.host_buffer(("rebuilt",), instruct_dtype, stored.size), instruct_dtype
    )
    if same_bits(rebuilt, instruct).all():
        return 0, 0.0
    got = to_float32(rebuilt, instruct_dtype, np.empty(rebuilt.size, np.float32))
    wanted = to_float32(instruct, instruct_dtype, np.empty(instruct.size, np.float32))
    wrong = got != wanted
    errors = np.abs(got[wrong] - wanted[wrong])
    return int(np.count_nonzero(wrong)), float(errors.max()) if errors.size else 0.0


def describe_stats(stats: dict[str, TensorStats]) -> dict[str, Any]:
    mismatched = sum(s.mismatched for s in stats.values())
    numel = sum(s.numel for s in stats.values())
    return {
        "elements": numel,
        "mismatched_elements": mismatched,
        "max_abs_error": max((s.max_abs_error for s in stats.values()), default=0.0),
        "exact": mismatched == 0,
    }
