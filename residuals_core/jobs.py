"""The same command, elsewhere: a compute / apply / merge / lora that pushes to the Hub, run as a
Hugging Face Job on the user's own account (huggingface_hub's `run_job`, `inspect_job`,
`fetch_job_logs`, `cancel_job`).

The job runs `python -m residuals_core <command> …` in an image that holds this project (the
Space's own image when run from a Space), so its logs read like a local run. The user's token
travels only as the job's secret `HF_TOKEN` — never in the command line, the environment or the
labels, which the Hub shows to anyone who can see the job.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import INDEX_NAME, read_json, select_weight_files
from .errors import ResidualsError
from .hub import hub_errors, is_hub_id, with_rate_limits
from .units import format_duration, format_size

JOB_COMMANDS = ("compute", "apply", "merge", "lora")
JOB_LABELS = {"created-by": "residuals-studio"}
JOB_MODEL_FLAGS = ("--base", "--instruct", "--target", "--residuals")
# A job's link, read and upload alike: a conservative rate, so a job is not stopped before it ends.
JOB_LINK_BYTES_PER_S = 100e6
JOB_START_S = 3 * 60  # pulling the image, starting Python
TIMEOUT_FACTOR, TIMEOUT_MARGIN_S = 2.0, 10 * 60  # timeout = 2 x the estimate + 10 min ...
MAX_TIMEOUT_S = 48 * 3600  # ... at most two days
_JOB_URL = re.compile(r"^(?:https?://[^/]+)?/?(?:jobs/)?(?:(?P<owner>[\w.\-]+)/)?(?P<id>[0-9a-zA-Z]+)/?$")


@dataclass(frozen=True)
class JobPlan:
    """How long a job should take (from the inputs' sizes on the Hub) and the timeout it gets."""

    read_bytes: int
    write_bytes: int
    estimate_s: float
    timeout_s: int
    timeout_given: bool

    def describe(self) -> str:
        why = (
            "as given"
            if self.timeout_given
            else f"{TIMEOUT_FACTOR:g} x the estimate + {TIMEOUT_MARGIN_S // 60} min; --timeout to change it"
        )
        return (
            f"reads {format_size(self.read_bytes)}, writes about {format_size(self.write_bytes)}: about "
            f"{format_duration(self.estimate_s)} at {JOB_LINK_BYTES_PER_S / 1e6:.0f} MB/s; timeout "
            f"{format_duration(self.timeout_s)} ({why})"
        )


@dataclass(frozen=True)
class SubmittedJob:
    id: str
    url: str
    plan: JobPlan


def parse_timeout(text: str | int | float) -> int:
    """'90m', '2h', '3600' or seconds, as the Hub reads a job's timeout."""
    value = str(text).strip().lower()
    factor = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(value[-1:])
    number = value[:-1] if factor else value
    try:
        seconds = float(number) * (factor or 1)
    except ValueError:
        seconds = -1
    if not math.isfinite(seconds) or seconds <= 0:
        raise ResidualsError(
            f"--timeout {text!r} is not a duration.", "Give it like 90m, 2h or 3600 (seconds)."
        )
    return int(seconds)


def parse_job_ref(text: str) -> tuple[str | None, str]:
    """(namespace, id) from an id, 'owner/id', or the job's URL as `jobs run` prints it."""
    match = _JOB_URL.match(text.strip())
    if match is None:
        raise ResidualsError(
            f"{text!r} is not a job id.", "Give the id, OWNER/ID, or the URL that `jobs run` printed."
        )
    return match.group("owner"), match.group("id")


def _model_bytes(name: str, token: str | None) -> int:
    """Bytes of the weight files a run reads, by the one weight-file rule: from the Hub's file listing
    (the index fetched if there is one), or a local folder (a demo model)."""
    from huggingface_hub import HfApi, hf_hub_download

    from .demo import demo_model

    if not is_hub_id(name):
        folder = Path(demo_model(name)).expanduser()
        if not folder.is_dir():
            return 0
        sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        files = select_weight_files(list(sizes), lambda: read_json(folder / INDEX_NAME), name)
        return sum(sizes[f] for f in files)
    repo_id = name.removeprefix("hf://")
    api = HfApi(token=token)
    with hub_errors(repo_id, None):
        info = with_rate_limits(lambda: api.model_info(repo_id, files_metadata=True))
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or [] if "/" not in s.rfilename}

        def index() -> dict:  # fetched only when the repo has one
            return read_json(Path(hf_hub_download(repo_id, INDEX_NAME, revision=info.sha, token=token)))

        files = select_weight_files(list(sizes), index, repo_id)
    return sum(sizes[f] for f in files)


def plan_job(argv: list[str], *, token: str | None, timeout: str | int | None = None) -> JobPlan:
    """Estimate a job from its inputs' sizes and give it a timeout that outlasts it: the Hub's default
    (30 minutes) would stop a 70B merge half-way."""
    sizes = {
        flag: _model_bytes(argv[i + 1], token)
        for i, flag in enumerate(argv[:-1])
        if flag in JOB_MODEL_FLAGS and argv[i + 1] not in JOB_MODEL_FLAGS
    }
    read = sum(sizes.values())
    written = sizes.get("--target") or sizes.get("--instruct") or max(sizes.values(), default=0)
    estimate = JOB_START_S + (read + written) / JOB_LINK_BYTES_PER_S
    if timeout is not None:
        seconds, given = parse_timeout(timeout), True
    else:
        seconds = int(min(MAX_TIMEOUT_S, TIMEOUT_FACTOR * estimate + TIMEOUT_MARGIN_S))
        given = False
    return JobPlan(read, written, estimate, seconds, given)


def _api(token: str | None):
    from huggingface_hub import HfApi

    if not token:
        raise ResidualsError(
            "Running a Job needs your Hugging Face token (it runs on, and is billed to, your account).",
            "Log in (hf auth login), pass --token, or set HF_TOKEN.",
        )
    return HfApi(token=token)


def check_job_command(argv: list[str]) -> None:
    """A Job's command must be one of ours and push its result to the Hub; tokens never in it."""
    if not argv or argv[0] not in JOB_COMMANDS:
        raise ResidualsError(
            f"A Job runs one of {', '.join(JOB_COMMANDS)}, not {argv[0] if argv else 'nothing'!r}.",
            "Give the command as you would run it locally, e.g. jobs run merge --base … --push-to ME/OUT.",
        )
    if "--push-to" not in argv:
        raise ResidualsError(
            "A Job's result must go to the Hub: the machine it runs on is gone when it ends.",
            "Add --push-to ME/NAME (instead of --out).",
        )
    if any(a == "--token" or a.startswith(("--token=", "hf_")) for a in argv):
        raise ResidualsError(
            "The command holds a token: a Job's command line is shown to anyone who can see the Job.",
            "Leave it out: the token travels as the Job's secret HF_TOKEN.",
        )


def run_job(
    argv: list[str],
    *,
    token: str | None,
    image: str,
    flavor: str | None = None,
    timeout: str | int | None = None,
    namespace: str | None = None,
    token_expires_at: float | None = None,
) -> SubmittedJob:
    """Submit `python -m residuals_core <argv>` as a Job with a timeout that outlasts its estimate.

    `token_expires_at` (an OAuth login's expiry, epoch seconds): a job that would outlive the token
    is refused, since it pushes its result with that token at the very end.
    """
    check_job_command(argv)
    api = _api(token)
    plan = plan_job(argv, token=token, timeout=timeout)
    if token_expires_at is not None and time.time() + plan.estimate_s > token_expires_at:
        left = max(0.0, token_expires_at - time.time())
        raise ResidualsError(
            f"This job takes about {format_duration(plan.estimate_s)}, but your login expires in {format_duration(left)}: "
            "the job would lose the right to push its result before it ends.",
            "Log out and in again (a fresh login lasts 8 hours), then submit it; or choose smaller models.",
        )
    with hub_errors(namespace or "your account", None):
        info = api.run_job(
            image=image,
            command=["python", "-m", "residuals_core", *argv],
            secrets={"HF_TOKEN": token},
            flavor=flavor,
            timeout=plan.timeout_s,
            labels=dict(JOB_LABELS),
            namespace=namespace,
        )
    return SubmittedJob(info.id, info.url, plan)


def job_status(job_id: str, *, token: str | None, namespace: str | None = None) -> Any:
    owner, job_id = parse_job_ref(job_id)
    with hub_errors(f"job {job_id}", None):
        return _api(token).inspect_job(job_id=job_id, namespace=namespace or owner)


def job_logs(
    job_id: str, *, token: str | None, namespace: str | None = None, follow: bool = True
) -> Iterator[str]:
    """The job's log lines as they come (`follow=False`: those logged so far). The stream can end before
    the job does: `wait_for_job` then gives its final stage."""
    owner, job_id = parse_job_ref(job_id)
    api = _api(token)
    with hub_errors(f"job {job_id}", None):
        yield from api.fetch_job_logs(job_id=job_id, namespace=namespace or owner, follow=follow)


def wait_for_job(job_id: str, *, token: str | None, namespace: str | None = None, poll_s: float = 1.0) -> Any:
    """The job's JobInfo once its stage is final (COMPLETED, ERROR, CANCELED or DELETED)."""
    owner, job_id = parse_job_ref(job_id)
    api = _api(token)
    with hub_errors(f"job {job_id}", None):
        return api.wait_for_job(job_id, namespace=namespace or owner, poll_interval=poll_s)


def describe_end(info: Any) -> str:
    """The final stage in words, with the Hub's message (e.g. 'Job timeout')."""
    stage = info.status.stage
    message = f": {info.status.message}" if info.status.message else ""
    hint = ""
    if stage == "ERROR" and "timeout" in (info.status.message or "").lower():
        hint = " — it ran past its timeout; submit it again with a longer --timeout"
    return f"job {info.id} ended {stage}{message}{hint}"


def cancel_job(job_id: str, *, token: str | None, namespace: str | None = None) -> None:
    owner, job_id = parse_job_ref(job_id)
    with hub_errors(f"job {job_id}", None):
        _api(token).cancel_job(job_id=job_id, namespace=namespace or owner)
