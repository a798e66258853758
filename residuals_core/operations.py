"""The three operations on folders and Hub ids: compute residuals, apply them, merge in one pass.

Each one resolves its inputs, plans from headers (rejecting bad input before any weight is
read), checks free disk, then streams into an `AtomicFolder`: weights, config, tokenizer,
generation config, a manifest with sha256 per file and norms, and a model card.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import arithmetic, card, hub, stats
from .checkpoint import (
    Checkpoint,
    RemoteCheckpoint,
    TensorInfo,
    TensorSource,
    dtype_from_name,
    dtype_name,
    read_json,
)
from .config import ResidualsConfig, build_config, shapes_hash
from .errors import ResidualsError
from .tokenizer import copy_tokenizer, has_tokenizer, tokenizer_length
from .writer import DEFAULT_MAX_SHARD_SIZE, AtomicFolder, ShardWriter, file_digest, matches_manifest

MANIFEST_NAME = "residuals_manifest.json"
DISK_MARGIN_BYTES = 64 * 1024 * 1024


@dataclass
class Result:
    """What an operation wrote, and what it measured on the way."""

    path: Path
    tensors: dict[str, dict[str, float]]
    summary: dict[str, Any]
    manifest: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    reconstruction: dict[str, Any] | None = None
    config: ResidualsConfig | None = None


# ---- inputs -------------------------------------------------------------------------------------
def open_model(
    name_or_path: str | os.PathLike,
    *,
    role: str,
    token: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> Checkpoint:
    """A model's checkpoint by its headers: a local folder, or a Hub id previewed without its weights.

    A Hub id comes back as a `RemoteCheckpoint`: plan with it, then `fetch_all` downloads.
    """
    name = str(name_or_path)
    try:
        if hub.is_hub_id(name):
            preview = hub.preview_remote(
                name, revision=revision, token=token, cache_dir=cache_dir, allow_pickle=allow_pickle
            )
            config_path = preview.folder / "config.json"
            remote = RemoteCheckpoint(preview, read_json(config_path) if config_path.is_file() else None)
            if preview.pickle:  # pickles have no header to preview
                return remote.fetch(token=token, cache_dir=cache_dir, allow_pickle=allow_pickle)
            return remote
        folder = hub.resolve_model_folder(name)
        checkpoint = Checkpoint.open(folder, allow_pickle=allow_pickle)
    except ResidualsError as exc:
        raise ResidualsError(f"{role} model: {exc.problem}", exc.fix) from exc
    checkpoint.label = name
    return checkpoint


def fetch_all(
    sources: list[Checkpoint], *, token: str | None = None, cache_dir=None, allow_pickle: bool = False
) -> list[Checkpoint]:
    """Download the weights of the Hub models among `sources` (call only once the plan is valid)."""
    return [
        s.fetch(token=token, cache_dir=cache_dir, allow_pickle=allow_pickle)
        if isinstance(s, RemoteCheckpoint)
        else s
        for s in sources
    ]


def plan_then_fetch(
    make_plan: Callable[[list[Checkpoint]], arithmetic.Plan],
    sources: list[Checkpoint],
    out_dir: str | os.PathLike,
    **fetch_options: Any,
) -> tuple[arithmetic.Plan, list[Checkpoint]]:
    """Plan from headers and check free disk (fails early), then download what is on the Hub.

    The plan is rebuilt only when something was downloaded, so that it reads from local files.
    """
    plan = make_plan(sources)
    check_free_disk(Path(out_dir), plan.total_bytes)
    fetched = fetch_all(sources, **fetch_options)
    if any(a is not b for a, b in zip(fetched, sources, strict=True)):
        plan = make_plan(fetched)
    return plan, fetched


def open_residuals(
    name_or_path: str | os.PathLike,
    *,
    token: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    verify: bool = True,
) -> tuple[Checkpoint, ResidualsConfig]:
    folder = hub.resolve_model_folder(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
    if not (folder / "config.json").is_file():
        raise ResidualsError(
            f"{name_or_path} has no config.json, so it is not a residuals folder.",
            "Point at a folder written by save_pretrained / compute (it holds config.json and model.safetensors).",
        )
    raw = read_json(folder / "config.json")
    if "shapes_hash" not in raw or "residuals_version" not in raw:
        raise ResidualsError(
            f"{name_or_path} looks like a model, not residuals (its config.json has no residuals fields).",
            "Compute residuals first (compute / Residuals.from_models), or use merge for three models.",
        )
    if verify:
        verify_manifest(folder)
    checkpoint = Checkpoint.open(folder)
    checkpoint.label = str(name_or_path)
    return checkpoint, ResidualsConfig.from_dict(raw)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_NAME
    return read_json(path) if path.is_file() else None


def verify_manifest(folder: Path) -> None:
    """Refuse a folder whose files do not match the checksums and sizes recorded when it was written."""
    ManifestCheck(folder).wait()


class ManifestCheck:
    """Check a folder against its manifest: sizes at once, checksums in a background thread.

    Reading and hashing a 16 GB residual takes seconds; `apply` starts the check, streams meanwhile (both
    read the same cached pages), and calls `wait()` before its output is renamed into place, so a
    corrupted input still yields no output.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._problem: ResidualsError | None = None
        manifest = read_manifest(self.folder)
        entries = (manifest or {}).get("files", {})  # no manifest: another tool wrote it, nothing to check
        for name, entry in entries.items():
            path = self.folder / name
            if not path.is_file():
                raise ResidualsError(
                    f"{folder}: {name} is missing (it is listed in {MANIFEST_NAME}).",
                    "The folder is incomplete: copy or download it again.",
                )
            if path.stat().st_size != entry["size"]:
                raise ResidualsError(
                    f"{folder}: {name} has {path.stat().st_size} bytes, {entry['size']} were written — truncated or altered.",
                    "Copy or download the folder again.",
                )
        self._thread = threading.Thread(target=self._hash_all, args=(entries,), daemon=True)
        self._thread.start()

    def _hash_all(self, entries: dict[str, dict[str, Any]]) -> None:
        try:
            for name, entry in entries.items():
                if not matches_manifest(self.folder / name, entry):
                    self._problem = ResidualsError(
                        f"{self.folder}: {name} does not match its recorded checksum — the file was altered or corrupted.",
                        "Copy or download the folder again; do not edit weight files by hand.",
                    )
                    return
        except OSError as exc:
            self._problem = ResidualsError(
                f"{self.folder}: could not read {exc.filename}: {exc.strerror}.",
                "Check the folder and try again.",
            )

    def wait(self) -> None:
        self._thread.join()
        if self._problem is not None:
            raise self._problem


# ---- helpers shared by the operations -----------------------------------------------------------
def check_free_disk(out_dir: Path, needed: int) -> None:
    probe = Path(out_dir).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + DISK_MARGIN_BYTES > free:
        raise ResidualsError(
            f"Not enough free disk at {probe}: the output needs about {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free.",
            "Free some space or choose an output folder on a larger disk.",
        )


def _float_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None:
        return None
    resolved = dtype_from_name(dtype)
    if not resolved.is_floating_point:
        raise ResidualsError(
            f"dtype {dtype!r} is not a floating-point type.", "Use float32, bfloat16 or float16."
        )
    return resolved


def _cast_floats(dtype: torch.dtype | None) -> Callable[[TensorInfo], torch.dtype]:
    return lambda info: dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _stream(
    plan: arithmetic.Plan,
    combine: Callable,
    folder: Path,
    *,
    max_shard_size: int | str,
    progress: arithmetic.Progress | None,
    device: str | torch.device,
    reference_operand: int | None,
    check_reconstruction: Callable | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, arithmetic.TensorStats]]:
    writer = ShardWriter(folder, [o.info for o in plan.outputs], max_shard_size=max_shard_size)
    by_name = {o.name: o for o in plan.outputs}
    plan = arithmetic.Plan([by_name[n] for n in writer.order], plan.vocab_rows, plan.notes)
    try:
        tensor_stats = arithmetic.execute(
            plan,
            combine,
            writer,
            reference_operand=reference_operand,
            check_reconstruction=check_reconstruction,
            device=device,
            progress=progress,
        )
        manifest = writer.close()
    except BaseException:
        writer.abort()
        raise
    return manifest, tensor_stats


def _finish_folder(
    folder: Path,
    weights_manifest: dict[str, dict[str, Any]],
    extra_files: list[str],
    sidecar: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Hash the non-weight files too, write the manifest; return {file: {sha256, size}}."""
    manifest = dict(weights_manifest)
    for name in extra_files:
        manifest[name] = file_digest(folder / name)
    _write_json(folder / MANIFEST_NAME, {"files": manifest, **sidecar})
    return manifest


def _close_all(*sources: TensorSource) -> None:
    for source in sources:
        source.close()


def plan_difference(
    base: TensorSource,
    instruct: TensorSource,
    *,
    target: TensorSource | None = None,
    out_dtype: torch.dtype | None,
    normalize_embeddings: bool,
    tokenizer_length: int | None,
) -> arithmetic.Plan:
    """The plan of compute (base, instruct) or of a one-pass merge (target, base, instruct), from headers."""
    roles = [("base", base), ("instruct", instruct)]
    if target is not None:
        roles.insert(0, ("target", target))
    return arithmetic.plan_tensors(
        roles,
        out_dtype=_cast_floats(out_dtype),
        normalize_embeddings=normalize_embeddings,
        vocab_sizes=[source.vocab_size for _, source in roles],
        min_vocab_rows=tokenizer_length if normalize_embeddings else None,
    )


# ---- compute ---------------------------------------------------------------------------------------
def compute_residuals(
    base: str | os.PathLike | Checkpoint,
    instruct: str | os.PathLike | Checkpoint,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype = torch.float32,
    normalize_embeddings: bool = True,
    instruct_tokenizer: Any = None,
    instruct_tokenizer_name: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    config: ResidualsConfig | None = None,
    card_name: str | None = None,
    progress: arithmetic.Progress | None = None,
) -> Result:
    """R = instruct − base, streamed into `out_dir` (a residuals folder the `residuals` package reads)."""
    arithmetic.check_device(device)  # before any download or planning
    storage = _float_dtype(dtype)
    base_ck = (
        base
        if isinstance(base, Checkpoint)
        else open_model(base, role="base", token=token, cache_dir=cache_dir, allow_pickle=allow_pickle)
    )
    inst_ck = (
        instruct
        if isinstance(instruct, Checkpoint)
        else open_model(
            instruct, role="instruct", token=token, cache_dir=cache_dir, allow_pickle=allow_pickle
        )
    )
    tokenizer_name, tok_len, save_tokenizer = instruct_tokenizer_info(
        inst_ck, instruct_tokenizer, instruct_tokenizer_name
    )

    def make_plan(sources: list[Checkpoint]) -> arithmetic.Plan:
        return plan_difference(
            *sources, out_dtype=storage, normalize_embeddings=normalize_embeddings, tokenizer_length=tok_len
        )

    plan, (base_ck, inst_ck) = plan_then_fetch(
        make_plan, [base_ck, inst_ck], out_dir, token=token, cache_dir=cache_dir, allow_pickle=allow_pickle
    )
    try:
        with AtomicFolder(out_dir, overwrite=overwrite) as target:
            weights, tensor_stats = _stream(
                plan,
                arithmetic.residual_of,
                target.path,
                max_shard_size=max_shard_size,
                progress=progress,
                device=device,
                reference_operand=0,
                check_reconstruction=arithmetic.reconstruction_check,
            )
            result = write_residuals_metadata(
                target.path,
                weights,
                plan=plan,
                tensor_stats={n: s.as_dict() for n, s in tensor_stats.items()},
                reconstruction=arithmetic.describe_stats(tensor_stats),
                base_name=base_ck.label,
                instruct_name=inst_ck.label,
                tokenizer_name=tokenizer_name,
                save_tokenizer=save_tokenizer,
                generation_config=inst_ck.folder / "generation_config.json",
                architecture=_architecture(inst_ck),
                config=config,
                license=license,
                language=language,
                tags=tags,
                card_name=card_name or Path(out_dir).name,
            )
    finally:
        _close_all(base_ck, inst_ck)
    result.path = Path(out_dir).absolute()
    return result


def instruct_tokenizer_info(inst_ck: Checkpoint, tokenizer: Any, tokenizer_name: str | None):
    """(name, length, saver) of the instruct tokenizer; fails early when there is none."""
    from .tokenizer import load_tokenizer

    if tokenizer is None and tokenizer_name is not None:
        tokenizer = load_tokenizer(tokenizer_name)
    if tokenizer is not None:
        name = tokenizer_name or getattr(tokenizer, "name_or_path", None) or inst_ck.label
        return name, len(tokenizer), lambda folder: tokenizer.save_pretrained(str(folder))
    if not has_tokenizer(inst_ck.folder):
        raise ResidualsError(
            f"The instruct model {inst_ck.label} has no tokenizer files; residuals are saved with the instruct tokenizer.",
            "Pass instruct_tokenizer_name=... (--instruct-tokenizer) naming the tokenizer to use.",
        )
    return (
        inst_ck.label,
        tokenizer_length(inst_ck.folder),
        lambda folder: copy_tokenizer(inst_ck.folder, folder),
    )


def _architecture(ck: Checkpoint) -> dict[str, Any]:
    cfg = ck.config or {}
    return {
        "architectures": cfg.get("architectures"),
        "model_type": cfg.get("model_type"),
        "num_hidden_layers": cfg.get("num_hidden_layers") or cfg.get("n_layer"),
        "vocab_size": ck.vocab_size,
        "tie_word_embeddings": ck.tie_word_embeddings,
    }


def write_residuals_metadata(
    folder: Path,
    weights_manifest: dict[str, dict[str, Any]],
    *,
    plan: arithmetic.Plan | None,
    tensor_stats: dict[str, dict[str, float]] | None,
    reconstruction: dict[str, Any] | None,
    base_name: str | None,
    instruct_name: str | None,
    tokenizer_name: str | None,
    save_tokenizer: Callable[[Path], Any] | None,
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
    if save_tokenizer is not None:
        save_tokenizer(folder)
    if generation_config is not None and Path(generation_config).is_file():
        shutil.copy2(generation_config, folder / "generation_config.json")
    infos = _infos_of(folder)
    if config is None:
        config = build_config(
            infos, tokenizer_name=tokenizer_name, base_model_name=base_name, instruct_model_name=instruct_name
        )
    else:
        config.shapes_hash, config.parameter_names_hash = shapes_hash(infos)
        config.param_count = len(infos)
    if license is not None:
        config.license = license
    if language is not None:
        config.language = language
    if tags is not None:
        config.tags = list(tags)
    _write_json(folder / "config.json", config.to_dict())
    extra = [*sorted(set(os.listdir(folder)) - before - set(weights_manifest)), "config.json"]
    summary = stats.summarize(tensor_stats) if tensor_stats else {}
    manifest = _finish_folder(
        folder,
        weights_manifest,
        sorted(set(extra)),
        {
            "kind": "residuals",
            "storage_dtype": config.dtype,
            "architecture": architecture or {},
            "vocab_rows": plan.vocab_rows if plan else None,
            "notes": plan.notes if plan else [],
            "reconstruction": reconstruction,
            "summary": summary,
            "tensors": tensor_stats or {},
        },
    )
    card.residuals_card(
        config, name=card_name, manifest=manifest, summary=summary, reconstruction=reconstruction
    ).save(folder / "README.md")
    return Result(
        path=folder,
        tensors=tensor_stats or {},
        summary=summary,
        manifest=manifest,
        notes=plan.notes if plan else [],
        reconstruction=reconstruction,
        config=config,
    )


def _infos_of(folder: Path) -> list[TensorInfo]:
    with Checkpoint.open(folder) as ck:
        return list(ck.tensors.values())


# ---- apply and merge -------------------------------------------------------------------------------
def _tied_output_is_optional(target: Checkpoint) -> Callable[[str, str], bool]:
    """Residuals of a tied model saved by the `residuals` package carry lm_head.weight too; skip it."""
    return lambda role, name: target.tie_word_embeddings and name in arithmetic.TIED_OUTPUT_NAMES


def apply_residuals(
    residuals: str | os.PathLike,
    target: str | os.PathLike | Checkpoint,
    out_dir: str | os.PathLike,
    *,
    scale: float = 1.0,
    dtype: str | torch.dtype | None = None,
    normalize_embeddings: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    progress: arithmetic.Progress | None = None,
) -> Result:
    """θ_out = θ_target + scale·R, streamed into a complete model folder."""
    arithmetic.check_device(device)  # before any download or planning
    out_dtype = _float_dtype(dtype)
    res_ck, res_cfg = open_residuals(residuals, token=token, cache_dir=cache_dir, verify=False)
    res_check = ManifestCheck(res_ck.folder)  # hashes alongside the arithmetic; waited for before publishing
    target_ck = (
        target
        if isinstance(target, Checkpoint)
        else open_model(target, role="target", token=token, cache_dir=cache_dir, allow_pickle=allow_pickle)
    )
    res_tok_len = tokenizer_length(res_ck.folder)
    target_hash = shapes_hash(target_ck.tensors.values())[0]

    def make_plan(sources: list[Checkpoint]) -> arithmetic.Plan:
        (target_src,) = sources
        return arithmetic.plan_tensors(
            [("target", target_src), ("residuals", res_ck)],
            out_dtype=_cast_floats(out_dtype),
            normalize_embeddings=normalize_embeddings,
            vocab_sizes=[target_src.vocab_size, (read_manifest(res_ck.folder) or {}).get("vocab_rows")],
            min_vocab_rows=res_tok_len if normalize_embeddings else None,
            optional_extra=_tied_output_is_optional(target_src),
            mismatch_hint=(
                f" These residuals were computed from {res_cfg.base_model_name or 'an unknown base'} "
                f"(shapes_hash {res_cfg.shapes_hash[:12]}…); the target's shapes_hash is {target_hash[:12]}…: "
                "apply them to a model of that architecture and size."
            ),
        )

    plan, (target_ck,) = plan_then_fetch(
        make_plan, [target_ck], out_dir, token=token, cache_dir=cache_dir, allow_pickle=allow_pickle
    )
    try:
        return _write_merged(
            plan,
            arithmetic.make_apply(scale),
            out_dir,
            target_ck=target_ck,
            tokenizer_source=res_ck.folder if has_tokenizer(res_ck.folder) else None,
            tokenizer_length_=res_tok_len,
            generation_config=res_ck.folder / "generation_config.json",
            out_dtype=out_dtype,
            lineage={
                "target": target_ck.label,
                "instruct": res_cfg.instruct_model_name,
                "base": res_cfg.base_model_name,
                "residuals": str(residuals),
            },
            scale=scale,
            license=res_cfg.license,
            language=res_cfg.language,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            device=device,
            progress=progress,
            before_publish=res_check.wait,
        )
    finally:
        _close_all(res_ck, target_ck)


def merge_models(
    base: str | os.PathLike | Checkpoint,
    instruct: str | os.PathLike | Checkpoint,
    target: str | os.PathLike | Checkpoint,
    out_dir: str | os.PathLike,
    *,
    scale: float = 1.0,
    dtype: str | torch.dtype | None = None,
    normalize_embeddings: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    progress: arithmetic.Progress | None = None,
) -> Result:
    """θ_out = θ_target + scale·(θ_instruct − θ_base) in one pass; no residuals are written."""
    arithmetic.check_device(device)  # before any download or planning
    out_dtype = _float_dtype(dtype)
    opened = [
        m
        if isinstance(m, Checkpoint)
        else open_model(m, role=role, token=token, cache_dir=cache_dir, allow_pickle=allow_pickle)
        for m, role in ((target, "target"), (base, "base"), (instruct, "instruct"))
    ]
    target_ck, base_ck, inst_ck = opened
    inst_tok_len = tokenizer_length(inst_ck.folder)

    def make_plan(sources: list[Checkpoint]) -> arithmetic.Plan:
        target_src, base_src, inst_src = sources
        return plan_difference(
            base_src,
            inst_src,
            target=target_src,
            out_dtype=out_dtype,
            normalize_embeddings=normalize_embeddings,
            tokenizer_length=inst_tok_len,
        )

    plan, opened = plan_then_fetch(
        make_plan, opened, out_dir, token=token, cache_dir=cache_dir, allow_pickle=allow_pickle
    )
    target_ck, base_ck, inst_ck = opened
    try:
        return _write_merged(
            plan,
            arithmetic.make_merge(scale),
            out_dir,
            target_ck=target_ck,
            tokenizer_source=inst_ck.folder if inst_tok_len else None,
            tokenizer_length_=inst_tok_len,
            generation_config=inst_ck.folder / "generation_config.json",
            out_dtype=out_dtype,
            lineage={
                "target": target_ck.label,
                "instruct": inst_ck.label,
                "base": base_ck.label,
                "residuals": None,
            },
            scale=scale,
            license=None,
            language=None,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            device=device,
            progress=progress,
        )
    finally:
        _close_all(*opened)


def _write_merged(
    plan: arithmetic.Plan,
    combine: Callable,
    out_dir: str | os.PathLike,
    *,
    target_ck: Checkpoint,
    tokenizer_source: Path | None,
    tokenizer_length_: int | None,
    generation_config: Path,
    out_dtype: torch.dtype | None,
    lineage: dict[str, str | None],
    scale: float,
    license: str | None,
    language: str | list[str] | None,
    max_shard_size: int | str,
    overwrite: bool,
    device: str | torch.device,
    progress: arithmetic.Progress | None,
    before_publish: Callable[[], None] | None = None,
) -> Result:
    with AtomicFolder(out_dir, overwrite=overwrite) as out:
        weights, tensor_stats = _stream(
            plan,
            combine,
            out.path,
            max_shard_size=max_shard_size,
            progress=progress,
            device=device,
            reference_operand=0,
        )
        before = set(os.listdir(out.path))
        _write_json(out.path / "config.json", _merged_model_config(target_ck, plan, out_dtype))
        rows = plan.vocab_rows or target_ck.vocab_size
        # the instruct tokenizer (chat template and all) when the result's vocabulary holds it
        if tokenizer_source is not None and (rows is None or (tokenizer_length_ or 0) <= rows):
            copy_tokenizer(tokenizer_source, out.path)
        else:
            copy_tokenizer(target_ck.folder, out.path)
        for candidate in (generation_config, target_ck.folder / "generation_config.json"):
            if candidate.is_file():
                shutil.copy2(candidate, out.path / "generation_config.json")
                break
        per_tensor = {n: s.as_dict() for n, s in tensor_stats.items()}
        summary = stats.summarize(per_tensor)
        extra = sorted(set(os.listdir(out.path)) - before)
        stored = _stored_dtypes(plan)
        manifest = _finish_folder(
            out.path,
            weights,
            extra,
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
            name=Path(out_dir).name,
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
        ).save(out.path / "README.md")
        if before_publish is not None:
            before_publish()  # e.g. the inputs' checksum check: raising here leaves no output
    return Result(
        path=Path(out_dir).absolute(),
        tensors=per_tensor,
        summary=summary,
        manifest=manifest,
        notes=plan.notes,
    )


def _stored_dtypes(plan: arithmetic.Plan) -> str:
    names = sorted({dtype_name(o.dtype) for o in plan.outputs if o.dtype.is_floating_point})
    return ", ".join(names) or "n/a"


def _merged_model_config(target_ck: Checkpoint, plan: arithmetic.Plan, out_dtype: torch.dtype | None) -> dict:
    config = dict(target_ck.config or {})
    if not config:
        raise ResidualsError(
            f"The target model {target_ck.label} has no config.json.",
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
        )
    return str(made)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    exist_ok: bool = True,
) -> str:
    """Push a residuals or merged-model folder with its card rewritten for `repo_id`; returns the URL."""
    return hub.push_folder(
        folder, repo_id, private=private, token=token, exist_ok=exist_ok, readme=render_card(folder, repo_id)
    )


def check_compatibility(
    base: str | os.PathLike,
    instruct: str | os.PathLike,
    *,
    target: str | os.PathLike | None = None,
    normalize_embeddings: bool = True,
    dtype: str | torch.dtype = torch.float32,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """What compute (or merge, with `target`) would do, from headers alone: seconds, no weight download.

    Raises the same ResidualsError the real run would; otherwise returns architecture, layers,
    vocabulary, tied embeddings, size on disk and the expected output size.
    """
    storage = _float_dtype(dtype)
    opened = [
        open_model(m, role=r, token=token, cache_dir=cache_dir)
        for m, r in ((base, "base"), (instruct, "instruct"))
    ]
    if target is not None:
        opened.append(open_model(target, role="target", token=token, cache_dir=cache_dir))
    try:
        base_ck, inst_ck = opened[:2]
        _, tok_len, _ = instruct_tokenizer_info(inst_ck, None, None)
        plan = plan_difference(
            base_ck,
            inst_ck,
            target=opened[2] if target is not None else None,
            out_dtype=storage if target is None else None,
            normalize_embeddings=normalize_embeddings,
            tokenizer_length=tok_len,
        )
    finally:
        _close_all(*opened)
    arch = _architecture(inst_ck)
    return {
        "architecture": (arch.get("architectures") or [arch.get("model_type")])[0],
        "model_type": arch.get("model_type"),
        "layers": arch.get("num_hidden_layers"),
        "vocab_size": {"base": base_ck.vocab_size, "instruct": inst_ck.vocab_size},
        "tokenizer_length": tok_len,
        "tie_word_embeddings": inst_ck.tie_word_embeddings,
        "tensors": len(plan.outputs),
        "parameters": sum(o.info.numel for o in plan.outputs),
        "size_on_disk": {c.label: c.total_bytes for c in opened},
        "expected_output_bytes": plan.total_bytes,
        "notes": plan.notes,
    }


def inspect_residuals(path: str | os.PathLike, *, token: str | None = None) -> dict[str, Any]:
    """Per-layer and per-module norms of a residuals (or merged) folder or Hub repo."""
    checkpoint, config = open_residuals(path, token=token)
    manifest = read_manifest(checkpoint.folder) or {}
    with checkpoint:
        tensors = manifest.get("tensors") or stats.tensor_norms(checkpoint)
    return {
        "path": str(path),
        "folder": str(checkpoint.folder),
        "base_model": config.base_model_name,
        "instruct_model": config.instruct_model_name,
        "dtype": config.dtype,
        "tensors": len(tensors),
        "reconstruction": manifest.get("reconstruction"),
        "largest": stats.largest(tensors),
        **stats.summarize(tensors),
    }


def compare_residuals(a: str | os.PathLike, b: str | os.PathLike, *, token: str | None = None) -> list[dict]:
    """Per-layer cosine similarity of two residual sets (e.g. two versions of one family)."""
    first, _ = open_residuals(a, token=token, verify=False)
    second, _ = open_residuals(b, token=token, verify=False)
    with first, second:
        return stats.cosine_by_layer(first, second)


def resolve_for_generation(name_or_path: str | os.PathLike, *, token: str | None = None) -> str:
    """A local folder for transformers to load: the folder itself, or a Hub id's downloaded snapshot."""
    return str(hub.resolve_model_folder(name_or_path, token=token))
