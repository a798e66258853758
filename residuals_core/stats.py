"""Per-layer and per-module norms of a residual, from per-tensor norms gathered while streaming.

Grouping works on tensor names alone: the first number after a `layers`/`h`/`blocks`-style
segment is the layer, and the module is recognised from common projection names, so any
architecture gets a sensible picture without a list of known models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .checkpoint import TensorSource, element_ranges
from .dtypes import as_float64

Progress = Callable[[int, int, str], None]
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers)\.(\d+)\.")
_ANY_NUMBER = re.compile(r"\.(\d+)\.")
_MODULES = [
    ("attn.q", ("q_proj", "query", ".wq.", "q_lin")),
    ("attn.k", ("k_proj", ".key", ".wk.", "k_lin")),
    ("attn.v", ("v_proj", ".value", ".wv.", "v_lin")),
    ("attn.qkv", ("qkv_proj", "c_attn", "query_key_value", "wqkv", "w_pack")),
    ("attn.o", ("o_proj", "out_proj", "dense.", "attn.c_proj", ".wo.", "out_lin")),
    ("mlp.gate", ("gate_proj", ".w1.", "gate_up_proj")),
    ("mlp.up", ("up_proj", "c_fc", "dense_h_to_4h", ".w3.", "fc1", "fc_in")),
    ("mlp.down", ("down_proj", "mlp.c_proj", "dense_4h_to_h", ".w2.", "fc2", "fc_out")),
    ("norm", ("norm", "ln_", ".ln", "layernorm")),
    ("embed", ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")),
    ("head", ("lm_head", "output.weight", "score")),
]


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name) or _ANY_NUMBER.search(name)
    return int(match.group(1)) if match else None


def module_of(name: str) -> str:
    lowered = name.lower()
    for module, needles in _MODULES:
        if any(needle in lowered for needle in needles):
            return module
    return "other"


def layer_label(name: str) -> str:
    layer = layer_of(name)
    if layer is not None:
        return str(layer)
    module = module_of(name)
    return {"embed": "embed", "head": "head", "norm": "final_norm"}.get(module, "other")


def summarize(tensors: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-layer and module×layer norms from {name: {norm, reference_norm, numel}}."""
    layers: dict[str, dict[str, float]] = {}
    grid: dict[tuple[str, str], float] = {}
    for name, st in tensors.items():
        label = layer_label(name)
        row = layers.setdefault(label, {"norm_sq": 0.0, "reference_norm_sq": 0.0, "numel": 0})
        row["norm_sq"] += st["norm"] ** 2
        row["reference_norm_sq"] += st.get("reference_norm", 0.0) ** 2
        row["numel"] += st["numel"]
        key = (module_of(name), label)
        grid[key] = grid.get(key, 0.0) + st["norm"] ** 2

    def order(label: str) -> tuple[int, int]:
        if label == "embed":
            return (0, 0)
        if label.isdigit():
            return (1, int(label))
        return (
            2,
            ["final_norm", "head", "other"].index(label) if label in ("final_norm", "head", "other") else 3,
        )

    per_layer = []
    for label in sorted(layers, key=order):
        row = layers[label]
        norm = math.sqrt(row["norm_sq"])
        ref = math.sqrt(row["reference_norm_sq"])
        per_layer.append(
            {
                "layer": label,
                "norm": norm,
                "reference_norm": ref,
                "relative": norm / ref if ref > 0 else None,
                "numel": row["numel"],
            }
        )
    total_sq = sum(r["norm_sq"] for r in layers.values())
    ref_sq = sum(r["reference_norm_sq"] for r in layers.values())
    return {
        "total_norm": math.sqrt(total_sq),
        "total_reference_norm": math.sqrt(ref_sq),
        "relative": math.sqrt(total_sq / ref_sq) if ref_sq > 0 else None,
        "layers": per_layer,
        "modules": [
            {"module": m, "layer": label, "norm": math.sqrt(v)} for (m, label), v in sorted(grid.items())
        ],
    }


def tensor_norms(
    source: TensorSource, *, piece_bytes: int = 8 * 1024 * 1024, progress: Progress | None = None
) -> dict[str, dict[str, float]]:
    """Norms of every tensor of a source, streamed; `progress(done, total, name)` after each tensor."""
    result = {}
    for done, (name, info) in enumerate(source.tensors.items(), start=1):
        norm_sq = 0.0
        if info.numel and info.dtype.is_floating_point:
            for start, stop in element_ranges(info.numel, piece_bytes):
                piece = as_float64(source.read_elements(name, start, stop), info.dtype)
                norm_sq += float(np.dot(piece, piece))
        result[name] = {"numel": info.numel, "norm": math.sqrt(norm_sq), "reference_norm": 0.0}
        if progress is not None:
            progress(done, len(source.tensors), name)
    return result


def checked_claims(
    computed: Mapping[str, dict[str, float]], claimed: Mapping[str, Any] | None
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Computed norms with the ‖θ_base‖ a manifest records, taken only where its ‖R‖ matches the weights.

    A manifest is written by whoever made the repo: its numbers are claims. The weights alone give
    ‖R‖ but not ‖θ_base‖; where the recorded ‖R‖ of a tensor equals the computed one, its recorded
    ‖θ_base‖ is believed. Returns the norms and {claimed, matched, mismatched} tensor counts.
    """
    claimed = claimed if isinstance(claimed, Mapping) else {}
    result, matched = {}, 0
    for name, row in computed.items():
        entry = claimed.get(name)
        recorded = entry.get("norm") if isinstance(entry, Mapping) else None
        reference = entry.get("reference_norm") if isinstance(entry, Mapping) else None
        agrees = (
            isinstance(recorded, (int, float))
            and isinstance(reference, (int, float))
            and math.isfinite(reference)
            and reference >= 0
            and math.isclose(recorded, row["norm"], rel_tol=1e-4, abs_tol=1e-6)
        )
        matched += agrees
        result[name] = {**row, "reference_norm": float(reference) if agrees else 0.0}
    return result, {"claimed": len(claimed), "matched": matched, "mismatched": len(claimed) - matched}


def cosine_by_layer(
    a: TensorSource, b: TensorSource, *, piece_bytes: int = 8 * 1024 * 1024, progress: Progress | None = None
) -> list[dict]:
    """Per-layer cosine similarity of two residual sets over their common tensors (portability picture)."""
    acc: dict[str, list[float]] = {}
    for done, (name, info) in enumerate(a.tensors.items(), start=1):
        other = b.tensors.get(name)
        if progress is not None:
            progress(done, len(a.tensors), name)
        if other is None or other.shape != info.shape or not info.dtype.is_floating_point:
            continue
        row = acc.setdefault(layer_label(name), [0.0, 0.0, 0.0])
        for start, stop in element_ranges(info.numel, piece_bytes):
            x = as_float64(a.read_elements(name, start, stop), info.dtype)
            y = as_float64(b.read_elements(name, start, stop), other.dtype)
            row[0] += float(np.dot(x, y))
            row[1] += float(np.dot(x, x))
            row[2] += float(np.dot(y, y))
    out = []
    for label, (xy, xx, yy) in acc.items():
        denom = math.sqrt(xx * yy)
        out.append({"layer": label, "cosine": xy / denom if denom > 0 else None})
    return out


def largest(tensors: Mapping[str, Mapping[str, Any]], count: int = 20) -> list[dict[str, Any]]:
    """The tensors with the largest ‖R‖, with their relative norm where the reference is known."""
    rows = [
        {
            "tensor": name,
            "layer": layer_label(name),
            "module": module_of(name),
            "norm": st["norm"],
            "relative": st["norm"] / st["reference_norm"] if st.get("reference_norm") else None,
            "numel": st["numel"],
        }
        for name, st in tensors.items()
    ]
    return sorted(rows, key=lambda r: -r["norm"])[:count]
