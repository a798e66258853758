"""Check compatibility (headers only) and compute residuals into the session or the visitor's repo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from residuals_core import compute_residuals, operations
from residuals_core.errors import ResidualsError

from ..context import Progress, StudioContext, Workspace, scratch_cache
from ..hosting import JobEstimate
from . import Delivery, Push, default_repo_name, deliver


@dataclass(frozen=True)
class Checked:
    report: dict[str, Any]  # operations.check_compatibility's
    estimate: JobEstimate
    fields: dict[str, str]  # role -> the model as typed
    sizes: dict[str, int]  # role -> weight bytes
    small_bytes: int  # config and tokenizer files fetched


@dataclass(frozen=True)
class Computed:
    result: Any  # operations.Result
    estimate: JobEstimate
    delivery: Delivery
    repo_name: str  # a default name for pushing it


def require_pair(base: str, instruct: str) -> None:
    if not (base or "").strip() or not (instruct or "").strip():
        raise ResidualsError(
            "Fill in both the base and the instruct model.",
            "Give a Hub id like org/name, a demo model or a folder.",
        )


def check(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    base: str,
    instruct: str,
    dtype: str,
    normalize: bool,
    token: str | bool | None,
) -> Checked:
    """What compute would do, from headers alone, with the job's estimate (refused when too long)."""
    require_pair(base, instruct)
    ctx.check_open(workspace, session_hash)
    fields = {"base": base.strip(), "instruct": instruct.strip()}
    models = {role: ctx.model(text, f"{role} model", workspace) for role, text in fields.items()}
    with scratch_cache() as cache:
        opened = operations.open_models([(m, role) for role, m in models.items()], ctx.options(token, cache))
        try:
            report = operations.check_compatibility(
                opened[0], opened[1], normalize_embeddings=normalize, dtype=dtype
            )
            # the estimate from the headers just read, not from a second opening of the same models
            estimate = ctx.estimate(opened, report["expected_output_bytes"])
            sizes = {role: c.total_bytes for role, c in zip(fields, opened, strict=True)}
            small = sum(c.small_file_bytes for c in opened)
        finally:
            for checkpoint in opened:
                checkpoint.close()
    return Checked(report, estimate, fields, sizes, small)


def compute(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    base: str,
    instruct: str,
    dtype: str,
    normalize: bool,
    token: str | bool | None,
    progress: Progress,
    push: Push | None = None,
) -> Computed:
    """Residuals into the session's folder, or with `push` straight into the visitor's Hub repo."""
    require_pair(base, instruct)  # compute itself rejects incompatible models from headers, before work
    ctx.check_open(workspace, session_hash)
    base_model = ctx.model(base, "base model", workspace)
    instruct_model = ctx.model(instruct, "instruct model", workspace)
    estimate = ctx.preflight([(base_model, "base"), (instruct_model, "instruct")], token, dtype)
    session = ctx.session(workspace, session_hash)
    with ctx.heavy_job(session, progress, "computing", estimate) as (cache, report):
        result = compute_residuals(
            base_model,
            instruct_model,
            None if push else session.output("residuals"),
            push_to=push.repo if push else None,
            private=push.private if push else False,
            dtype=dtype,
            normalize_embeddings=normalize,
            options=ctx.options(token, cache, device=ctx.device, progress=report),
        )
        delivery = deliver(ctx, workspace, session, "residuals", result, progress)
    return Computed(result, estimate, delivery, default_repo_name(instruct) + "-residuals")
