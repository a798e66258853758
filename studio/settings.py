"""Everything the Space's owner can tune, read once from the environment into one frozen object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from studio.hosting import HostLimits


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    return float(environ.get(name, default))


@dataclass(frozen=True)
class Settings:
    """What one visitor may cost this Space, and how many may run at once.

    Every bound a visitor can meet is here, and the page says it where it applies.
    """

    on_space: bool = False
    limits: HostLimits = field(default_factory=HostLimits)  # a heavy job's time budget, from its estimate
    heavy_jobs: int = 1  # heavy jobs running at once, all sessions together
    queue_size: int = 16  # calls waiting at most, all sessions together
    check_concurrency: int = 2  # Check compatibility (header reads) running at once
    max_zip_bytes: int = 2 * 10**9  # larger results are pushed, not zipped
    job_offer_seconds: float = 10 * 60  # beyond: Check suggests a Job on the visitor's account
    job_split_seconds: float = 60 * 60  # one job estimated beyond: a merge is offered split over jobs
    job_poll_seconds: float = 5.0  # how often Follow my job asks a split run's jobs for their stage
    # a Job's output shard size (smaller: a finer split); None: the engine's
    job_max_shard_size: str | None = None
    max_small_file_bytes: int = 64 * 10**6  # a model's config/tokenizer file, each
    try_memory_bytes: float = 8e9  # the Try tab's three models, together
    try_sessions: int = 1  # sessions whose Try models stay loaded at once
    try_max_prompt_tokens: int = 512
    try_max_new_tokens: int = 40
    try_max_seconds: float = 30.0  # one Try call's generation, all three models together
    session_idle_seconds: float = 2 * 3600  # a session untouched this long is ended and its files removed
    sweep_seconds: float = 60.0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Settings:
        """STUDIO_* variables where set (sizes in MB/GB, times in minutes or seconds as named)."""
        d = cls()
        return cls(
            on_space=bool(environ.get("SPACE_ID")),
            limits=HostLimits.from_environment(environ),
            heavy_jobs=int(_number(environ, "STUDIO_CONCURRENCY", d.heavy_jobs)),
            queue_size=int(_number(environ, "STUDIO_QUEUE_SIZE", d.queue_size)),
            check_concurrency=int(_number(environ, "STUDIO_CHECK_CONCURRENCY", d.check_concurrency)),
            max_zip_bytes=int(_number(environ, "STUDIO_MAX_ZIP_BYTES", d.max_zip_bytes)),
            job_offer_seconds=_number(environ, "STUDIO_JOB_OFFER_MINUTES", d.job_offer_seconds / 60) * 60,
            job_split_seconds=_number(environ, "STUDIO_JOB_SPLIT_MINUTES", d.job_split_seconds / 60) * 60,
            job_poll_seconds=_number(environ, "STUDIO_JOB_POLL_SECONDS", d.job_poll_seconds),
            job_max_shard_size=environ.get("STUDIO_JOB_MAX_SHARD_SIZE") or None,
            max_small_file_bytes=int(
                _number(environ, "STUDIO_MAX_SMALL_FILE_MB", d.max_small_file_bytes / 1e6) * 1e6
            ),
            try_memory_bytes=_number(environ, "STUDIO_TRY_MEMORY_GB", d.try_memory_bytes / 1e9) * 1e9,
            try_sessions=int(_number(environ, "STUDIO_TRY_SESSIONS", d.try_sessions)),
            try_max_prompt_tokens=int(
                _number(environ, "STUDIO_TRY_MAX_PROMPT_TOKENS", d.try_max_prompt_tokens)
            ),
            try_max_new_tokens=int(_number(environ, "STUDIO_TRY_MAX_NEW_TOKENS", d.try_max_new_tokens)),
            try_max_seconds=_number(environ, "STUDIO_TRY_MAX_SECONDS", d.try_max_seconds),
            session_idle_seconds=_number(environ, "STUDIO_SESSION_IDLE_MINUTES", d.session_idle_seconds / 60)
            * 60,
            sweep_seconds=_number(environ, "STUDIO_SWEEP_SECONDS", d.sweep_seconds),
        )
