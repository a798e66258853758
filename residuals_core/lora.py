"""Smaller residuals: a LoRA adapter (PEFT's format) from the truncated SVD of each projection's residual.

For every 2-D weight of an attention or MLP projection, R = U Σ Vᵀ is cut to its largest r singular
values (the optimum in the Frobenius norm, Eckart–Young), and stored as PEFT expects it:
`lora_B = U_r Σ_r` (out × r) and `lora_A = V_rᵀ` (r × in) with `lora_alpha = r`, so that
`merge_and_unload()` adds exactly B·A. The rank is one number for all (`rank`), or per matrix the
smallest that keeps a share of ‖R‖² (`energy`). One matrix is in memory at a time.

The input embedding and the output head are adapted too, by default (PEFT's `lora_embedding_A/B`
for an nn.Embedding): on the demo family, leaving them out loses the instruction following.
`embeddings=False` leaves them out. Norms are never in the adapter (LoRA cannot express a norm's
delta); the card says what is left out, with the share of ‖R‖² it holds.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import TensorSource
from .dtypes import FLOAT32, to_float32, to_torch
from .errors import ResidualsError

# the projections LoRA adapts: Llama / Mistral / Qwen style (nn.Linear, weight out × in) and GPT-2's Conv1D
LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONV1D_PROJECTIONS = ("c_attn", "c_proj", "c_fc")
EMBEDDINGS = ("embed_tokens", "wte")  # nn.Embedding: PEFT's lora_embedding_A (r × rows) / _B (dim × r)
OUTPUT_HEADS = ("lm_head",)  # nn.Linear like the projections
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class MatrixReport:
    """What the cut kept of one matrix."""

    name: str
    shape: tuple[int, int]
    rank: int
    energy_kept: float  # share of ‖R‖² kept
    relative_error: float  # ‖R − R̂‖ / ‖R‖
    norm_sq: float  # ‖R‖²


@dataclass
class LoraReport:
    """The adapter's matrices, the tensors left out, and sizes."""

    matrices: list[MatrixReport] = field(default_factory=list)
    left_out: dict[str, float] = field(default_factory=dict)  # tensor -> its ‖R‖²
    adapter_bytes: int = 0
    residual_bytes: int = 0

    @property
    def relative_error(self) -> float:
        """‖R − R̂‖ / ‖R‖ over the adapted matrices."""
        total = sum(m.relative_error**2 * m.norm_sq for m in self.matrices)
        norm = sum(m.norm_sq for m in self.matrices)
        return math.sqrt(total / norm) if norm else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "matrices": [m.__dict__ for m in self.matrices],
            "left_out": self.left_out,
            "adapter_bytes": self.adapter_bytes,
            "residual_bytes": self.residual_bytes,
            "relative_error": self.relative_error,
        }


def adapted_module(name: str, *, embeddings: bool = True) -> str | None:
    """The module a weight belongs to when LoRA adapts it (`…q_proj.weight` -> `…q_proj`), else None."""
    if not name.endswith(".weight"):
        return None
    module = name.removesuffix(".weight")
    kinds = LINEAR_PROJECTIONS + CONV1D_PROJECTIONS + ((EMBEDDINGS + OUTPUT_HEADS) if embeddings else ())
    if module.rsplit(".", 1)[-1] in kinds:
        return module
    return None


def _is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDINGS


def choose_rank(singular_values: torch.Tensor, *, rank: int | None, energy: float | None) -> int:
    """`rank` (capped by the matrix), or the smallest rank whose σ² keep `energy` of the total."""
    full = singular_values.numel()
    if rank is not None:
        return max(1, min(rank, full))
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    return min(full, int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1)


def factorize(
    residual: torch.Tensor, *, rank: int | None, energy: float | None, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(B, A, energy kept, relative error) of the truncated SVD of one matrix, in float32."""
    matrix = residual.to(device=device, dtype=torch.float32)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = choose_rank(s, rank=rank, energy=energy)
    squares = s.double() ** 2
    total = float(squares.sum())
    kept = float(squares[:r].sum()) / total if total else 1.0
    error = math.sqrt(max(0.0, 1.0 - kept))  # Eckart–Young: the tail of the spectrum
    b = (u[:, :r] * s[:r]).contiguous().cpu()
    a = vh[:r].contiguous().cpu()
    return b, a, kept, error


def extract_lora(
    residuals: TensorSource,
    folder: Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    base_model: str | None = None,
    embeddings: bool = True,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> LoraReport:
    """Write adapter_config.json and adapter_model.safetensors for `residuals` into `folder`.

    With `embeddings`, the input embedding and the output head are adapted too (LoRA on an
    nn.Embedding is PEFT's `lora_embedding_A/B`); norms are always left out.
    """
    try:
        from peft import LoraConfig
    except ImportError:
        raise ResidualsError(
            "Exporting LoRA adapters needs the peft package.", "Install it: pip install peft"
        ) from None
    from safetensors.torch import save_file

    if (rank is None) == (energy is None):
        raise ResidualsError("Give either a rank or an energy share.", "Use --rank 8, or --energy 0.9.")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ResidualsError(f"rank {rank!r} is not a positive whole number.", "Use e.g. --rank 8.")
    if energy is not None and not (0 < energy <= 1):
        raise ResidualsError(f"energy {energy!r} is not a share in (0, 1].", "Use e.g. --energy 0.9.")
    names = list(residuals.tensors)
    modules = {n: adapted_module(n, embeddings=embeddings) for n in names}
    targets = [n for n in names if modules[n] is not None and len(residuals.tensors[n].shape) == 2]
    if not targets:
        raise ResidualsError(
            f"{residuals.label} has no attention or MLP projection weights that LoRA can adapt.",
            "Give residuals of a Llama-, Mistral-, Qwen- or GPT-2-style model.",
        )
    conv1d = {
        modules[n].rsplit(".", 1)[-1] in CONV1D_PROJECTIONS
        for n in targets
        if modules[n].rsplit(".", 1)[-1] not in EMBEDDINGS + OUTPUT_HEADS
    }
    if len(conv1d) > 1:
        raise ResidualsError(
            f"{residuals.label} mixes Linear and Conv1D projections.", "Export models of one kind."
        )
    fan_in_fan_out = conv1d.pop()
    report = LoraReport()
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for index, name in enumerate(names):
        if progress:
            progress(index, len(names), name)
        info = residuals.tensors[name]
        report.residual_bytes += info.nbytes
        delta = to_torch(residuals.read(name), info.dtype).float()
        if name not in targets:
            if info.dtype.is_floating_point:
                report.left_out[name] = float(torch.dot(delta.reshape(-1), delta.reshape(-1)))
            continue
        module = modules[name]
        head = module.rsplit(".", 1)[-1] in OUTPUT_HEADS
        # Conv1D stores (in, out); an embedding's delta is (Bᴬ)ᵀ in PEFT: factorize the (dim × rows) transpose
        transposed = _is_embedding(module) or (fan_in_fan_out and not head)
        matrix = delta.t() if transposed else delta
        b, a, kept, error = factorize(matrix, rank=rank, energy=energy, device=device)
        if _is_embedding(module):
            tensors[f"base_model.model.{module}.lora_embedding_A"] = a
            tensors[f"base_model.model.{module}.lora_embedding_B"] = b
        else:
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
        ranks[module] = a.shape[0]
        norm_sq = float(torch.dot(delta.reshape(-1), delta.reshape(-1)))
        report.matrices.append(MatrixReport(name, tuple(matrix.shape), a.shape[0], kept, error, norm_sq))
        del delta, matrix
    if progress:
        progress(len(names), len(names), "done")
    top = max(ranks.values())
    # one r and lora_alpha = r for all (scaling 1); where a matrix's rank differs, per-module patterns
    # (PEFT matches a pattern against the end of a module's name, after a dot)
    patterns = {re.escape(m): r for m, r in ranks.items() if r != top}
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    report.adapter_bytes = os.path.getsize(folder / ADAPTER_WEIGHTS)
    return report


class DifferenceSource(TensorSource):
    """instruct − base, tensor by tensor in float32, for export straight from two models."""

    def __init__(self, base: TensorSource, instruct: TensorSource):
        self.base, self.instruct = base, instruct
        self.label = f"{instruct.label} − {base.label}"
        missing = [n for n in instruct.tensors if n not in base.tensors]
        if missing:
            raise ResidualsError(
                f"The models do not have the same tensors: {', '.join(missing[:3])} only in {instruct.label}.",
                "Use a base model and its own instruct version (one architecture and size).",
            )
        # tensors whose shapes differ (vocabulary rows) are left out of an adapter anyway
        self.tensors = {
            n: info.__class__(n, FLOAT32, info.shape)
            for n, info in instruct.tensors.items()
            if base.tensors[n].shape == info.shape
        }

    def read_elements(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        difference = np.empty(stop - start, np.float32) if out is None else out[: stop - start]
        to_float32(
            self.instruct.read_elements(name, start, stop), self.instruct.tensors[name].dtype, difference
        )
        base = self.base.read_elements(name, start, stop)
        difference -= to_float32(base, self.base.tensors[name].dtype, np.empty(stop - start, np.float32))
        return difference

    def finish(self) -> None:
        self.base.finish()
        self.instruct.finish()

    def close(self) -> None:
        self.base.close()
        self.instruct.close()


def adapter_card(
    *,
    name: str,
    base_model: str | None,
    lineage: str,
    report: LoraReport,
    rank: int | None,
    energy: float | None,
) -> str:
    """A model card for the adapter (huggingface_hub's ModelCard), saying exactly what it holds and leaves out."""
    from huggingface_hub import ModelCard, ModelCardData

    from .card import hub_id_or_none

    hub_base = hub_id_or_none(base_model)
    left = sum(report.left_out.values())
    adapted = sum(m.norm_sq for m in report.matrices)
    share_left = left / (left + adapted) if left + adapted else 0.0
    ranks = sorted({m.rank for m in report.matrices})
    kinds = sorted(
        {n.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1] for n in report.left_out}
    )
    left_kinds = ", ".join(kinds[:6]) + (" …" if len(kinds) > 6 else "") or "none"
    embedded = any(_is_embedding(m.name.removesuffix(".weight")) for m in report.matrices)
    embedding_note = (
        "; the embedding and output head are adapted too (their LoRA factors have R's vocabulary rows: "
        "resize a target with fewer rows first)"
        if embedded
        else "; the embedding and output head were left out on request"
    )
    rule = (
        f"rank {rank} for every matrix"
        if rank is not None
        else f"the smallest rank keeping {energy:g} of ‖R‖² per matrix"
    )
    data = ModelCardData(
        base_model=hub_base,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["lora", "residuals", "task-arithmetic"],
    )
    body = f"""
# {name}: instruction residuals as a LoRA adapter

The instruction residual R = θ_instruct − θ_base ({lineage}) of every attention and MLP projection (and,
unless left out, of the embedding and output head), cut to
its largest singular values (truncated SVD in float32: the best approximation of its rank in the
Frobenius norm), {rule}: ranks {ranks[0]}–{ranks[-1]}. Load it on a continued-pre-trained version of the
base model to regain instruction following without instruction tuning.

## Usage

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{hub_base or "path/to/your-cpt-base"}")
model = PeftModel.from_pretrained(model, "{name}")
model = model.merge_and_unload()  # base + B·A on every adapted weight
```

## What it holds, and what it leaves out

- {len(report.matrices)} matrices adapted; over them ‖R − R̂‖/‖R‖ = {report.relative_error:.4f}.
- Left out: {len(report.left_out)} tensors ({left_kinds}), holding {100 * share_left:.1f}% of ‖R‖² — LoRA
  cannot express a norm's delta{embedding_note}.
- Size: {report.adapter_bytes / 1e6:.1f} MB, against {report.residual_bytes / 1e6:.1f} MB for the full residuals.

Made with Residuals Studio (`python -m residuals_core lora`).
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def svd_work(tensors: dict[str, Any], *, embeddings: bool = True) -> float:
    """m·n·min(m,n) summed over the matrices an export (or its preview) factorises: its cost in time,
    known from the headers, so a host can refuse what it cannot finish."""
    return float(
        sum(
            info.shape[0] * info.shape[1] * min(info.shape)
            for name, info in tensors.items()
            if info.dtype.is_floating_point
            and len(info.shape) == 2
            and adapted_module(name, embeddings=embeddings)
        )
    )


def preview_lora(
    residuals: TensorSource,
    *,
    rank: int | None = None,
    energy: float | None = None,
    embeddings: bool = True,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """What an export would keep, before anything is written: per layer the share of ‖R‖² kept (left-out
    tensors count as lost), the adapter's size and the full residual's. Singular values only."""
    from .stats import layer_label

    if (rank is None) == (energy is None):
        raise ResidualsError(
            "Give either a rank or an energy share.", "Use a rank such as 8, or an energy such as 0.9."
        )
    layers: dict[str, list[float]] = {}
    adapter_bytes = residual_bytes = 0
    for done, (name, info) in enumerate(residuals.tensors.items(), start=1):
        if progress is not None:
            progress(done, len(residuals.tensors), name)
        residual_bytes += info.nbytes
        if not info.dtype.is_floating_point:
            continue
        delta = to_torch(residuals.read(name), info.dtype).float()
        total = float(torch.dot(delta.reshape(-1), delta.reshape(-1)))
        kept = 0.0
        if adapted_module(name, embeddings=embeddings) and delta.dim() == 2:
            squares = torch.linalg.svdvals(delta.to(device)).double().cpu() ** 2
            r = choose_rank(squares.sqrt(), rank=rank, energy=energy)
            kept = float(squares[:r].sum())
            adapter_bytes += r * sum(delta.shape) * 4
        entry = layers.setdefault(layer_label(name), [0.0, 0.0])
        entry[0] += kept
        entry[1] += total
    rows = [{"layer": layer, "kept": k / t if t else 1.0} for layer, (k, t) in layers.items()]
    kept_all = sum(k for k, _ in layers.values()) / max(sum(t for _, t in layers.values()), 1e-30)
    return {
        "layers": rows,
        "kept": kept_all,
        "adapter_bytes": adapter_bytes,
        "residual_bytes": residual_bytes,
    }
