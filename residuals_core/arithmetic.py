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
MAX_VOCAB_GROWTH = 2  # a tokenizer that needs more than twice the model's rows is corrupt, not extended

Progress = Callable[[int, int, str], None]


@dataclass
class OutputTensor:
    """One tensor of the result: its shape and dtype, and which input tensor feeds each operand."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
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
    out_dtype: Callable[[TensorInfo], torch.dtype],
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
                dtype=out_dtype(infos[0]),
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
    operand: tuple[TensorSource, str],
    start: int,
    stop: int,
    buffer: torch.Tensor | None,
    fill: tuple[TensorSource, str] | None = None,
) -> torch.Tensor:
    """Elements [start, stop) of an operand (into `buffer` when the source can); past its end, the
    `fill` operand's elements where it has them, else zeros.

    An input with fewer vocabulary rows than the result ends earlier in flat order: its missing
    rows are exactly the tail.
    """
    source, name = operand
    have = min(stop, source.tensors[name].numel) - start
    if have >= stop - start:
        return source.read_elements(name, start, stop, out=buffer)
    piece = torch.zeros(stop - start, dtype=source.tensors[name].dtype)  # vocabulary padding: rare
    if have > 0:
        piece[:have] = source.read_elements(name, start, start + have)
    if fill is not None:
        begin = start + max(have, 0)
        end = min(stop, fill[0].tensors[fill[1]].numel)
        if end > begin:
            piece[begin - start : end - start] = _read_elements(fill, begin, end, None)
    return piece


def _non_finite_inputs(out: OutputTensor, start: int, stop: int) -> list[str]:
    """Which inputs hold NaN/Inf in these elements (re-read: the work buffers were overwritten)."""
    return [
        source.label
        for slot, (source, name) in enumerate(out.operands)
        if not torch.isfinite(_read_elements((source, name), start, stop, None, out.fill_for(slot))).all()
    ]


def _not_finite(
    out: OutputTensor, start: int, stop: int, combine: Callable, stored: torch.Tensor
) -> ResidualsError:
    """Why a written piece holds NaN/Inf: bad inputs, or a value beyond the output dtype's range at this α."""
    scale = getattr(combine, "scale", None)
    at = f" at scale α = {scale:g}" if scale is not None else ""
    bad = _non_finite_inputs(out, start, stop)
    if bad:
        return ResidualsError(
            f"The result for tensor {out.name!r} contains NaN or Inf: the input(s) {', '.join(bad)} already hold "
            "non-finite values there.",
            "Check those checkpoints (a corrupt or overflowed model); nothing was written.",
        )
    count = int((~torch.isfinite(stored)).sum())
    if stored.dtype != torch.float32:
        limit = torch.finfo(stored.dtype).max
        return ResidualsError(
            f"Tensor {out.name!r} overflows {str(stored.dtype).removeprefix('torch.')}{at}: {count} value(s) of one "
            f"piece exceed its range (±{limit:.5g}) once rounded, and would be written as Inf.",
            "Use a smaller scale, or write float32 (--dtype float32 / dtype=torch.float32); nothing was written.",
        )
    return ResidualsError(
        f"The result for tensor {out.name!r} overflows float32{at} ({count} value(s) of one piece are Inf).",
        "Use a smaller scale; nothing was written.",
    )


_SQRT_FLOAT32_MAX = math.sqrt(torch.finfo(torch.float32).max)  # ≈ 1.8e19


def _finite_by_norms(stored_dtype: torch.dtype, reference_sq: float, delta_sq: float) -> bool:
    """Whether the norms already taken prove a piece finite as written, saving a pass over it.

    A finite float32 sum of squares bounds every element by √(float32 max) ≈ 1.8e19 (an overflow,
    NaN or Inf could not come back to finite). The result is the delta, or the reference plus the
    delta, so it is bounded by 3.7e19: finite in any output dtype whose largest value is above that
    (float32, bfloat16), not in float16, whose pieces keep the check below.
    """
    return (
        math.isfinite(reference_sq)
        and math.isfinite(delta_sq)
        and torch.finfo(stored_dtype).max >= 2 * _SQRT_FLOAT32_MAX
    )


def _written_finite(result: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether a piece is finite as written, in the output dtype, for the price of one reduction.

    A float16 value overflows only when rounded, so a float32 check alone would pass it. For
    narrower outputs, the float32 result's range tells: within ±max of the output dtype, every
    value rounds to a finite one. For float32 outputs NaN/Inf propagate through a sum. Only a
    suspicious piece (or a sum that overflowed on its own) is checked element by element.
    """
    if result.numel() == 0:
        return True
    if stored.dtype.itemsize >= 4:
        if math.isfinite(float(result.sum())):
            return True
    else:
        low, high = torch.aminmax(result)
        limit = torch.finfo(stored.dtype).max
        if -limit <= float(low) and float(high) <= limit:  # NaN compares false
            return True
    return bool(torch.isfinite(stored).all())


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
    stats: dict[str, TensorStats] | None = None,
) -> dict[str, TensorStats]:
    """Stream every output tensor through `combine` into `sink`; return per-tensor norms.

    Each operand's rows are read into a reused buffer and converted into a reused float32 work
    buffer on `device` (float32 inputs on the CPU are read straight into it). `combine` may
    overwrite those work buffers and returns (result, delta): the result goes into a buffer the
    sink provides (computed straight into it when the output is float32, else cast into it) and
    is written; the delta's norm is recorded (the residual itself for compute, the scaled
    residual actually added for apply and merge). The result must be the delta, or the reference
    operand plus the delta: their norms then prove most pieces finite without another pass. `check_reconstruction` gets the inputs as
    read (own dtypes), the work buffers after `combine`, the stored piece, and a reused scratch
    buffer of the second input's dtype on `device`. `stats`: the dict to fill (a tensor's entry is
    final before its last piece is written, so a sink may read it when the file is done).
    """
    device = check_device(device)
    piece_bytes = piece_bytes or (DEFAULT_PIECE_BYTES if device.type == "cpu" else DEVICE_PIECE_BYTES)
    stats = {} if stats is None else stats
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
                    piece = _read_elements(operand, start, stop, read_buffer, out.fill_for(slot))
                    raw.append(piece)
                    work.append(
                        piece if piece.data_ptr() == work_buffer.data_ptr() else work_buffer.copy_(piece)
                    )
                reference_sq = 0.0
                if out.is_float and reference_operand is not None:  # before combine overwrites it
                    reference = work[reference_operand]
                    reference_sq = float(torch.dot(reference, reference))
                    st.reference_norm_sq += reference_sq
                stored = sink.buffer(out.dtype, count)
                into = stored if stored.dtype == work_dtype and stored.device == device else None
                result, delta = combine(work, out, into)
                if result.data_ptr() != stored.data_ptr():
                    stored.copy_(result)  # the one rounding to the output dtype
                if out.is_float:
                    delta_sq = float(torch.dot(delta, delta))  # flat float32 pieces: one BLAS call
                    if not (
                        _finite_by_norms(stored.dtype, reference_sq, delta_sq)
                        or _written_finite(result, stored)
                    ):
                        raise _not_finite(out, start, stop, combine, stored)
                    st.norm_sq += delta_sq
                if check_reconstruction is not None and out.is_float:
                    scratch = buffers.get(("rebuilt",), raw[1].dtype, count, device)
                    mismatched, max_err = check_reconstruction(raw, work, stored, out, scratch)
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
    check_scale(scale)

    def apply(
        pieces: list[torch.Tensor], out: OutputTensor, into: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        target, residual = pieces
        if scale != 1.0 and out.is_float:
            residual = residual.mul_(scale)
        return torch.add(target, residual, out=target if into is None else into), residual

    apply.scale = scale  # named in overflow messages
    return apply


def make_merge(scale: float) -> Callable:
    """out = target + scale·(instruct − base) (operands: target, base, instruct), no residual written."""

    apply = make_apply(scale)

    def merge(
        pieces: list[torch.Tensor], out: OutputTensor, into: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        target, base, instruct = pieces
        return apply([target, instruct.sub_(base)], out, into)

    merge.scale = scale
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
