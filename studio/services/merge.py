"""Apply residuals to a target, or merge base, instruct and target in one pass: one path for both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from residuals_core import apply_residuals, merge_models
from residuals_core.arithmetic import check_scale
from residuals_core.errors import ResidualsError

from ..context import Progress, StudioContext, Workspace
from ..hosting import JobEstimate
from . import Delivery, Push, default_repo_name, deliver

SAME_AS_TARGET = "same as target"
MAX_SCALE = 2.0  # the Space applies 0 < α ≤ 2 (the slider's range)


@dataclass(frozen=True)
class Merged:
    result: Any  # operations.Result
    estimate: JobEstimate
    delivery: Delivery
    repo_name: str
    scale: float  # α as applied


def space_scale(scale: Any) -> float:
    """α by the engine's rule (a finite number), within what this Space applies: (0, MAX_SCALE]."""
    value = check_scale(scale)
    if value == 0:
        raise ResidualsError(
            "α = 0 adds nothing: the result would be the target model itself.",
            "Choose α > 0 (1.0 adds the residuals once).",
        )
    if not 0 < value <= MAX_SCALE:
        raise ResidualsError(
            f"α = {value:g} is outside the range this Space applies (0 < α ≤ {MAX_SCALE:g}).",
            "Choose a value in it.",
        )
    return value


def merge(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    *,
    target: str,
    scale: Any,
    dtype: str,
    token: str | bool | None,
    progress: Progress,
    residuals: str | None = None,
    base: str | None = None,
    instruct: str | None = None,
    push: Push | None = None,
) -> Merged:
    """target + α·R with R the named `residuals` (apply), or instruct − base (the one-pass merge), into
    the session's `merged` folder or straight into the Hub repo `push`."""
    scale = space_scale(scale)
    ctx.check_open(workspace, session_hash)
    if residuals is not None:
        operation, inputs, roles, label = apply_residuals, (residuals,), ["residuals"], "applying"
    else:
        if not ((base or "").strip() and (instruct or "").strip() and (target or "").strip()):
            raise ResidualsError(
                "Fill in base, instruct and target models for a one-pass merge.", "Then merge again."
            )
        inputs = (ctx.model(base, "base model", workspace), ctx.model(instruct, "instruct model", workspace))
        operation, roles, label = merge_models, ["base", "instruct"], "merging"
    if not (target or "").strip():
        raise ResidualsError(
            "The target model is empty.", "Give your continued-pre-trained base: a Hub id or a demo model."
        )
    target_model = ctx.model(target, "target model", workspace)
    out_dtype = None if dtype == SAME_AS_TARGET else dtype
    models = [*zip(inputs, roles, strict=True), (target_model, "target")]
    estimate = ctx.preflight(models, token, out_dtype, kind="merge")
    session = ctx.session(workspace, session_hash)
    with ctx.heavy_job(session, progress, label, estimate) as (cache, report):
        result = operation(
            *inputs,
            target_model,
            None if push else session.output("merged"),
            push_to=push.repo if push else None,
            private=push.private if push else False,
            scale=scale,
            dtype=out_dtype,
            options=ctx.options(token, cache, device=ctx.device, progress=report),
        )
        delivery = deliver(ctx, workspace, session, "merged", result, progress)
    return Merged(result, estimate, delivery, default_repo_name(target) + "-plus-residuals", scale)
