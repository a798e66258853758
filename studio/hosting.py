"""What a visitor of a hosted app may name as a model, and how long a job may take there.

A hosted Space is one machine shared by strangers. There a model field accepts a Hub id, a model
of the bundled demo family by its name (`demo:base-v1`), or one of the visitor's own session
results by its label (`this session's residuals`) — never a server path, which would reach other
sessions' results, the Space's files and the shared Hugging Face cache. Run locally, folders are
accepted too. A job is estimated from headers and refused beyond the host's limit, with what the
visitor can do instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from residuals_core.demo import DEMO_MODELS, DEMO_PREFIX, demo_model
from residuals_core.errors import ResidualsError
from residuals_core.hub import HUB_PREFIX, looks_like_local_path, valid_repo_id
from residuals_core.units import format_duration, format_size

SESSION_RESIDUALS = "this session's residuals"
SESSION_MERGED = "this session's merged model"
MAX_NAME_LENGTH = 200  # Hub ids are at most 96 characters; anything longer is not a model name


@dataclass(frozen=True)
class InputPolicy:
    """How a typed model name becomes something the engine opens, for one kind of host."""

    on_space: bool

    def demo_name(self, model: str) -> str:
        return DEMO_PREFIX + model

    def resolve(self, text: str | None, *, role: str, session: Mapping[str, str | None] | None = None) -> str:
        """The model to open for what was typed in the `role` field; refused with what to give instead."""
        name = (text or "").strip()
        if not name:
            raise ResidualsError(f"The {role} field is empty.", self._what_to_give())
        if len(name) > MAX_NAME_LENGTH:
            raise ResidualsError(
                f"The {role} field holds {len(name)} characters, which is not a model name.",
                self._what_to_give(),
            )
        if name.startswith(DEMO_PREFIX):
            return demo_model(name)
        if name in (SESSION_RESIDUALS, SESSION_MERGED):
            found = (session or {}).get(name)
            if not found:
                step = "Compute" if name == SESSION_RESIDUALS else "Apply (or the one-pass merge)"
                raise ResidualsError(
                    f"There is no {name} yet.", f"Run {step} first, or name a model instead."
                )
            return found
        if not self.on_space:
            return name  # a local run: folders and Hub ids, as the command line takes them
        return HUB_PREFIX + self._hub_id(name, role)

    def _hub_id(self, name: str, role: str) -> str:
        bare = name.removeprefix(HUB_PREFIX)
        if looks_like_local_path(bare) or "/" not in bare or not valid_repo_id(bare):
            raise ResidualsError(
                f"The {role} field holds {name!r}: on this Space, models are Hub ids, and folders on the "
                "server cannot be read.",
                self._what_to_give(),
            )
        return bare

    def _what_to_give(self) -> str:
        demo = ", ".join(self.demo_name(m) for m in DEMO_MODELS)
        if self.on_space:
            return (
                f"Give a Hub model id such as Qwen/Qwen2.5-0.5B, a demo model ({demo}), or "
                f"'{SESSION_RESIDUALS}' / '{SESSION_MERGED}' for what you made in this session."
            )
        return f"Give a Hub model id such as Qwen/Qwen2.5-0.5B, a local folder, or a demo model ({demo})."


@dataclass(frozen=True)
class HostLimits:
    """What one job may cost on this host; the throughputs turn bytes into a time estimate.

    hub_bytes_per_s: how fast a Hub input streams to this host (the Space's link: a hosted Space streamed
    150 GB in over an hour, so 40 MB/s, not the 100 MB/s a Job's machine gets); local_bytes_per_s:
    reading and writing local files together (the benchmark's ~1B merge moved 8 GB in 4.3 s on two
    cores; 1 GB/s leaves room for slower disks); svd_rate: m·n·min(m,n) per second of a matrix
    factorisation (two CPU cores did 5–10e9 on 1024–8192-wide matrices; a GPU does far more).
    """

    max_seconds: float = 30 * 60
    hub_bytes_per_s: float = 40e6
    local_bytes_per_s: float = 1e9
    svd_rate: float = 4e9

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> HostLimits:
        """STUDIO_MAX_JOB_MINUTES, STUDIO_HUB_MB_PER_S, STUDIO_LOCAL_MB_PER_S and STUDIO_SVD_RATE_G, where set."""
        defaults = cls()
        return cls(
            svd_rate=float(environ.get("STUDIO_SVD_RATE_G", defaults.svd_rate / 1e9)) * 1e9,
            max_seconds=float(environ.get("STUDIO_MAX_JOB_MINUTES", defaults.max_seconds / 60)) * 60,
            hub_bytes_per_s=float(environ.get("STUDIO_HUB_MB_PER_S", defaults.hub_bytes_per_s / 1e6)) * 1e6,
            local_bytes_per_s=float(environ.get("STUDIO_LOCAL_MB_PER_S", defaults.local_bytes_per_s / 1e6))
            * 1e6,
        )


@dataclass(frozen=True)
class JobEstimate:
    """What a job will read and write, from headers alone, and about how long it takes here."""

    hub_read_bytes: int
    local_read_bytes: int
    write_bytes: int
    seconds: float
    factorise_seconds: float = 0.0

    def describe(self) -> str:
        read = []
        if self.hub_read_bytes:
            read.append(f"{format_size(self.hub_read_bytes)} streamed from the Hub")
        if self.local_read_bytes:
            read.append(f"{format_size(self.local_read_bytes)} from local files")
        factorise = (
            f", factorises its matrices (about {format_duration(self.factorise_seconds)})"
            if self.factorise_seconds >= 1
            else ""
        )
        return (
            f"reads {' and '.join(read) or 'nothing'}{factorise}, writes {format_size(self.write_bytes)}, "
            f"about {format_duration(self.seconds)} here"
        )


def estimate_job(
    inputs: list[tuple[int, bool]], write_bytes: int, limits: HostLimits, *, svd_work: float = 0.0
) -> JobEstimate:
    """Estimate from (bytes, is on the Hub) per input: Hub streams run side by side over one link,
    local reading and writing share the disk; the slower of the two sets the pace. `svd_work`
    (m·n·min(m,n) summed over the matrices a LoRA export or preview factorises) adds its own time."""
    hub = sum(size for size, remote in inputs if remote)
    local = sum(size for size, remote in inputs if not remote)
    factorise = svd_work / limits.svd_rate
    seconds = (
        max(hub / limits.hub_bytes_per_s, (local + write_bytes) / limits.local_bytes_per_s) + factorise + 3
    )
    return JobEstimate(hub, local, write_bytes, seconds, factorise)


# What to do instead of a job too long for the host, by what the job is: Jobs on the Space run the merge.
TOO_LONG_FIXES = {
    "merge": "Run it as a Job on your account (Apply tab → 'Too big for this Space?'), or choose smaller models.",
    "other": "Choose smaller models, or run it on your own machine with the command line (python -m residuals_core "
    "… --push-to you/name), where `jobs run` can also send it to Hugging Face Jobs.",
}


def refuse_if_too_long(estimate: JobEstimate, limits: HostLimits, *, kind: str = "other") -> None:
    """Refuse, with the numbers, a job estimated beyond the host's limit; `kind` "merge" for an apply
    or merge, which a hosted app can hand to a Job, "other" for the rest."""
    if estimate.seconds > limits.max_seconds:
        raise ResidualsError(
            f"This job {estimate.describe()}: more than the {format_duration(limits.max_seconds)} a job may take "
            "on this Space.",
            TOO_LONG_FIXES[kind],
        )


# What a visitor can act on: the engine's fixes speak to someone at a shell (tokens in environment
# variables, network settings, disk flags); on a Space the visitor can only sign in, retry or choose
# other models, so those fixes are said that way instead.
_VISITOR_FIXES = (
    (
        re.compile(r"HF_TOKEN|token=\.\.\."),
        "Sign in with Hugging Face (the button at the top) with an account that can read the model, then try again.",
    ),
    (
        re.compile(r"HF_HUB_OFFLINE|HF_ENDPOINT|network connection"),
        "The Space could not reach the Hub just now: try again in a minute.",
    ),
    (
        re.compile(r"TMPDIR|work_dir|--max-shard-size|--out\b|--overwrite|output folder on a larger disk"),
        "This Space is short of disk for it right now: try smaller models, or run it on your own machine "
        "(python -m residuals_core … --push-to).",
    ),
)


def visitor_fix(fix: str) -> str:
    """The engine's fix as a visitor of a hosted Space can act on it."""
    for pattern, replacement in _VISITOR_FIXES:
        if pattern.search(fix):
            return replacement
    return fix
