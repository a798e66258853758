"""What each action of the Space does, with no Gradio in sight: plain arguments in, a dataclass out,
a ResidualsError (what went wrong, what to do) when it cannot.

compute (and check), merge (apply and the one-pass merge: one path), inspect, lora (preview and
export), tryout (generation side by side), jobs (a merge on the visitor's account), push.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import RepoUrl

from residuals_core.errors import ResidualsError
from residuals_core.hub import HUB_PREFIX, valid_repo_id

from ..context import Progress, StudioContext, Workspace
from ..session import Session

FROM_SESSION = "this session's Compute result"  # the Residuals radio's choice for the session's residuals


@dataclass(frozen=True)
class Push:
    """Write the result straight into this Hub repo (the visitor's, with their write login)."""

    repo: str
    private: bool = True


@dataclass(frozen=True)
class Delivery:
    """Where a job's result went: a zip on this Space, nowhere (too big to zip: push it), or a Hub repo."""

    archive: Path | None = None
    unzipped_bytes: int | None = None
    repo: str | None = None


def repo_name_given(repo_name: object) -> str:
    """The repository name typed (NAME or NAMESPACE/NAME), by the Hub's own rule for ids."""
    name = repo_name.strip() if isinstance(repo_name, str) else ""
    if not name:
        raise ResidualsError("Give the repository a name.", "Type a name such as my-model-residuals.")
    if not valid_repo_id(name):
        raise ResidualsError(
            f"{name[:100]!r} is not a repository name the Hub accepts.",
            "Use letters, digits, '-', '_' and '.', not starting or ending with '-' or '.' (e.g. "
            "my-model-residuals, or you/my-model-residuals).",
        )
    return name


def residuals_source(ctx: StudioContext, source: str, path: str, workspace: Workspace) -> str:
    """The residuals a field names: this session's Compute result, or a named model."""
    if source == FROM_SESSION:
        if not workspace.get("residuals"):
            raise ResidualsError(
                "No residuals in this session yet.",
                "Run the Compute tab first, or choose a Hub id"
                + ("." if ctx.settings.on_space else " / folder."),
            )
        return workspace["residuals"]
    if not (path or "").strip():
        raise ResidualsError(
            "The residuals field is empty.",
            "Give the residuals' Hub id" + ("." if ctx.settings.on_space else " or folder."),
        )
    return ctx.model(path, "residuals", workspace)


def deliver(
    ctx: StudioContext, workspace: Workspace, session: Session, kind: str, result, progress: Progress
) -> Delivery:
    """A finished result as the session's `kind`: its Hub repo (streamed there), or its folder here,
    zipped for download when it is small enough to serve."""
    if result.path is None:  # written straight into a Hub repo: nothing of it was kept here
        repo = RepoUrl(result.url).repo_id
        workspace[kind] = HUB_PREFIX + repo
        return Delivery(repo=repo)
    kept = session.keep(kind, result.path)
    workspace[kind] = str(kept)
    size = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file())
    if size > ctx.settings.max_zip_bytes:
        return Delivery(unzipped_bytes=size)
    progress(0.92, desc=f"zipping the {kind} for download")
    return Delivery(archive=session.zip(kept, kind))


def default_repo_name(field: str) -> str:
    """A default repo name from a model field: the model's own name, whatever its kind."""
    return Path(field.strip().rstrip("/").removeprefix("demo:")).name
