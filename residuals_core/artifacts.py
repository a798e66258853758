"""Everything of a result but the weights: config, tokenizer, generation config, manifest and card.

Written into a sink's staging folder after the weights streamed, from what the plan and the
writer already know (no weight file is read back: with a Hub sink they are gone by then).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import arithmetic, card, stats
from .checkpoint import Checkpoint, TensorInfo, read_json
from .config import ResidualsConfig, build_config, shapes_hash
from .dtypes import DType, dtype_name
from .errors import ResidualsError
from .hub import HUB_PREFIX, is_hub_id
from .manifest import read_manifest, write_manifest
from .tokenizer import copy_tokenizer, has_tokenizer, load_tokenizer, tokenizer_length


@dataclass
class Result:
    """What an operation wrote, and what it measured on the way."""

    path: Path | None  # the local folder; None when the result went to the Hub
    tensors: dict[str, dict[str, float]]
    summary: dict[str, Any]
    manifest: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    reconstruction: dict[str, Any] | None = None
    config: ResidualsConfig | None = None
    url: str | None = None  # the Hub repo, when pushed

    @property
    def location(self) -> str:
        return self.url or str(self.path)


@dataclass(frozen=True)
class TokenizerChoice:
    """The tokenizer a result ships: its name, its length (vocabulary rows it needs) and how to save it."""

    name: str | None
    length: int | None
    save: Callable[[Path], Any] | None


def public_name(name: str | os.PathLike | None) -> str | None:
    """How a result names an input: a Hub id as it is, a local folder by its name only.

    Configs, manifests and cards travel (pushed to the Hub, shared, downloaded by strangers): a
    path in them tells everyone where things live on one machine (a Space's session folders, a
    home directory) and means nothing anywhere else.
    """
    if name is None:
        return None
    text = str(name)
    if is_hub_id(text):
        return text.removeprefix(HUB_PREFIX)
    return Path(text.rstrip("/")).name or text


def instruct_tokenizer_choice(
    inst: Checkpoint, tokenizer: Any = None, tokenizer_name: str | None = None
) -> TokenizerChoice:
    """The instruct side's tokenizer: one given explicitly, else the instruct model's files; fails early."""
    if tokenizer is None and tokenizer_name is not None:
        tokenizer = load_tokenizer(tokenizer_name)
    if tokenizer is not None:
        name = tokenizer_name or getattr(tokenizer, "name_or_path", None) or inst.label
        return TokenizerChoice(name, len(tokenizer), lambda folder: tokenizer.save_pretrained(str(folder)))
    if not has_tokenizer(inst.folder):
        raise ResidualsError(
            f"The instruct model {inst.label} has no tokenizer files; residuals are saved with the instruct tokenizer.",
            "Pass instruct_tokenizer_name=... (--instruct-tokenizer) naming the tokenizer to use.",
        )
    return TokenizerChoice(
        inst.label, tokenizer_length(inst.folder), lambda folder: copy_tokenizer(inst.folder, folder)
    )


def folder_tokenizer(folder: Path, name: str | None) -> TokenizerChoice:
    """The tokenizer saved in a folder (e.g. residuals'), or none."""
    if not has_tokenizer(folder):
        return TokenizerChoice(name, None, None)
    return TokenizerChoice(name, tokenizer_length(folder), lambda out: copy_tokenizer(folder, out))


def architecture_of(ck: Checkpoint) -> dict[str, Any]:
    cfg = ck.config or {}
    return {
        "architectures": cfg.get("architectures"),
        "model_type": cfg.get("model_type"),
        "num_hidden_layers": cfg.get("num_hidden_layers") or cfg.get("n_layer"),
        "vocab_size": ck.vocab_size,
        "tie_word_embeddings": ck.tie_word_embeddings,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _copy_generation_config(candidates: list[Path | None], folder: Path) -> None:
    for candidate in candidates:
        if candidate is not None and Path(candidate).is_file():
            shutil.copy2(candidate, folder / "generation_config.json")
            return


def write_residuals_files(
    folder: Path,
    weights: dict[str, dict[str, Any]],
    *,
    infos: list[TensorInfo],
    plan: arithmetic.Plan | None,
    tensor_stats: dict[str, dict[str, float]] | None,
    reconstruction: dict[str, Any] | None,
    base_name: str | None,
    instruct_name: str | None,
    tokenizer: TokenizerChoice,
    generation_config: Path | None = None,
    architecture: dict[str, Any] | None = None,
    config: ResidualsConfig | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    card_name: str = "<repo-or-folder>",
) -> Result:
    """Everything of a residuals folder but the weights: tokenizer, config.json, manifest, README."""
    before = set(os.listdir(folder))
    if tokenizer.save is not None:
        tokenizer.save(folder)
    _copy_generation_config([generation_config], folder)
    if config is None:
        config = build_config(
            infos,
            tokenizer_name=public_name(tokenizer.name),
            base_model_name=public_name(base_name),
            instruct_model_name=public_name(instruct_name),
        )
    else:
        config.shapes_hash, config.parameter_names_hash = shapes_hash(infos)
        config.param_count = len(infos)
        for key in ("tokenizer_name", "base_model_name", "instruct_model_name"):
            setattr(config, key, public_name(getattr(config, key)))
    if license is not None:
        config.license = license
    if language is not None:
        config.language = language
    if tags is not None:
        config.tags = list(tags)
    _write_json(folder / "config.json", config.to_dict())
    extra = sorted((set(os.listdir(folder)) - before - set(weights)) | {"config.json"})
    summary = stats.summarize(tensor_stats) if tensor_stats else {}
    notes = plan.notes if plan else []
    manifest = write_manifest(
        folder,
        weights,
        extra,
        {
            "kind": "residuals",
            "storage_dtype": config.dtype,
            "architecture": architecture or {},
            "vocab_rows": plan.vocab_rows if plan else None,
            "notes": notes,
            "reconstruction": reconstruction,
            "summary": summary,
            "tensors": tensor_stats or {},
        },
    )
    card.residuals_card(
        config, name=card_name, manifest=manifest, summary=summary, reconstruction=reconstruction, notes=notes
    ).save(folder / "README.md")
    return Result(
        path=folder,
        tensors=tensor_stats or {},
        summary=summary,
        manifest=manifest,
        notes=notes,
        reconstruction=reconstruction,
        config=config,
    )


def write_model_files(
    folder: Path,
    weights: dict[str, dict[str, Any]],
    *,
    plan: arithmetic.Plan,
    tensor_stats: dict[str, arithmetic.TensorStats],
    target: Checkpoint,
    tokenizer: TokenizerChoice,
    generation_config: Path | None,
    out_dtype: DType | None,
    lineage: dict[str, str | None],
    scale: float,
    license: str | None,
    language: str | list[str] | None,
    card_name: str,
) -> Result:
    """Everything of a merged model folder but the weights: config, tokenizer, generation config, manifest, card.

    It ships the instruct side's tokenizer (chat template and all) whenever the result's
    vocabulary holds it, else the target's own: one rule for apply and merge alike.
    """
    before = set(os.listdir(folder))
    lineage = {role: public_name(name) for role, name in lineage.items()}
    _write_json(folder / "config.json", merged_model_config(target, plan, out_dtype))
    rows = plan.vocab_rows or target.vocab_size
    if tokenizer.save is not None and (rows is None or (tokenizer.length or 0) <= rows):
        tokenizer.save(folder)
    else:
        copy_tokenizer(target.folder, folder)
    _copy_generation_config([generation_config, target.folder / "generation_config.json"], folder)
    per_tensor = {n: s.as_dict() for n, s in tensor_stats.items()}
    summary = stats.summarize(per_tensor)
    stored = stored_dtypes(plan)
    manifest = write_manifest(
        folder,
        weights,
        sorted(set(os.listdir(folder)) - before),
        {
            "kind": "merged",
            "lineage": lineage,
            "scale": scale,
            "storage_dtype": stored,
            "vocab_rows": plan.vocab_rows,
            "notes": plan.notes,
            "summary": summary,
            "tensors": per_tensor,
        },
    )
    card.merged_card(
        name=card_name,
        target=lineage["target"] or "",
        instruct=lineage["instruct"],
        base=lineage["base"],
        residuals=lineage["residuals"],
        scale=scale,
        dtype=stored,
        manifest=manifest,
        summary=summary,
        license=license,
        language=language,
        notes=plan.notes,
    ).save(folder / "README.md")
    return Result(path=folder, tensors=per_tensor, summary=summary, manifest=manifest, notes=plan.notes)


def stored_dtypes(plan: arithmetic.Plan) -> str:
    names = sorted({dtype_name(o.dtype) for o in plan.outputs if o.dtype.is_floating_point})
    return ", ".join(names) or "n/a"


def merged_model_config(target: Checkpoint, plan: arithmetic.Plan, out_dtype: DType | None) -> dict:
    config = dict(target.config or {})
    if not config:
        raise ResidualsError(
            f"The target model {target.label} has no config.json.",
            "Give a complete model folder (config.json next to the weights) as the target.",
        )
    holder = config["text_config"] if "vocab_size" not in config and "text_config" in config else config
    if plan.vocab_rows and holder.get("vocab_size") and plan.vocab_rows > holder["vocab_size"]:
        holder["vocab_size"] = plan.vocab_rows
    if out_dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype_name(out_dtype)
        config.setdefault("dtype", dtype_name(out_dtype))
    return config


def render_card(folder: str | os.PathLike, name: str) -> str | None:
    """The folder's model card written again for `name` (e.g. the repo id it is pushed to)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest:
        return None
    files = manifest.get("files", {})
    if manifest.get("kind") == "residuals":
        config = ResidualsConfig.from_dict(read_json(folder / "config.json"))
        made = card.residuals_card(
            config,
            name=name,
            manifest=files,
            summary=manifest.get("summary"),
            reconstruction=manifest.get("reconstruction"),
            notes=manifest.get("notes"),
        )
    else:
        lineage = manifest.get("lineage", {})
        made = card.merged_card(
            name=name,
            target=lineage.get("target") or "",
            instruct=lineage.get("instruct"),
            base=lineage.get("base"),
            residuals=lineage.get("residuals"),
            scale=manifest.get("scale", 1.0),
            dtype=manifest.get("storage_dtype", ""),
            manifest=files,
            summary=manifest.get("summary"),
            notes=manifest.get("notes"),
        )
    return str(made)
