"""compute, apply and merge, each a short orchestration of the data flow.

    open inputs (index + sources) → plan from headers → check the sink's disk → stream pieces
    into the sink's shard writer → check every input read (sha256 of Hub files) → write the
    small files (artifacts) → the sink publishes (rename into place, or one Hub commit)

Inputs are local folders or Hub ids (streamed, never downloaded); outputs a folder (`out_dir`)
or a Hub repo (`push_to=`). How the run reads and writes travels as one `Options`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import arithmetic, card, hub, stats
from .artifacts import (
    Result,
    TokenizerChoice,
    architecture_of,
    folder_tokenizer,
    instruct_tokenizer_choice,
    public_name,
    render_card,
    write_model_files,
    write_residuals_files,
)
from .checkpoint import Checkpoint, TensorInfo, TensorSource, read_json
from .config import ResidualsConfig, shapes_hash
from .dtypes import DType, dtype_from_name
from .errors import ResidualsError, reports_os_errors
from .manifest import MANIFEST_NAME, ManifestCheck, read_manifest
from .options import Options, make_options
from .sinks import Sink, check_disk, open_sink
from .tokenizer import tokenizer_files
from .writer import ShardPlan as ShardSplit
from .writer import ShardWriter
from .writer import plan_shards as split_into_shards

__all__ = [
    "ResidualsFolder",
    "Result",
    "apply_residuals",
    "check_compatibility",
    "compare_residuals",
    "compute_residuals",
    "export_lora",
    "inspect_residuals",
    "merge_models",
    "open_model",
    "open_residuals",
    "push_to_hub",
    "render_card",
    "sparsify_residuals",
]


# ---- inputs -------------------------------------------------------------------------------------
def open_model(
    name_or_path: str | os.PathLike | Checkpoint,
    *,
    role: str,
    options: Options | None = None,
    revision: str | None = None,
) -> Checkpoint:
    """A model's checkpoint by its headers: a local folder, or a Hub id whose weights will stream."""
    if isinstance(name_or_path, Checkpoint):
        return name_or_path
    options = options or Options()
    name = str(name_or_path)
    try:
        if hub.is_hub_id(name):
            return hub.open_hub_model(
                name,
                revision=revision,
                token=options.token,
                cache_dir=options.cache_dir,
                allow_pickle=options.allow_pickle,
                read_ahead_bytes=options.read_ahead_bytes,
                max_small_file_bytes=options.max_small_file_bytes,
            )
        folder = hub.resolve_model_folder(name)
        checkpoint = Checkpoint.open(folder, allow_pickle=options.allow_pickle)
    except ResidualsError as exc:
        raise ResidualsError(f"{role} model: {exc.problem}", exc.fix) from exc
    checkpoint.label = name
    return checkpoint


def open_models(models: list[tuple[Any, str]], options: Options) -> list[Checkpoint]:
    """Several inputs opened side by side (each a few Hub round trips); all closed again if one fails."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(models))) as pool:
        futures = [pool.submit(open_model, model, role=role, options=options) for model, role in models]
    failures = [f.exception() for f in futures if f.exception() is not None]
    if failures:
        _close_all(*(f.result() for f in futures if f.exception() is None))
        raise failures[0]
    return [f.result() for f in futures]


@dataclass
class ResidualsFolder:
    """A residuals folder or Hub repo, read once: its weights (a Checkpoint, streamed), config.json,
    manifest, tokenizer and vocabulary rows. Every user of residuals gets them from here."""

    checkpoint: Checkpoint
    config: ResidualsConfig
    manifest: dict[str, Any] | None  # None: written by another tool (e.g. the residuals package)

    @functools.cached_property
    def tokenizer(self) -> TokenizerChoice:
        """The tokenizer saved with the residuals (copied into a result), its length read once."""
        return folder_tokenizer(self.checkpoint.folder, self.config.tokenizer_name)

    @property
    def vocab_rows(self) -> int | None:
        return (self.manifest or {}).get("vocab_rows")

    def checksums(self) -> ManifestCheck:
        """The files against the manifest: sizes now, hashes in a background thread (`wait()` for them)."""
        return ManifestCheck(self.checkpoint, self.manifest)

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> ResidualsFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_residuals(
    name_or_path: str | os.PathLike,
    *,
    options: Options | None = None,
    revision: str | None = None,
    verify: bool = True,
) -> ResidualsFolder:
    """A residuals folder or Hub repo (streamed like any model), with its config and manifest; with
    `verify` its files are checked against the manifest before it is returned."""
    checkpoint = open_model(name_or_path, role="residuals", options=options, revision=revision)
    folder = checkpoint.folder
    try:
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
        opened = ResidualsFolder(checkpoint, ResidualsConfig.from_dict(raw), read_manifest(folder))
        if verify:
            opened.checksums().wait()
    except BaseException:
        checkpoint.close()
        raise
    return opened


def _float_dtype(dtype: str | Any | None) -> DType | None:
    if dtype is None:
        return None
    resolved = dtype_from_name(dtype)
    if not resolved.is_floating_point:
        raise ResidualsError(
            f"dtype {dtype!r} is not a floating-point type.", "Use float32, bfloat16 or float16."
        )
    return resolved


def _cast_floats(dtype: DType | None) -> Callable[[TensorInfo], DType]:
    return lambda info: dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype


def _close_all(*sources: TensorSource) -> None:
    for source in sources:
        source.close()


# ---- planning -------------------------------------------------------------------------------------
def plan_difference(
    base: TensorSource,
    instruct: TensorSource,
    *,
    target: TensorSource | None = None,
    out_dtype: DType | None,
    normalize_embeddings: bool,
    tokenizer_length: int | None,
    tokenizer_label: str = "the instruct tokenizer",
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
        pad_from={"instruct": "base"},  # a token the instruct model lacks: no difference, not −θ_base
        tokenizer_label=tokenizer_label,
    )


def _plan_apply(
    target: Checkpoint,
    opened: ResidualsFolder,
    *,
    out_dtype: DType | None,
    normalize_embeddings: bool,
    tokenizer_length: int | None,
    tokenizer_label: str = "the residuals' tokenizer",
) -> arithmetic.Plan:
    target_hash = shapes_hash(target.tensors.values())[0]
    config = opened.config
    return arithmetic.plan_tensors(
        [("target", target), ("residuals", opened.checkpoint)],
        out_dtype=_cast_floats(out_dtype),
        normalize_embeddings=normalize_embeddings,
        vocab_sizes=[target.vocab_size, opened.vocab_rows],
        min_vocab_rows=tokenizer_length if normalize_embeddings else None,
        tokenizer_label=tokenizer_label,
        # residuals of a tied model saved by the `residuals` package carry lm_head.weight too: skip it
        optional_extra=lambda role, name: target.tie_word_embeddings and name in arithmetic.TIED_OUTPUT_NAMES,
        mismatch_hint=(
            f" These residuals were computed from {config.base_model_name or 'an unknown base'} "
            f"(shapes_hash {config.shapes_hash[:12]}…); the target's shapes_hash is {target_hash[:12]}…: "
            "apply them to a model of that architecture and size."
        ),
    )


# ---- streaming into a sink ---------------------------------------------------------------------------
def stream_into(
    sink: Sink,
    plan: arithmetic.Plan,
    combine: Callable,
    options: Options,
    *,
    inputs: list[TensorSource],
    reference_operand: int | None,
    check_reconstruction: Callable | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, arithmetic.TensorStats]]:
    """Stream the plan into the sink's weight files; then check every input read (Hub sha256).

    The tensors are written in the order their bytes lie in the inputs (`reading_order`), so Hub
    inputs stream forward; the shard layout follows that order. A sink that takes only a share of
    the files (a split run) gets only those written, and the inputs read only their tensors' bytes.
    """
    plan, split = output_split(plan, options)
    tensor_stats: dict[str, arithmetic.TensorStats] = {}
    only = sink.share(split, {o.name: o.info for o in plan.outputs}, tensor_stats)
    writer = ShardWriter(
        sink.path,
        [o.info for o in plan.outputs],
        split=split,
        direct_io=options.direct_io,
        fsync=options.fsync,
        before_shard=sink.before_shard,
        shard_done=sink.shard_done,
        only_files=only,
    )
    by_name = {o.name: o for o in plan.outputs}
    plan = arithmetic.Plan([by_name[n] for n in writer.order], plan.vocab_rows, plan.notes)
    if only is not None:
        _read_only(plan, inputs)
    try:
        arithmetic.execute(
            plan,
            combine,
            writer,
            reference_operand=reference_operand,
            check_reconstruction=check_reconstruction,
            device=options.device,
            piece_bytes=options.piece_bytes,
            progress=options.progress,
            stats=tensor_stats,
        )
        weights = writer.close()
    except BaseException:
        writer.abort()
        raise
    for source in inputs:
        source.finish()
    return sink.gather(weights, tensor_stats)


def output_split(plan: arithmetic.Plan, options: Options) -> tuple[arithmetic.Plan, ShardSplit]:
    """The plan in reading order and the weight files it is written as (names and tensors)."""
    plan = arithmetic.reading_order(plan)
    return plan, split_into_shards([o.info for o in plan.outputs], options.max_shard_bytes)


def _read_only(plan: arithmetic.Plan, inputs: list[TensorSource]) -> None:
    """Each input reads only the tensors this plan's outputs use (a share of a split run)."""
    used: dict[int, set[str]] = {id(source): set() for source in inputs}
    for out in plan.outputs:
        for source, name in out.operands:
            used.setdefault(id(source), set()).add(name)
    for source in inputs:
        source.read_only(used[id(source)])


def write_result(
    out_dir: str | os.PathLike | None,
    options: Options,
    *,
    inputs: list[TensorSource],
    shard_bytes: list[int],
    write: Callable[[Sink], Result],
    tokenizer_folders: list[Path] | None = None,
    card_data: Any = None,
    before_publish: Callable[[], None] | None = None,
    plan: arithmetic.Plan | None = None,
) -> Result:
    """The one way a result is written, whatever it holds (residuals, a merged model, an adapter).

    Open the sink (a folder, or the Hub repo `options.push_to` after the Hub accepted the card's
    metadata `card_data`), check before any work that its disk holds the shards `shard_bytes` plus
    the tokenizer the result may copy from `tokenizer_folders`, let `write` fill it (weights, then
    small files) and return its Result, run `before_publish` (a check whose failure must leave no
    output), then publish: the folder renamed into place, or the one commit. The output never
    touches `inputs`. With `options.plan_only` nothing is written: the Result describes `plan`.
    A share of a split run that leaves shards to other shares returns a Result saying so.
    """
    from .split_run import PartWritten, describe_part

    if options.plan_only:
        if plan is None:
            raise ResidualsError(
                "This command cannot be planned ahead or split.", "Run it as one job, without --shards."
            )
        return Result(path=None, tensors={}, summary=describe_plan(plan, options, inputs), manifest={})
    metadata = card.metadata_block(card_data) if card_data is not None else None
    sink = open_sink(out_dir, options, inputs=inputs, card_metadata=metadata)
    small = max(
        (sum(p.stat().st_size for p in tokenizer_files(f)) for f in tokenizer_folders or []), default=0
    )
    check_disk(sink, shard_bytes, small)
    try:
        with sink:
            result = write(sink)
            if before_publish is not None:
                before_publish()
    except PartWritten as part:
        summary = {"part": describe_part(part), "written": part.written, "present": part.present}
        return Result(path=None, tensors={}, summary=summary, manifest={}, url=sink.location)
    if getattr(sink, "repo_id", None):
        result.path, result.url = None, sink.location
    else:
        result.path = Path(sink.location)
    return result


def plan_shards(plan: arithmetic.Plan, options: Options) -> list[int]:
    """The sizes of the weight files a plan's output will be written as."""
    plan, split = output_split(plan, options)
    return split.file_bytes({o.name: o.info for o in plan.outputs})


def describe_plan(plan: arithmetic.Plan, options: Options, inputs: list[TensorSource]) -> dict[str, Any]:
    """What a run would write, from headers (`plan_only`): its weight files with sizes, the plan's
    fingerprint, and the commit each Hub input was read at (to pin the shares of a split run)."""
    from .split_run import plan_fingerprint

    plan, split = output_split(plan, options)
    specs = {o.name: o.info for o in plan.outputs}
    return {
        "shards": [
            {"file": file, "bytes": size}
            for (file, _), size in zip(split.files, split.file_bytes(specs), strict=True)
        ],
        "fingerprint": plan_fingerprint(split, specs),
        "read_bytes": sum(
            source.tensors[name].nbytes for out in plan.outputs for source, name in out.operands
        ),
        "inputs": {
            source.label: next(iter(source.readers.values())).location.commit
            for source in inputs
            if getattr(source, "remote", False) and source.readers
        },
    }


def sink_name(sink: Sink) -> str:
    """How a result's card names it: its Hub repo, or its folder's name."""
    return getattr(sink, "repo_id", None) or Path(sink.location).name


# ---- compute ---------------------------------------------------------------------------------------
@reports_os_errors
def compute_residuals(
    base: str | os.PathLike | Checkpoint,
    instruct: str | os.PathLike | Checkpoint,
    out_dir: str | os.PathLike | None = None,
    *,
    dtype: str | Any = "float32",
    normalize_embeddings: bool = True,
    instruct_tokenizer: Any = None,
    instruct_tokenizer_name: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    config: ResidualsConfig | None = None,
    card_name: str | None = None,
    options: Options | None = None,
    **option_overrides: Any,
) -> Result:
    """R = instruct − base, streamed into `out_dir` or the Hub repo `push_to` (a residuals folder
    the `residuals` package reads). Further keywords are `Options` fields (device, token, push_to, ...)."""
    options = make_options(options, option_overrides)
    arithmetic.check_device(options.device)  # before any Hub request
    storage = _float_dtype(dtype)
    base_ck, inst_ck = open_models([(base, "base"), (instruct, "instruct")], options)
    try:
        tokenizer = instruct_tokenizer_choice(inst_ck, instruct_tokenizer, instruct_tokenizer_name)
        plan = plan_difference(
            base_ck,
            inst_ck,
            out_dtype=storage,
            normalize_embeddings=normalize_embeddings,
            tokenizer_length=tokenizer.length,
            tokenizer_label=f"the tokenizer of {tokenizer.name}",
        )
        card_data = card.residuals_card_data(
            base=public_name(base_ck.label),
            instruct=public_name(inst_ck.label),
            license=license if license is not None else config.license if config else None,
            language=language if language is not None else config.language if config else None,
            tags=tags if tags is not None else config.tags if config else None,
        )

        def write(sink: Sink) -> Result:
            weights, tensor_stats = stream_into(
                sink,
                plan,
                arithmetic.residual_of,
                options,
                inputs=[base_ck, inst_ck],
                reference_operand=0,
                check_reconstruction=arithmetic.reconstruction_check,
            )
            return write_residuals_files(
                sink.path,
                weights,
                infos=[o.info for o in plan.outputs],
                plan=plan,
                tensor_stats={n: s.as_dict() for n, s in tensor_stats.items()},
                reconstruction=arithmetic.describe_stats(tensor_stats),
                base_name=base_ck.label,
                instruct_name=inst_ck.label,
                tokenizer=tokenizer,
                generation_config=inst_ck.folder / "generation_config.json",
                architecture=architecture_of(inst_ck),
                config=config,
                license=license,
                language=language,
                tags=tags,
                card_name=card_name or sink_name(sink),
            )

        return write_result(
            out_dir,
            options,
            inputs=[base_ck, inst_ck],
            shard_bytes=plan_shards(plan, options),
            write=write,
            tokenizer_folders=[inst_ck.folder],
            card_data=card_data,
            plan=plan,
        )
    finally:
        _close_all(base_ck, inst_ck)


# ---- apply and merge -------------------------------------------------------------------------------
@reports_os_errors
def apply_residuals(
    residuals: str | os.PathLike,
    target: str | os.PathLike | Checkpoint,
    out_dir: str | os.PathLike | None = None,
    *,
    scale: float = 1.0,
    dtype: str | Any | None = None,
    normalize_embeddings: bool = True,
    options: Options | None = None,
    **option_overrides: Any,
) -> Result:
    """θ_out = θ_target + scale·R, streamed into a complete model folder or Hub repo."""
    options = make_options(options, option_overrides)
    arithmetic.check_device(options.device)
    arithmetic.check_scale(scale)
    out_dtype = _float_dtype(dtype)
    opened = open_residuals(residuals, options=options, verify=False)
    res_ck, res_cfg = opened.checkpoint, opened.config
    try:
        res_check = opened.checksums()  # hashes alongside the arithmetic; waited for before publishing
        target_ck = open_model(target, role="target", options=options)
    except BaseException:
        res_ck.close()
        raise
    try:
        plan = _plan_apply(
            target_ck,
            opened,
            out_dtype=out_dtype,
            normalize_embeddings=normalize_embeddings,
            tokenizer_length=opened.tokenizer.length,
            tokenizer_label=f"the tokenizer saved with {residuals}",
        )
        if opened.manifest is None:
            plan.notes.append(
                f"{public_name(residuals)} has no {MANIFEST_NAME} (it was written by another tool, e.g. the "
                "residuals package): "
                "its files could not be checked against recorded checksums"
            )
        return _merge_into(
            out_dir,
            plan,
            arithmetic.make_apply(scale),
            options,
            inputs=[target_ck, res_ck],
            target=target_ck,
            tokenizer=opened.tokenizer,
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
            tokenizer_folders=[res_ck.folder],
            before_publish=res_check.wait,
        )
    finally:
        _close_all(res_ck, target_ck)


@reports_os_errors
def merge_models(
    base: str | os.PathLike | Checkpoint,
    instruct: str | os.PathLike | Checkpoint,
    target: str | os.PathLike | Checkpoint,
    out_dir: str | os.PathLike | None = None,
    *,
    scale: float = 1.0,
    dtype: str | Any | None = None,
    normalize_embeddings: bool = True,
    instruct_tokenizer: Any = None,
    instruct_tokenizer_name: str | None = None,
    options: Options | None = None,
    **option_overrides: Any,
) -> Result:
    """θ_out = θ_target + scale·(θ_instruct − θ_base) in one pass; no residuals are written.

    The result's vocabulary and tokenizer follow the same rule as compute-then-apply.
    """
    options = make_options(options, option_overrides)
    arithmetic.check_device(options.device)
    arithmetic.check_scale(scale)
    out_dtype = _float_dtype(dtype)
    opened = open_models([(target, "target"), (base, "base"), (instruct, "instruct")], options)
    try:
        target_ck, base_ck, inst_ck = opened
        if instruct_tokenizer is not None or instruct_tokenizer_name is not None:
            tokenizer = instruct_tokenizer_choice(inst_ck, instruct_tokenizer, instruct_tokenizer_name)
        else:
            tokenizer = folder_tokenizer(inst_ck.folder, inst_ck.label)
        plan = plan_difference(
            base_ck,
            inst_ck,
            target=target_ck,
            out_dtype=out_dtype,
            normalize_embeddings=normalize_embeddings,
            tokenizer_length=tokenizer.length,
            tokenizer_label=f"the tokenizer of {tokenizer.name}",
        )
        return _merge_into(
            out_dir,
            plan,
            arithmetic.make_merge(scale),
            options,
            inputs=opened,
            target=target_ck,
            tokenizer=tokenizer,
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
            tokenizer_folders=[inst_ck.folder],
        )
    finally:
        _close_all(*opened)


def _merge_into(
    out_dir: str | os.PathLike | None,
    plan: arithmetic.Plan,
    combine: Callable,
    options: Options,
    *,
    inputs: list[TensorSource],
    target: Checkpoint,
    tokenizer: TokenizerChoice,
    generation_config: Path,
    out_dtype: DType | None,
    lineage: dict[str, str | None],
    scale: float,
    license: str | None,
    language: str | list[str] | None,
    tokenizer_folders: list[Path],
    before_publish: Callable[[], None] | None = None,
) -> Result:
    card_data = card.merged_card_data(
        target=public_name(lineage["target"]),
        instruct=public_name(lineage["instruct"]),
        license=license,
        language=language,
    )

    def write(sink: Sink) -> Result:
        weights, tensor_stats = stream_into(sink, plan, combine, options, inputs=inputs, reference_operand=0)
        return write_model_files(
            sink.path,
            weights,
            plan=plan,
            tensor_stats=tensor_stats,
            target=target,
            tokenizer=tokenizer,
            generation_config=generation_config,
            out_dtype=out_dtype,
            lineage=lineage,
            scale=scale,
            license=license,
            language=language,
            card_name=sink_name(sink),
        )

    return write_result(
        out_dir,
        options,
        inputs=inputs,
        shard_bytes=plan_shards(plan, options),
        write=write,
        tokenizer_folders=[target.folder, *tokenizer_folders],
        card_data=card_data,
        before_publish=before_publish,  # e.g. the residuals' checksum check: raising here leaves no output
        plan=plan,
    )


# ---- pushing finished folders, checks and views -----------------------------------------------------
@reports_os_errors
def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    exist_ok: bool = True,
) -> str:
    """Push a finished residuals or merged-model folder with its card rewritten for `repo_id`; returns the URL."""
    return hub.push_folder(
        folder, repo_id, private=private, token=token, exist_ok=exist_ok, readme=render_card(folder, repo_id)
    )


@reports_os_errors
def check_compatibility(
    base: str | os.PathLike,
    instruct: str | os.PathLike,
    *,
    target: str | os.PathLike | None = None,
    normalize_embeddings: bool = True,
    dtype: str | Any = "float32",
    options: Options | None = None,
    **option_overrides: Any,
) -> dict[str, Any]:
    """What compute (or merge, with `target`) would do, from headers alone: seconds, no weight read.

    Raises the same ResidualsError the real run would; otherwise returns architecture, layers,
    vocabulary, tied embeddings, size on disk and the expected output size. Further keywords are
    `Options` fields (token, cache_dir, ...).
    """
    storage = _float_dtype(dtype)
    options = make_options(options, option_overrides)
    roles = [(base, "base"), (instruct, "instruct"), (target, "target")]
    opened = open_models([(m, r) for m, r in roles if m is not None], options)
    try:
        base_ck, inst_ck = opened[:2]
        tok_len = instruct_tokenizer_choice(inst_ck).length
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
    arch = architecture_of(inst_ck)
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


@reports_os_errors
def inspect_residuals(
    path: str | os.PathLike,
    *,
    options: Options | None = None,
    **option_overrides: Any,
) -> dict[str, Any]:
    """Per-layer and per-module norms of a residuals folder or Hub repo, computed from its weights.

    Every norm shown is measured here (the weights are streamed once). What the repo only claims —
    its lineage, and the per-tensor numbers of its manifest — is returned as such: `claims` counts
    the recorded tensors and how many of their ‖R‖ match the weights; ‖θ_base‖, which the weights
    cannot give, is taken from the manifest only for those that match.
    """
    options = make_options(options, option_overrides)
    with open_residuals(path, options=options, verify=False) as opened:
        checks = (
            opened.checksums()
        )  # hashes beside the norms' stream (both read the same pages), not before it
        computed = stats.tensor_norms(opened.checkpoint, progress=options.progress)
        opened.checkpoint.finish()  # a Hub file's bytes against its sha256
        checks.wait()
    checkpoint, config, manifest = opened.checkpoint, opened.config, opened.manifest or {}
    tensors, claims = stats.checked_claims(computed, manifest.get("tensors"))
    return {
        "path": str(path),
        "folder": str(checkpoint.folder),
        "base_model": config.base_model_name,
        "instruct_model": config.instruct_model_name,
        "dtype": config.dtype,
        "tensors": len(tensors),
        "claims": claims,
        "reconstruction": manifest.get("reconstruction"),
        "largest": stats.largest(tensors),
        **stats.summarize(tensors),
    }


@reports_os_errors
def compare_residuals(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    options: Options | None = None,
    **option_overrides: Any,
) -> list[dict]:
    """Per-layer cosine similarity of two residual sets (e.g. two versions of one family)."""
    options = make_options(options, option_overrides)
    with (
        open_residuals(a, options=options, verify=False) as first,
        open_residuals(b, options=options, verify=False) as second,
    ):
        return stats.cosine_by_layer(first.checkpoint, second.checkpoint, progress=options.progress)


def resolve_for_generation(name_or_path: str | os.PathLike, *, options: Options | None = None) -> str:
    """A local folder for transformers to load: the folder itself, or a Hub id's downloaded snapshot."""
    options = options or Options()
    return str(
        hub.resolve_model_folder(
            name_or_path,
            token=options.token,
            cache_dir=options.cache_dir,
            max_small_file_bytes=options.max_small_file_bytes,
        )
    )


# ---- smaller residuals -------------------------------------------------------------------------------
@reports_os_errors
def export_lora(
    residuals: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    base: str | os.PathLike | Checkpoint | None = None,
    instruct: str | os.PathLike | Checkpoint | None = None,
    rank: int | None = None,
    energy: float | None = None,
    embeddings: bool = True,
    options: Options | None = None,
    **option_overrides: Any,
) -> Result:
    """A PEFT LoRA adapter of residuals (a folder or Hub id), or straight from `base` and `instruct`.

    `embeddings=False` leaves the embedding and output head out (on the demo family that loses the
    instruction following: see the README's quality table).

    Written into `out_dir` or the Hub repo `push_to`, with a card saying what it holds and leaves out.
    """
    from .lora import DifferenceSource, adapted_module, adapter_card, extract_lora

    options = make_options(options, option_overrides)
    arithmetic.check_device(options.device)
    if (residuals is None) == (base is None and instruct is None) or (
        residuals is None and None in (base, instruct)
    ):
        raise ResidualsError(
            "Give residuals, or both a base and an instruct model (not both kinds).",
            "Use --residuals R, or --base B --instruct I.",
        )
    if residuals is not None:
        opened = open_residuals(residuals, options=options)
        source, config = opened.checkpoint, opened.config
        inputs: list[TensorSource] = [source]
        base_name, instruct_name = config.base_model_name, config.instruct_model_name
    else:
        inputs = open_models([(base, "base"), (instruct, "instruct")], options)
        source = DifferenceSource(*inputs)
        base_name, instruct_name = inputs[0].label, inputs[1].label
    try:
        shapes = [
            i.shape
            for n, i in source.tensors.items()
            if adapted_module(n, embeddings=embeddings) and len(i.shape) == 2
        ]
        bound = sum((min(rank, *s) if rank else min(s)) * sum(s) * 4 for s in shapes)

        def write(sink: Sink) -> Result:
            report = extract_lora(
                source,
                sink.path,
                rank=rank,
                energy=energy,
                base_model=public_name(base_name),
                embeddings=embeddings,
                device=str(options.device),
                progress=options.progress,
            )
            source.finish()
            (sink.path / "lora_report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
            (sink.path / "README.md").write_text(
                adapter_card(
                    name=sink_name(sink),
                    base_model=public_name(base_name),
                    lineage=f"{card.code_span(public_name(instruct_name))} − {card.code_span(public_name(base_name))}",
                    report=report,
                    rank=rank,
                    energy=energy,
                ),
                encoding="utf-8",
            )
            return Result(path=None, tensors={}, summary=report.as_dict(), manifest={})

        return write_result(out_dir, options, inputs=inputs, shard_bytes=[bound], write=write)
    finally:
        _close_all(source)


@reports_os_errors
def sparsify_residuals(
    residuals: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    dare: float | None = None,
    trim: float | None = None,
    seed: int = 0,
    options: Options | None = None,
    **option_overrides: Any,
) -> Result:
    """Residuals with DARE (`dare`: drop rate) and/or magnitude trimming (`trim`: share kept per tensor).

    Streamed into an ordinary residuals folder (or Hub repo) that the `residuals` package reads;
    the note, manifest and card say what was done.
    """
    import copy

    from .sparsify import DareSource, TrimmedSource

    options = make_options(options, option_overrides)
    if dare is None and trim is None:
        raise ResidualsError(
            "Nothing to do: neither dare nor trim was given.", "Use --dare 0.9 and/or --trim 0.2."
        )
    opened = open_residuals(residuals, options=options)
    source, config = opened.checkpoint, opened.config
    try:
        view: TensorSource = source
        done = []
        if trim is not None:
            view = TrimmedSource(view, trim)
            done.append(f"trimmed to the {100 * trim:g}% largest magnitudes of each tensor (TIES' trim step)")
        if dare is not None:
            view = DareSource(view, dare, seed)
            done.append(
                f"DARE: {100 * dare:g}% of the elements dropped at random (seed {seed}), the rest scaled by 1/(1−{dare:g})"
            )
        plan = arithmetic.plan_tensors(
            [("residuals", view)], out_dtype=lambda info: info.dtype, normalize_embeddings=False
        )
        plan.notes.append(f"sparsified from {public_name(residuals)}: " + "; ".join(done))
        tokenizer = opened.tokenizer

        def write(sink: Sink) -> Result:
            weights, measured = stream_into(
                sink, plan, lambda pieces, out, into: (pieces[0], pieces[0]), options, inputs=[view],
                reference_operand=None,
            )  # fmt: skip
            return write_residuals_files(
                sink.path,
                weights,
                infos=[o.info for o in plan.outputs],
                plan=plan,
                tensor_stats={n: s.as_dict() for n, s in measured.items()},
                reconstruction=None,
                base_name=config.base_model_name,
                instruct_name=config.instruct_model_name,
                tokenizer=tokenizer,
                generation_config=source.folder / "generation_config.json",
                config=copy.deepcopy(config),
                card_name=sink_name(sink),
            )

        return write_result(
            out_dir, options, inputs=[source], shard_bytes=plan_shards(plan, options), write=write,
            tokenizer_folders=[source.folder],
        )  # fmt: skip
    finally:
        source.close()
