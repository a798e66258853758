"""The running Space as the services see it: its settings, sessions, input rule, credentials and device.

One object, made once by the app from its `Settings` and passed to every service call, so nothing
below reads the environment or a module global (and a test builds one with the settings it needs).
The page's per-session state (a `Workspace`, a plain dict Gradio copies per session) only says where
the session's results are; their folders belong to the session registry.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from residuals_core import operations
from residuals_core.dtypes import dtype_from_name
from residuals_core.errors import Cancelled
from residuals_core.lora import svd_work
from residuals_core.options import Options
from residuals_core.units import format_duration

from .auth import Credentials
from .hosting import (
    SESSION_MERGED,
    SESSION_RESIDUALS,
    InputPolicy,
    JobEstimate,
    estimate_job,
    refuse_if_too_long,
)
from .session import Session, SessionRegistry
from .settings import Settings

Workspace = dict[
    str, Any
]  # {"session", "residuals", "merged", "lora", "job"}: where this session's results are
Progress = Callable[..., None]  # called as progress(fraction, desc=...), like gr.Progress
OVERRUN = 1.5  # a job running this many times the host's time limit is stopped, whatever its estimate said


def new_workspace() -> Workspace:
    """What the page keeps per session: its key in the registry and where its results are."""
    return {"session": None, "residuals": None, "merged": None, "lora": None, "job": None}


@dataclass
class StudioContext:
    settings: Settings
    sessions: SessionRegistry
    credentials: Credentials
    device: str = "cpu"

    @classmethod
    def create(
        cls, settings: Settings, *, downloads_root: Path, machine_token: str | None, device: str
    ) -> StudioContext:
        """Sessions' folders go under the temp folder and `downloads_root` (a folder the web server serves)."""
        sessions = SessionRegistry(
            Path(tempfile.gettempdir()) / "residuals-studio",
            downloads_root,
            idle_seconds=settings.session_idle_seconds,
        )
        return cls(settings, sessions, Credentials(settings.on_space, machine_token), device)

    @property
    def policy(self) -> InputPolicy:
        return InputPolicy(on_space=self.settings.on_space)

    # ---- sessions --------------------------------------------------------------------------------
    def session_key(self, workspace: Workspace, session_hash: str | None) -> str:
        """The session's key: the page's session hash, or one of its own for a call made without a page."""
        key = session_hash or workspace.get("session") or f"direct-{uuid.uuid4().hex}"
        workspace["session"] = key
        return key

    def session(self, workspace: Workspace, session_hash: str | None) -> Session:
        """The session's folders (made on its first job); refused when the session has already ended."""
        return self.sessions.session(self.session_key(workspace, session_hash))

    def check_open(self, workspace: Workspace, session_hash: str | None) -> None:
        """A call that waited in the queue while its tab closed is refused, not run."""
        self.sessions.check_open(self.session_key(workspace, session_hash))

    # ---- inputs ----------------------------------------------------------------------------------
    def model(self, text: str | None, role: str, workspace: Workspace) -> str:
        """What a model field names, by the host's rules (on a Space: Hub ids, demo models, session results)."""
        results = {SESSION_RESIDUALS: workspace.get("residuals"), SESSION_MERGED: workspace.get("merged")}
        return self.policy.resolve(text, role=role, session=results)

    def options(self, token: str | bool | None, cache_dir: str | Path | None, **more: Any) -> Options:
        """How this Space reads models for a visitor: their token, a cache of the job's own, capped small files."""
        return Options(
            token=token, cache_dir=cache_dir, max_small_file_bytes=self.settings.max_small_file_bytes, **more
        )

    # ---- jobs ------------------------------------------------------------------------------------
    def preflight(
        self,
        models: list[tuple[str, str]],
        token: str | bool | None,
        dtype: str | None,
        *,
        writes: bool = True,
        svd_embeddings: bool | None = None,
        kind: str = "other",
    ) -> JobEstimate:
        """What a job will read and write and about how long it takes, from headers; refused when too long.

        `models` are (model, role) with the output's shape taken from the last one (the target, or the
        instruct model for compute); `dtype` is the output's, None for the target's own. `writes=False`
        for a job that only reads (Inspect, Preview); `svd_embeddings` (True/False) for one that also
        factorises the matrices of a LoRA export, with or without the embeddings; `kind` "merge" for
        an apply or merge (too long here, it can run as a Job).
        """
        with scratch_cache() as cache:
            opened = operations.open_models(models, self.options(token, cache))
        try:
            shape_from = opened[-1]
            if not writes:
                write = 0
            elif dtype is None:
                write = shape_from.total_bytes
            else:
                itemsize = dtype_from_name(dtype).itemsize
                write = sum(
                    t.numel * (itemsize if t.dtype.is_floating_point else t.dtype.itemsize)
                    for t in shape_from.tensors.values()
                )
            work = (
                svd_work(shape_from.tensors, embeddings=svd_embeddings) if svd_embeddings is not None else 0.0
            )
            return self.estimate(opened, write, svd_work=work, kind=kind)
        finally:
            for checkpoint in opened:
                checkpoint.close()

    def estimate(
        self, opened: list, write_bytes: int, *, svd_work: float = 0.0, kind: str = "other"
    ) -> JobEstimate:
        """The estimate of a job over these opened inputs (their weights and the small files fetched for
        them), refused with its numbers when it is too long for this Space."""
        reads = [(c.total_bytes + c.small_file_bytes, c.remote) for c in opened]
        estimate = estimate_job(reads, write_bytes, self.settings.limits, svd_work=svd_work)
        refuse_if_too_long(estimate, self.settings.limits, kind=kind)
        return estimate

    @contextlib.contextmanager
    def heavy_job(
        self, session: Session, progress: Progress, label: str, estimate: JobEstimate
    ) -> Iterator[tuple[Path, Callable[[int, int, str], None]]]:
        """One heavy job per session, stoppable by Cancel (or the session's end), with a Hub cache of its own.

        Yields (cache folder, progress callback). The callback maps the engine's tensors onto 0–90 % and
        raises once Cancel was pressed, or once the job has run OVERRUN times the host's limit (an
        estimate is only an estimate: a slow link must not hold the slot for hours), so the engine stops
        and its sinks remove what they wrote.
        """
        limits = self.settings.limits
        started, limit = time.monotonic(), limits.max_seconds * OVERRUN

        def report(done: int, total: int, name: str) -> None:
            session.raise_if_cancelled()
            if time.monotonic() - started > limit:
                raise Cancelled(
                    f"The job was stopped after {format_duration(limit)}: jobs here may take "
                    f"{format_duration(limits.max_seconds)} (it was estimated at {format_duration(estimate.seconds)}; "
                    "the Hub was slower than that today).",
                    "Nothing it wrote was kept. Try again later, choose smaller models, or run it on your own machine.",
                )
            progress(0.9 * done / max(total, 1), desc=f"{label}: {done}/{total} tensors")

        try:
            with session.job("This session is already running a job.") as cache:
                yield cache, report
        finally:
            self.sessions.job_ended(session.key)


@contextlib.contextmanager
def scratch_cache() -> Iterator[str]:
    """A Hub cache for one look at models (their small files), removed after it: a shared cache would
    grow with every stranger's models and keep them for everyone."""
    with tempfile.TemporaryDirectory(prefix="studio-look-") as folder:
        yield folder
