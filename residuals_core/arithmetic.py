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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import TensorInfo, TensorSource, element_ranges
from .errors import ResidualsError

# float32 bytes per piece. On the CPU, 2 MB pieces keep a piece's buffers in cache between the
# steps that touch them (measured on a 1B merge: 1.9 s at 2 MB, 2.6 s at 8 MB); a GPU wants
# fewer, larger host-to-device copies.
DEFAULT_PIECE_BYTES = 2 * 1024 * 1024
DEVICE_PIECE_BYTES = 8 * 1024 * 1024
TIED_OUTPUT_NAMES = ("lm_head.weight",)

Progress = Callable[[int, int, str], None]


@dataclass
class OutputTensor:
    """One tensor of the result: its shape and dtype, and which input tensor feeds each operand."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    operands: list[tuple[TensorSource, str]]  # (source, tensor name) per operand

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
    out_dtype: Callable[[TensorInfo], torch.dtype],
    normalize_embeddings: bool,
    vocab_sizes: Sequence[int | None] = (),
    min_vocab_rows: int | None = None,
    optional_extra: Callable[[str, str], bool] = lambda role, name: False,
    mismatch_hint: str = "",
) -> Plan:
    """Match tensors across inputs by name and shape; decide padding of vocabulary rows.

    `roles` is [(role name, source)], the first being the one whose names define the output.
    A tensor whose first dimension differs between inputs (vocabulary rows) is padded with zero
    rows up to the largest, when `normalize_embeddings`; nothing is ever shrunk. Tensors whose
    first dimension equals a model's vocabulary size also grow to `min_vocab_rows` (the
    tokenizer's length) when that is larger, as `resize_token_embeddings` would.
    """
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
    for name in names:
        infos = [source.tensors[name] for _, source in roles]
        shapes = [i.shape for i in infos]
        if all(s == shapes[0] for s in shapes):
            shape = shapes[0]
            is_vocab = bool(shape) and shape[0] in vocab and len(shape) <= 2
        elif all(s == shapes[0] or _differs_only_in_rows(s, shapes[0]) for s in shapes):
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
        if is_vocab:
            rows = max(s[0] for s in shapes)
            if normalize_embeddings and min_vocab_rows and min_vocab_rows > rows:
                rows = min_vocab_rows
            shape = (rows, *shape[1:])
            vocab_rows.add(rows)
        outputs.append(
            OutputTensor(
                name=name,
                shape=tuple(shape),
                dtype=out_dtype(infos[0]),
                operands=[(source, name) for _, source in roles],
            )
        )
    if other_mismatches:
        raise ResidualsError(
            f"{len(other_mismatches)} tensor(s) have different shapes: {_name_list(other_mismatches, 3)}.",
            "The models are different architectures or sizes; use models of one family and size."
            + mismatch_hint,
        )
    if row_mismatches and not normalize_embeddings:
        raise ResidualsError(
            f"Shape mismatch in the vocabulary rows: {_name_list(row_mismatches, 3)}.",
            "If tokenizers differ (e.g., added tokens), set normalize_embeddings=True or provide "
            "instruct_tokenizer/instruct_tokenizer_name to enable resizing.",
        )
    plan = Plan(outputs, vocab_rows=max(vocab_rows) if vocab_rows else None)
    if row_mismatches:
        plan.notes.append(
            f"vocabulary rows aligned to {plan.vocab_rows} (missing rows zero-filled): "
            + _name_list(row_mismatches, 3)
        )
    return plan


# ---- execution --------------------------------------------------------------------------------
class DictSink:
    """Collects output tensors in memory (used for model instances)."""

    def __init__(self, plan: Plan):
        self._shapes = {o.name: o.shape for o in plan.outputs}
        self._pieces: dict[str, list[torch.Tensor]] = {}

    def buffer(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        return torch.empty(count, dtype=dtype)  # kept: every piece is a fresh tensor

    def write(self, name: str, piece: torch.Tensor) -> None:
        self._pieces.setdefault(name, []).append(piece)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: torch.cat(p).reshape(self._shapes[n]) for n, p in self._pieces.items()}


class _Buffers:
    """Reused flat buffers, one per (purpose, operand slot, dtype, device).

    Reusing a few small buffers instead of allocating fresh ones per piece avoids the kernel
    zeroing new pages for every piece, which on these machines costs as much as the arithmetic.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, dtype: torch.dtype, count: int, device: torch.device) -> torch.Tensor:
        full = (*key, dtype, device)
        buffer = self._buffers.get(full)
        if buffer is None or buffer.numel() < count:
            buffer = self._buffers[full] = torch.empty(count, dtype=dtype, device=device)
        return buffer[:count]


def _read_elements(
    operand: tuple[TensorSource, str], start: int, stop: int, buffer: torch.Tensor | None
) -> torch.Tensor:
    """Elements [start, stop) of an operand (into `buffer` when the source can), zeros past its end.

    An input with fewer vocabulary rows than the result ends earlier in flat order: its missing
    rows are exactly the zero tail.
    """
    source, name = operand
    have = min(stop, source.tensors[name].numel) - start
    if have >= stop - start:
        return source.read_elements(name, start, stop, out=buffer)
    piece = torch.zeros(stop - start, dtype=source.tensors[name].dtype)  # vocabulary padding: rare
    if have > 0:
        piece[:have] = source.read_elements(name, start, start + have)
    return piece


def _non_finite_inputs(out: OutputTensor, start: int, stop: int) -> list[str]:
    """Which inputs hold NaN/Inf in these elements (re-read: the work buffers were overwritten)."""
    return [
        source.label
        for source, name in out.operands
        if not torch.isfinite(_read_elements((source, name), start, stop, None)).all()
    ]


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
    combine: Callable[
        [list[torch.Tensor], OutputTensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
    ],
    sink,
    *,
    reference_operand: int | None = None,
    check_reconstruction: Callable[
        [list[torch.Tensor], list[torch.Tensor], torch.Tensor, OutputTensor, torch.Tensor], tuple[int, float]
    ]
    | None = None,
    device: str | torch.device = "cpu",
    piece_bytes: int | None = None,
    progress: Progress | None = None,
) -> dict[str, TensorStats]:
    """Stream every output tensor through `combine` into `sink`; return per-tensor norms.

    Each operand's rows are read into a reused buffer and converted into a reused float32 work
    buffer on `device` (float32 inputs on the CPU are read straight into it). `combine` may
    overwrite those work buffers and returns (result, delta): the result goes into a buffer the
    sink provides (computed straight into it when the output is float32, else cast into it) and
    is written; the delta's norm is recorded (the residual itself for compute, the scaled
    residual actually added for apply and merge). `check_reconstruction` gets the inputs as
    read (own dtypes), the work buffers after `combine`, the stored piece, and a reused scratch
    buffer of the second input's dtype on `device`.
    """
    device = check_device(device)
    piece_bytes = piece_bytes or (DEFAULT_PIECE_BYTES if device.type == "cpu" else DEVICE_PIECE_BYTES)
    stats: dict[str, TensorStats] = {}
    buffers = _Buffers()
    cpu = torch.device("cpu")
    total = len(plan.outputs)
    with _torch_threads(_engine_threads()) if device.type == "cpu" else contextlib.nullcontext():
        for index, out in enumerate(plan.outputs):
            if progress:
                progress(index, total, out.name)
            info = out.info
            st = stats[out.name] = TensorStats(numel=info.numel)
            work_dtype = torch.float32 if out.is_float else torch.int64
            for start, stop in element_ranges(info.numel, piece_bytes):
                count = stop - start
                raw: list[torch.Tensor] = []
                work: list[torch.Tensor] = []
                for slot, operand in enumerate(out.operands):
                    in_dtype = operand[0].tensors[operand[1]].dtype
                    work_buffer = buffers.get(("work", slot), work_dtype, count, device)
                    # read straight into the work buffer when no conversion is needed and no one needs the
                    # input as read afterwards; otherwise read, then convert in one copy
                    direct = in_dtype == work_dtype and device == cpu and check_reconstruction is None
                    read_buffer = work_buffer if direct else buffers.get(("read", slot), in_dtype, count, cpu)
                    piece = _read_elements(operand, start, stop, read_buffer)
                    raw.append(piece)
                    work.append(
                        piece if piece.data_ptr() == work_buffer.data_ptr() else work_buffer.copy_(piece)
                    )
                if out.is_float and reference_operand is not None:  # before combine overwrites it
                    reference = work[reference_operand]
                    st.reference_norm_sq += float(torch.dot(reference, reference))
                stored = sink.buffer(out.dtype, count)
                into = stored if stored.dtype == work_dtype and stored.device == device else None
                result, delta = combine(work, out, into)
                if out.is_float:
                    # NaN/Inf propagate through a sum: one cheap reduction instead of an isfinite pass
                    if not math.isfinite(float(result.sum())):
                        bad = _non_finite_inputs(out, start, stop)
                        where = f" (non-finite values already in: {', '.join(bad)})" if bad else ""
                        raise ResidualsError(
                            f"The result for tensor {out.name!r} contains NaN or Inf{where}.",
                            "Check the input checkpoints (a corrupt or overflowed model), or use a smaller scale; "
                            "nothing was written.",
                        )
                    st.norm_sq += float(torch.dot(delta, delta))  # flat float32 pieces: one BLAS call
                if result.data_ptr() != stored.data_ptr():
                    stored.copy_(result)  # the one rounding to the output dtype
                if check_reconstruction is not None and out.is_float:
                    scratch = buffers.get(("rebuilt",), raw[1].dtype, count, device)
                    mismatched, max_err = check_reconstruction(raw, work, stored, out, scratch)
                    st.mismatched += mismatched
                    st.max_abs_error = max(st.max_abs_error, max_err)
                sink.write(out.name, stored)
    if progress:
        progress(total, total, "done")
    return stats


def check_device(device: str | torch.device) -> torch.device:
    """The device to combine on, refused up front with a clear message when it cannot be used."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ResidualsError(
            f"{device!r} is not a device name ({exc}).", "Use 'cpu', or 'cuda' on a machine with a GPU."
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ResidualsError(
            f"device {device!r} was asked for, but this machine has no usable CUDA GPU.",
            "Use device 'cpu' (the default), or run on a machine with a CUDA GPU.",
        )
    if resolved.type not in ("cpu", "cuda"):
        raise ResidualsError(
            f"device {device!r} is not supported.", "Use 'cpu', or 'cuda' on a machine with a GPU."
        )
    return resolved


def _engine_threads() -> int:
    """Threads for the elementwise work: the cores the writer's hashing and writing threads leave.

    The work is memory-bound; on two cores, intra-op threads only spin against those threads
    (measured here: 12.4 s of CPU for a 1B compute with two, 6.6 s with one).
    """
    return max(1, (os.cpu_count() or 1) - 2)


@contextlib.contextmanager
def _torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---- the three operations' arithmetic (on float32 work buffers they may overwrite) ------------
def residual_of(
    pieces: list[torch.Tensor], out: OutputTensor, into: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """R = instruct − base (operands: base, instruct), into `into` when given (base is kept)."""
    base, instruct = pieces
    residual = torch.sub(instruct, base, out=instruct if into is None else into)
    return residual, residual


def make_apply(scale: float) -> Callable:
    """out = target + scale·R (operands: target, residual); integer tensors get R unscaled."""

    def apply(
        pieces: list[torch.Tensor], out: OutputTensor, into: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        target, residual = pieces
        if scale != 1.0 and out.is_float:
            residual = residual.mul_(scale)
        return torch.add(target, residual, out=target if into is None else into), residual

    return apply


def make_merge(scale: float) -> Callable:
    """out = target + scale·(instruct − base) (operands: target, base, instruct), no residual written."""

    apply = make_apply(scale)

    def merge(
        pieces: list[torch.Tensor], out: OutputTensor, into: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        target, base, instruct = pieces
        return apply([target, instruct.sub_(base)], out, into)

    return merge


def reconstruction_check(
    raw: list[torch.Tensor],
    work: list[torch.Tensor],
    stored: torch.Tensor,
    out: OutputTensor,
    scratch: torch.Tensor,
) -> tuple[int, float]:
    """For compute: does base + stored residual give back instruct, bit for bit, in instruct's own dtype?

    `raw` holds the inputs as read (own dtypes); `work[0]` still holds the base in float32
    (`residual_of` never overwrites it) and is reused for the sum, which is rounded into
    `scratch` (the instruct's dtype): no fresh memory per piece.
    """
    instruct = raw[1]
    rebuilt = scratch.copy_(work[0].add_(stored.to(work[0].device)))
    if _same_bits(rebuilt, instruct):
        return 0, 0.0
    instruct = instruct.to(rebuilt.device)
    wrong = rebuilt != instruct
    errors = (rebuilt.float() - instruct.float())[wrong].abs()
    return int(wrong.count_nonzero()), float(errors.max()) if errors.numel() else 0.0


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality; on the CPU through numpy, which compares 10× faster than torch.equal here."""
    if a.device.type != "cpu" or b.device.type != "cpu":
        return torch.equal(a, b.to(a.device))
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool((a.view(as_int).numpy() == b.view(as_int).numpy()).all())


def describe_stats(stats: dict[str, TensorStats]) -> dict[str, Any]:
    mismatched = sum(s.mismatched for s in stats.values())
    numel = sum(s.numel for s in stats.values())
    return {
        "elements": numel,
        "mismatched_elements": mismatched,
        "max_abs_error": max((s.max_abs_error for s in stats.values()), default=0.0),
        "exact": mismatched == 0,
    }
