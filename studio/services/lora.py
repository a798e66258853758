"""Export smaller: preview what a LoRA adapter of the residuals keeps, and write it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from residuals_core import export_lora, operations
from residuals_core.errors import ResidualsError
from residuals_core.lora import preview_lora

from ..context import Progress, StudioContext, Workspace
from ..hosting import JobEstimate
from . import Delivery, deliver, residuals_source

MAX_RANK = 64
ENERGY_RANGE = (0.5, 0.99)


@dataclass(frozen=True)
class Previewed:
    report: dict[str, Any]  # lora.preview_lora's
    estimate: JobEstimate


@dataclass(frozen=True)
class Exported:
    result: Any  # operations.Result
    estimate: JobEstimate
    delivery: Delivery


@dataclass(frozen=True)
class LoraRequest:
    """What the Export smaller panel asks for: which residuals, how to cut each matrix, embeddings or not."""

    source: str  # FROM_SESSION, or the named choice with `path`
    path: str
    mode: str  # "rank" or "energy"
    rank: Any
    energy: Any
    embeddings: bool

    def cut(self) -> dict[str, Any]:
        """The rank or energy cut as the sliders allow it; other values (sent through the API) are refused."""
        try:
            if self.mode == "rank" and 1 <= float(self.rank) <= MAX_RANK:
                return {"rank": int(self.rank), "energy": None}
            if self.mode == "energy" and ENERGY_RANGE[0] <= float(self.energy) <= ENERGY_RANGE[1]:
                return {"rank": None, "energy": float(self.energy)}
        except (TypeError, ValueError):
            pass
        raise ResidualsError(
            "The cut is not one this Space makes.",
            f"Cut by 'rank' (a whole number from 1 to {MAX_RANK}) or by 'energy' (a share from {ENERGY_RANGE[0]} "
            f"to {ENERGY_RANGE[1]}).",
        )


def _planned(ctx: StudioContext, workspace: Workspace, session_hash: str | None, request: LoraRequest, token):
    """(the cut, the residuals, the estimate, the session): everything checked before the job slot is taken."""
    chosen = request.cut()
    ctx.check_open(workspace, session_hash)
    target = residuals_source(ctx, request.source, request.path, workspace)
    estimate = ctx.preflight(
        [(target, "residuals")], token, None, writes=False, svd_embeddings=request.embeddings
    )
    return chosen, target, estimate, ctx.session(workspace, session_hash)


def preview(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    request: LoraRequest,
    token: str | bool | None,
    progress: Progress,
) -> Previewed:
    """Per layer, the share of ‖R‖² the adapter would keep, and its size — before anything is written."""
    chosen, target, estimate, session = _planned(ctx, workspace, session_hash, request, token)
    with (
        ctx.heavy_job(session, progress, "previewing", estimate) as (cache, report),
        operations.open_residuals(target, options=ctx.options(token, cache)) as opened,
    ):
        result = preview_lora(
            opened.checkpoint, embeddings=request.embeddings, device=ctx.device, progress=report, **chosen
        )
    return Previewed(result, estimate)


def export(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    request: LoraRequest,
    token: str | bool | None,
    progress: Progress,
) -> Exported:
    """The LoRA adapter into the session's folder, zipped for download (it is small), ready to push."""
    chosen, target, estimate, session = _planned(ctx, workspace, session_hash, request, token)
    with ctx.heavy_job(session, progress, "exporting", estimate) as (cache, report):
        result = export_lora(
            target,
            session.output("lora"),
            embeddings=request.embeddings,
            options=ctx.options(token, cache, device=ctx.device, progress=report),
            **chosen,
        )
        delivery = deliver(ctx, workspace, session, "lora", result, progress)
    return Exported(result, estimate, delivery)
