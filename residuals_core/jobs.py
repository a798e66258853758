"""The same command, elsewhere: a compute / apply / merge / lora that pushes to the Hub, run as a
Hugging Face Job on the user's own account (huggingface_hub's `run_job`, `inspect_job`,
`fetch_job_logs`, `cancel_job`).

The job runs `python -m residuals_core <command> …` in an image that holds this project (the
Space's own image when run from a Space), so its logs read like a local run. The user's token
travels only as the job's secret `HF_TOKEN` — never in the command line, the environment or the
labels, which the Hub shows to anyone who can see the job.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import INDEX_NAME, read_json, select_weight_files
from .errors import ResidualsError
from .hub import hub_errors, is_hub_id, split_revision, with_rate_limits
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
    repo_id, revision = split_revision(name.removeprefix("hf://"))
    api = HfApi(token=token)
    with hub_errors(repo_id, revision):
        info = with_rate_limits(lambda: api.model_info(repo_id, revision=revision, files_metadata=True))
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
    return _job_plan(read, written, timeout)


def _job_plan(read: int, written: int, timeout: str | int | None) -> JobPlan:
    """A job's estimate from the bytes it moves, and its timeout (given, or from the estimate)."""
    estimate = JOB_START_S + (read + written) / JOB_LINK_BYTES_PER_S
    if timeout is not None:
        return JobPlan(read, written, estimate, parse_timeout(timeout), True)
    seconds = int(min(MAX_TIMEOUT_S, TIMEOUT_FACTOR * estimate + TIMEOUT_MARGIN_S))
    return JobPlan(read, written, estimate, seconds, False)


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


# ---- a run split over several Jobs by output shard (see split_run) ----------------------------------
RUN_LABEL = "residuals-run"
FINAL_STAGES = ("COMPLETED", "ERROR", "CANCELED", "DELETED")
LIVE_STAGES = ("SCHEDULING", "RUNNING")  # a job that may still write, and that cancel stops


@dataclass(frozen=True)
class SplitPlan:
    """A split run before submission: the inputs pinned, its branch, each job's shards, time and cost."""

    repo_id: str
    branch: str
    argv: list[str]  # the command with every Hub input pinned to the commit it was planned from
    shards: list[dict]  # {"file", "bytes"} in the result's order
    done: list[int]  # shard numbers already on the branch
    busy: list[int]  # shard numbers a running job of this run is writing
    parts: list[list[int]]  # the shard numbers of each job to submit
    jobs: list[JobPlan]
    flavor: str
    usd_per_hour: float | None  # the flavour's price from the Hub's hardware list
    published: bool
    read_bytes: int = 0  # what the whole result reads from its inputs (shared out by bytes written)
    todo: list[int] = dataclasses.field(default_factory=list)  # shards neither done nor busy (and chosen)
    timeout: str | int | None = None  # as given; else each job's from its estimate

    def split(self, jobs: int) -> SplitPlan:
        """The same run over `jobs` jobs (fewer when fewer shards are left): job k writes shards k, k+n, …"""
        from .split_run import assign_shards

        parts = [part for part in assign_shards(self.todo, min(jobs, len(self.todo))) if part]
        total_out = sum(s["bytes"] for s in self.shards) or 1
        plans = []
        for part in parts:
            written = sum(self.shards[i - 1]["bytes"] for i in part)
            plans.append(_job_plan(int(self.read_bytes * written / total_out), written, self.timeout))
        return dataclasses.replace(self, parts=parts, jobs=plans)

    def fewest_jobs_within(self, seconds: float, most: int = 16) -> int:
        """The fewest jobs (1, 2, 4, … up to `most`) whose busiest one is estimated within `seconds`:
        a split costs a start-up per job, so a run is split only as far as it needs."""
        jobs = 1
        while jobs < min(most, len(self.todo)):
            plans = self.split(jobs).jobs
            if not plans or max(p.estimate_s for p in plans) <= seconds:
                break
            jobs *= 2
        return min(jobs, most)

    @property
    def wall_s(self) -> float:
        """The estimate of the run: its jobs run side by side, so the busiest one."""
        return max((plan.estimate_s for plan in self.jobs), default=0.0)

    @property
    def ref(self) -> str:
        """How `jobs status` and `jobs cancel` name the run."""
        return f"{self.repo_id}@{self.branch}"

    @property
    def job_hours(self) -> float:
        return sum(plan.estimate_s for plan in self.jobs) / 3600

    def describe(self) -> str:
        total = sum(s["bytes"] for s in self.shards)
        lines = [
            f"run {self.ref}: {len(self.shards)} output shards, {format_size(total)}; "
            f"{len(self.done)} already on the run branch"
            + (f", {len(self.busy)} being written by running jobs" if self.busy else "")
        ]
        for k, (part, plan) in enumerate(zip(self.parts, self.jobs, strict=True), start=1):
            lines.append(f"  job {k}/{len(self.parts)}: shards {_numbers(part)}; {plan.describe()}")
        if self.jobs:
            lines.append(f"  in all: {self.cost_text()}")
        return "\n".join(lines)

    def cost_text(self) -> str:
        """Wall time, job-hours and price of the jobs still to submit."""
        cost = (
            f"about ${self.job_hours * self.usd_per_hour:,.2f} at ${self.usd_per_hour:g}/hour for {self.flavor} "
            "(the Hub's hardware list)"
            if self.usd_per_hour is not None
            else f"the price of {self.flavor} is not in the Hub's hardware list"
        )
        return f"about {format_duration(self.wall_s)} wall, {self.job_hours:.2f} job-hours, {cost}"


def _numbers(numbers: list[int]) -> str:
    from .split_run import format_shard_numbers

    return format_shard_numbers(numbers)


def _flag_value(argv: list[str], flag: str) -> str | None:
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag), None)


def pin_inputs(argv: list[str], commits: dict[str, str]) -> list[str]:
    """The command with each Hub input as `hf://org/name@COMMIT`: every job reads what was planned."""
    pinned = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg in JOB_MODEL_FLAGS:
            repo = split_revision(argv[i + 1].removeprefix("hf://"))[0]
            if repo in commits:
                pinned[i + 1] = f"hf://{repo}@{commits[repo]}"
    return pinned


def flavor_price(api: Any, flavor: str) -> float | None:
    """USD per hour of a flavour, from the Hub's list of Jobs hardware (None when it is not listed)."""
    try:
        listed = with_rate_limits(api.list_jobs_hardware)
    except Exception:  # the price is information: its absence must not stop a submission
        return None
    for hardware in listed:
        if hardware.name == flavor:
            per = {"second": 3600, "minute": 60, "hour": 1}.get(hardware.unit_label, 60)
            return hardware.unit_cost_usd * per
    return None


def plan_split_run(
    argv: list[str],
    *,
    shards: int,
    token: str | None,
    only_shards: tuple[int, ...] | None = None,
    flavor: str | None = None,
    timeout: str | int | None = None,
    namespace: str | None = None,
) -> SplitPlan:
    """Plan a split run from the inputs' headers: what is on its branch already, and for the rest the
    shards, estimate, timeout and cost of each of at most `shards` jobs."""
    from . import cli
    from .split_run import RunState, run_branch_name, run_state

    check_job_command(argv)
    if argv[0] not in ("compute", "apply", "merge"):
        raise ResidualsError(
            f"{argv[0]} cannot be split by output shard.",
            "Split compute, apply or merge; run lora as one job.",
        )
    if shards < 1:
        raise ResidualsError(f"--shards {shards}: a run needs at least one job.", "Give --shards 1 or more.")
    if any(a in ("--run-branch", "--only-shards") for a in argv):
        raise ResidualsError(
            "jobs run --shards sets --run-branch and --only-shards itself.",
            "Leave them out of the command; give --only-shards to jobs run to rerun some shards alone.",
        )
    api = _api(token)
    summary = cli.plan_command(argv, token=token)
    pinned = pin_inputs(argv, summary["inputs"])
    branch = run_branch_name(pinned, summary["fingerprint"])
    repo_id = _flag_value(argv, "--push-to")
    with hub_errors(repo_id, None):
        exists = with_rate_limits(lambda: api.repo_exists(repo_id))
        state = run_state(api, repo_id, branch) if exists else RunState(branch, {}, False, False)
        jobs_of_run = _run_jobs(api, branch, namespace, token) if state.branch_exists else []
    running = [job for job in jobs_of_run if job.status.stage in LIVE_STAGES]
    names = [s["file"] for s in summary["shards"]]
    done = [i for i, name in enumerate(names, start=1) if name in state.recorded]
    busy = sorted({n for job in running for n in _job_shards(job)} - set(done))
    if only_shards is not None and max(only_shards, default=0) > len(names):
        raise ResidualsError(
            f"--only-shards goes up to {max(only_shards)}, and this result has {len(names)} shards.",
            f"Give shard numbers from 1 to {len(names)}.",
        )
    todo = [
        i
        for i in range(1, len(names) + 1)
        if i not in done and i not in busy and (only_shards is None or i in only_shards)
    ]
    flavor = flavor or "cpu-basic"
    return SplitPlan(
        repo_id, branch, pinned, summary["shards"], done, busy, [], [], flavor, flavor_price(api, flavor),
        state.published, summary["read_bytes"], todo, timeout,
    ).split(shards)  # fmt: skip


def _job_shards(job: Any) -> list[int]:
    """The shard numbers a job of a run writes, from its command line."""
    from .split_run import parse_shard_numbers

    command = list(job.command or []) + list(getattr(job, "arguments", None) or [])
    value = _flag_value(command, "--only-shards")
    try:
        return list(parse_shard_numbers(value)) if value else []
    except ResidualsError:
        return []


def submit_split_run(
    plan: SplitPlan,
    *,
    token: str | None,
    image: str,
    namespace: str | None = None,
    token_expires_at: float | None = None,
) -> list[SubmittedJob]:
    """Make the repo and the run branch, then submit one Job per part of the plan."""
    from .hub import writable_repo_id
    from .split_run import format_shard_numbers

    api = _api(token)
    if plan.jobs and token_expires_at is not None:
        longest = max(p.estimate_s for p in plan.jobs)
        if time.time() + longest > token_expires_at:
            raise ResidualsError(
                f"This run takes about {format_duration(longest)}, longer than your login lasts: the jobs would "
                "lose the right to push their shards.",
                "Log out and in again (a fresh login lasts 8 hours), then submit it; or use more jobs.",
            )
    with hub_errors(plan.repo_id, None):
        repo_id = writable_repo_id(api, plan.repo_id)
        with_rate_limits(lambda: api.create_repo(repo_id, private="--private" in plan.argv, exist_ok=True))
        with_rate_limits(lambda: api.create_branch(repo_id, branch=plan.branch, exist_ok=True))
    submitted = []
    for k, (part, job_plan) in enumerate(zip(plan.parts, plan.jobs, strict=True), start=1):
        argv = [*plan.argv, "--run-branch", plan.branch, "--only-shards", format_shard_numbers(part)]
        labels = {**JOB_LABELS, RUN_LABEL: plan.branch, "residuals-part": f"{k}-of-{len(plan.parts)}"}
        with hub_errors(namespace or "your account", None):
            info = api.run_job(
                image=image,
                command=["python", "-m", "residuals_core", *argv],
                secrets={"HF_TOKEN": token},
                flavor=plan.flavor,
                timeout=job_plan.timeout_s,
                labels=labels,
                namespace=namespace,
            )
        submitted.append(SubmittedJob(info.id, info.url, job_plan))
    return submitted


def parse_run_ref(text: str) -> tuple[str, str] | None:
    """(repo id, branch) from 'OWNER/NAME@residuals-run-…' as `jobs run --shards` prints it; else None."""
    from .split_run import BRANCH_PREFIX

    repo, at, branch = text.strip().partition("@")
    return (repo, branch) if at and branch.startswith(BRANCH_PREFIX) and "/" in repo else None


@dataclass(frozen=True)
class RunStatus:
    repo_id: str
    branch: str
    jobs: list[Any]  # JobInfo of every job of the run
    shards_there: int
    shards_total: int | None
    published: bool

    @property
    def finished(self) -> bool:
        return self.published or all(j.status.stage in FINAL_STAGES for j in self.jobs)

    def describe(self) -> str:
        stages: dict[str, int] = {}
        for job in self.jobs:
            stages[job.status.stage] = stages.get(job.status.stage, 0) + 1
        jobs_text = ", ".join(f"{n} {stage}" for stage, n in sorted(stages.items())) or "no jobs"
        there = f"{self.shards_there} of {self.shards_total}" if self.shards_total else str(self.shards_there)
        state = "published to main" if self.published else f"{there} shards on the run branch"
        return f"run {self.repo_id}@{self.branch}: {state}; jobs: {jobs_text}"

    def job_lines(self, jobs: list[Any] | None = None) -> list[str]:
        """One line per job (of `jobs`, default all): its part of the run, id, stage and message."""
        lines = []
        for job in self.jobs if jobs is None else jobs:
            part = (job.labels or {}).get("residuals-part", "?").replace("-of-", "/")
            message = f" — {job.status.message}" if job.status.message else ""
            lines.append(f"job {part} {job.id}: {job.status.stage}{message}")
        return lines


def _run_jobs(api: Any, branch: str, namespace: str | None, token: str | None) -> list[Any]:
    """Every job of a split run (found by its label), in any stage."""
    return with_rate_limits(
        lambda: list(api.list_jobs(labels={RUN_LABEL: branch}, namespace=namespace, token=token))
    )


def split_run_status(ref: str, *, token: str | None, namespace: str | None = None) -> RunStatus:
    """Every job of a split run with its stage, and how many shards its branch holds."""
    from .split_run import run_state

    repo_id, branch = parse_run_ref(ref)
    api = _api(token)
    with hub_errors(repo_id, None):
        listed = _run_jobs(api, branch, namespace, token)
        state = run_state(api, repo_id, branch)
    return RunStatus(repo_id, branch, listed, len(state.recorded), state.shards_total, state.published)


def cancel_split_run(ref: str, *, token: str | None, namespace: str | None = None) -> list[str]:
    """Cancel every job of a split run still scheduled or running; the ids cancelled."""
    status = split_run_status(ref, token=token, namespace=namespace)
    cancelled = []
    for job in status.jobs:
        if job.status.stage in LIVE_STAGES:
            cancel_job(job.id, token=token, namespace=namespace or (job.owner.name if job.owner else None))
            cancelled.append(job.id)
    return cancelled
