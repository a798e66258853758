"""`ResidualsConfig`: the residuals folder's config.json, field for field as the `residuals` package has it.

The `residuals` 0.3.x reader builds this with `ResidualsConfig(**raw)` and breaks on unknown
top-level keys, so this project's extras (storage dtype, architecture, file hashes, norms) live
in the `library` mapping and in a sidecar file (`residuals_manifest.json`), never at the top level.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from .checkpoint import TensorInfo
from .dtypes import dtype_name

FORMAT_VERSION = "1.0"
DEFAULT_TAGS = ["residuals", "delta", "task-arithmetic", "finetune"]


@dataclass
class ResidualsConfig:
    residuals_version: str
    format: str
    dtype: str
    param_count: int
    shapes_hash: str
    parameter_names_hash: str
    tokenizer_name: str | None
    created_at: str
    library: dict[str, Any] = field(default_factory=dict)
    base_model_name: str | None = None
    instruct_model_name: str | None = None
    pipeline_tag: str | None = "text-generation"
    license: str | None = None
    language: str | list[str] | None = None
    tags: list[str] | None = None
    base_model_relation: str | None = "adapter"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ResidualsConfig:
        """Tolerant of unknown keys (kept under library['extra_config']) so newer writers still load."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        unknown = {k: v for k, v in raw.items() if k not in known}
        for required in ("residuals_version", "format", "dtype", "param_count", "shapes_hash"):
            kwargs.setdefault(required, "" if required != "param_count" else 0)
        kwargs.setdefault("parameter_names_hash", "")
        kwargs.setdefault("tokenizer_name", None)
        kwargs.setdefault("created_at", "")
        library = dict(kwargs.get("library") or {})
        if unknown:
            library.setdefault("extra_config", {}).update(unknown)
        kwargs["library"] = library
        return cls(**kwargs)


def shapes_hash(infos: Iterable[TensorInfo]) -> tuple[str, str]:
    """(shapes_hash, parameter_names_hash) exactly as the `residuals` package computes them."""
    by_name = {i.name: i for i in infos}
    names = sorted(by_name)
    names_hash = hashlib.sha256("|".join(names).encode()).hexdigest()
    shapes = hashlib.sha256("|".join(f"{n}:{list(by_name[n].shape)}" for n in names).encode()).hexdigest()
    return shapes, names_hash


def build_config(
    infos: list[TensorInfo],
    *,
    tokenizer_name: str | None,
    base_model_name: str | None,
    instruct_model_name: str | None,
    library_extra: dict[str, Any] | None = None,
) -> ResidualsConfig:
    shapes, names = shapes_hash(infos)
    dtypes = Counter(dtype_name(i.dtype) for i in infos)
    from . import __version__

    return ResidualsConfig(
        residuals_version=FORMAT_VERSION,
        format="pytorch",
        dtype=dtypes.most_common(1)[0][0] if dtypes else "float32",
        param_count=len(infos),
        shapes_hash=shapes,
        parameter_names_hash=names,
        tokenizer_name=tokenizer_name,
        created_at=datetime.now(timezone.utc).isoformat(),
        library={"package": "residuals", "producer": "residuals_core", "producer_version": __version__}
        | (library_extra or {}),
        base_model_name=base_model_name,
        instruct_model_name=instruct_model_name,
        pipeline_tag="text-generation",
        tags=list(DEFAULT_TAGS),
        base_model_relation="adapter",
    )
