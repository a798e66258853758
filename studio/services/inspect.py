"""Inspect residuals: norms computed from their weights, and the repo's own claims checked against them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from residuals_core import operations

from ..context import Progress, StudioContext, Workspace
from ..hosting import JobEstimate
from . import residuals_source


@dataclass(frozen=True)
class Inspected:
    report: dict[str, Any]  # operations.inspect_residuals'
    cosine: list[dict] | None  # per-layer cosine similarity with the comparison, when one was named
    estimate: JobEstimate


def inspect(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    source: str,
    path: str,
    compare: str,
    token: str | bool | None,
    progress: Progress,
) -> Inspected:
    """Norms streamed from the weights (estimated and bounded like any job), with an optional comparison."""
    ctx.check_open(workspace, session_hash)
    target = residuals_source(ctx, source, path, workspace)
    other = ctx.model(compare, "comparison residuals", workspace) if (compare or "").strip() else None
    looked_at = [(target, "residuals"), *([(other, "comparison residuals")] if other else [])]
    estimate = ctx.preflight(looked_at, token, None, writes=False)
    session = ctx.session(workspace, session_hash)
    with ctx.heavy_job(session, progress, "inspecting", estimate) as (cache, report):
        options = ctx.options(token, cache, progress=report)
        result = operations.inspect_residuals(target, options=options)
        cosine = operations.compare_residuals(target, other, options=options) if other else None
    return Inspected(result, cosine, estimate)
