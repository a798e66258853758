"""A merge too big for the Space, run as Hugging Face Jobs on the visitor's own account, and followed.

Past a size (STUDIO_JOB_SPLIT_MINUTES for one job), the merge is offered split by output shard over
several jobs that run side by side and publish one commit (`residuals_core.jobs`' split run).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from huggingface_hub import HfApi

from residuals_core import jobs
from residuals_core.demo import DEMO_PREFIX
from residuals_core.errors import ResidualsError
from residuals_core.hub import HUB_PREFIX, valid_repo_id, writable_repo_id
from residuals_core.split_run import is_run_branch

from ..auth import Login
from ..context import StudioContext, Workspace
from . import repo_name_given
from .merge import SAME_AS_TARGET, space_scale

FLAVORS = ["cpu-basic", "cpu-upgrade", "t4-small", "a10g-small", "a10g-large"]
AUTO = "auto"
JOB_COUNTS = [AUTO, "1", "2", "4", "8", "16"]


@dataclass(frozen=True)
class MergeJob:
    """The one-pass merge a visitor asks to run as Jobs, as the page's fields give it."""

    base: str
    instruct: str
    target: str
    scale: Any
    dtype: str
    repo_name: str
    private: bool
    flavor: str
    job_count: Any = AUTO  # "auto" or a number of jobs among JOB_COUNTS


@dataclass(frozen=True)
class JobOffer:
    """A merge as Jobs before anything is submitted: the split chosen (the fewest jobs within the Space's
    bound when `auto`) and one job's estimate beside it, so the visitor sees what splitting buys."""

    chosen: jobs.SplitPlan
    one_job: jobs.SplitPlan
    split_after_s: float  # one job estimated past this: the Space offers the split


@dataclass(frozen=True)
class SubmittedJob:
    id: str  # the job, or the first job of a split run
    owner: str  # the namespace the job runs in
    repo: str  # the full id of the repo it pushes to
    plan: jobs.JobPlan | None = None  # one job
    offer: JobOffer | None = None  # a split run
    ids: tuple[str, ...] = ()  # every job of a split run

    @property
    def run(self) -> str | None:
        """The run branch of a split run."""
        return self.offer.chosen.branch if self.offer is not None else None

    def record(self) -> dict[str, str]:
        """What the page keeps of it (in the session, and in the browser to follow it after a reload)."""
        record = {"id": self.id, "owner": self.owner, "repo": self.repo}
        return {**record, "run": self.run} if self.run else record


@dataclass(frozen=True)
class JobUpdate:
    job: dict[str, str]  # its record
    lines: list[str]  # the log's last lines
    stage: str | None = None  # the final stage, once it has one
    message: str | None = None


def job_model(ctx: StudioContext, text: str, role: str, workspace: Workspace) -> str:
    """A model as a job's command line names it: `hf://org/name` (so that a folder of the same name in
    the job's image is never read instead) or `demo:NAME` (the image has the demo family) — no path
    of this Space; a result only this Space's disk holds is refused."""
    model = ctx.model(text, role, workspace)
    if model.startswith(HUB_PREFIX):
        return model
    if text.strip().startswith(DEMO_PREFIX):
        return text.strip()
    if not ctx.settings.on_space:
        return model  # running locally: a folder of this machine, as the command line takes it
    raise ResidualsError(
        f"The {role} is a result on this Space's disk, which a Job cannot read.",
        "Push it first, or write it straight into your Hub repo.",
    )


def _merge_command(ctx: StudioContext, workspace: Workspace, write_token: str, job: MergeJob) -> list[str]:
    """The one-pass merge as a job's command line, pushing to a repo checked beforehand; the hardware and
    the job count are checked here too, before anything is read or submitted."""
    if job.flavor not in FLAVORS:
        raise ResidualsError("That hardware is not offered here.", f"Choose among {', '.join(FLAVORS)}.")
    _job_count(job.job_count)
    scale = space_scale(job.scale)
    argv = ["merge", "--base", job_model(ctx, job.base, "base model", workspace),
            "--instruct", job_model(ctx, job.instruct, "instruct model", workspace),
            "--target", job_model(ctx, job.target, "target model", workspace), "--scale", f"{scale:g}"]  # fmt: skip
    repo = writable_repo_id(HfApi(token=write_token), repo_name_given(job.repo_name))
    argv += ["--push-to", repo, "--quiet"]
    if ctx.settings.job_max_shard_size:
        argv += ["--max-shard-size", ctx.settings.job_max_shard_size]
    if job.dtype != SAME_AS_TARGET:
        argv += ["--dtype", job.dtype]
    if job.private:
        argv.append("--private")
    return argv


def _job_count(text: Any) -> int | None:
    """How many jobs the visitor asked for; None for auto."""
    if str(text).strip() == AUTO:
        return None
    if str(text).strip() not in JOB_COUNTS:
        raise ResidualsError(
            f"Jobs: {str(text)[:20]} is not a choice offered here.", f"Choose among {', '.join(JOB_COUNTS)}."
        )
    return int(str(text).strip())


def _offer(ctx: StudioContext, argv: list[str], write_token: str, job: MergeJob) -> JobOffer:
    """Plan the run from the inputs' headers (and what its branch holds already), split as asked."""
    one_job = jobs.plan_split_run(argv, shards=1, token=write_token, flavor=job.flavor)
    count = _job_count(job.job_count)
    split_after = ctx.settings.job_split_seconds
    chosen = one_job.split(count if count is not None else one_job.fewest_jobs_within(split_after))
    return JobOffer(chosen, one_job, split_after)


def plan(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    job: MergeJob,
    *,
    login: Login | None,
    pasted_token: str | None,
) -> JobOffer:
    """What running the merge as Jobs would take and cost, one job and split, before submitting any."""
    ctx.check_open(workspace, session_hash)
    write_token = ctx.credentials.write_token(login, pasted_token)
    return _offer(ctx, _merge_command(ctx, workspace, write_token, job), write_token, job)


def submit(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    job: MergeJob,
    *,
    login: Login | None,
    pasted_token: str | None,
    image: str | None,
) -> SubmittedJob:
    """The one-pass merge as Jobs under the visitor's account: one job, or past the Space's bound (or as
    asked) a split run; a run whose branch holds shards already submits only the missing ones."""
    ctx.check_open(workspace, session_hash)
    write_token = ctx.credentials.write_token(
        login, pasted_token
    )  # refused here, before anything is submitted
    ctx.credentials.check_may_run_jobs(login)
    if image is None:
        raise ResidualsError("Jobs need an image of this app.", "Run it as a Space, or set STUDIO_JOB_IMAGE.")
    argv = _merge_command(ctx, workspace, write_token, job)
    repo = argv[argv.index("--push-to") + 1]
    expires_at = (login.expires_at if login is not None else None) or None  # 0: given through the API
    offer = _offer(ctx, argv, write_token, job) if _job_count(job.job_count) != 1 else None
    if offer is None or (len(offer.chosen.parts) <= 1 and not offer.chosen.done and not offer.chosen.busy):
        info = jobs.run_job(
            argv, token=write_token, image=image, flavor=job.flavor, token_expires_at=expires_at
        )
        submitted = SubmittedJob(info.id, _owner(info.url, repo), repo, plan=info.plan)
    else:
        if offer.chosen.published:
            raise ResidualsError(
                f"This merge was already published to {repo} by an earlier run.",
                "Open the repo, or name another repo under Push merged model.",
            )
        if not offer.chosen.parts:
            raise ResidualsError(
                f"Every shard of this merge is written or being written by a running job of its run "
                f"({offer.chosen.ref}).",
                "Press Follow my job to watch it; run it again only once a job has failed.",
            )
        started = jobs.submit_split_run(
            offer.chosen, token=write_token, image=image, token_expires_at=expires_at
        )
        ids = tuple(s.id for s in started)
        submitted = SubmittedJob(started[0].id, _owner(started[0].url, repo), repo, offer=offer, ids=ids)
    workspace["job"] = submitted.record()  # for this session (and API clients, which keep no browser state)
    return submitted


def followed_record(workspace: Workspace, jobs_seen: object) -> dict[str, str]:
    """The latest job this session or browser submitted; the browser's copy is checked, since any client
    can send anything there."""
    job = workspace.get("job") or (jobs_seen[-1] if isinstance(jobs_seen, list) and jobs_seen else None)
    if job is None:
        raise ResidualsError("No job was submitted from this browser yet.", "Submit one with Run as a Job.")
    job = job if isinstance(job, dict) else {}
    record = {key: str(job.get(key, "")) for key in ("id", "owner", "repo")}
    if not (record["id"].isalnum() and valid_repo_id(record["owner"]) and "/" in record["repo"]
            and valid_repo_id(record["repo"])):  # fmt: skip
        raise ResidualsError("This browser's record of its jobs is damaged.", "Submit the job again.")
    if job.get("run"):
        if not is_run_branch(str(job["run"])):
            raise ResidualsError("This browser's record of its jobs is damaged.", "Submit the job again.")
        record["run"] = str(job["run"])
    return record


def follow(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    jobs_seen: object,
    login: Login | None,
    pasted_token: str | None,
) -> Iterator[JobUpdate]:
    """The latest job's log lines as they come, then its final stage; for a split run, every job's stage
    and the shards on its branch, polled, until it is published or no job runs."""
    ctx.check_open(workspace, session_hash)
    job = followed_record(workspace, jobs_seen)
    write_token = ctx.credentials.write_token(login, pasted_token)
    if "run" in job:
        yield from _follow_run(ctx, job, write_token)
        return
    ref = f"{job['owner']}/{job['id']}"
    lines: list[str] = []
    yield JobUpdate(job, lines)
    for line in jobs.job_logs(ref, token=write_token):
        lines.append(line)
        yield JobUpdate(job, lines[-40:])
    final = jobs.wait_for_job(ref, token=write_token)  # the log can end before the job does
    yield JobUpdate(job, lines[-40:], final.status.stage, final.status.message)


def _owner(job_url: str, repo: str) -> str:
    """The namespace a submitted job runs in: from its URL, else the repo's owner."""
    return jobs.parse_job_ref(job_url)[0] or repo.split("/")[0]


def _run_ref(job: dict[str, str]) -> str:
    """How the engine names a split run (`jobs status REPO@BRANCH`)."""
    return f"{job['repo']}@{job['run']}"


def _follow_run(ctx: StudioContext, job: dict[str, str], token: str) -> Iterator[JobUpdate]:
    ref = _run_ref(job)
    seen: list[str] | None = None
    while True:
        status = jobs.split_run_status(ref, token=token, namespace=job["owner"])
        lines = [status.describe()] + [
            f"job {info.id} ({(info.labels or {}).get('residuals-part', '?')}): {info.status.stage}"
            for info in status.jobs
        ]
        if status.finished:
            break
        if lines != seen:
            seen = lines
            yield JobUpdate(job, lines)
        time.sleep(ctx.settings.job_poll_seconds)
    if status.published:
        yield JobUpdate(job, lines, "COMPLETED")
        return
    yield JobUpdate(
        job,
        lines,
        "INCOMPLETE",
        f"{status.shards_there} of {status.shards_total or '?'} shards are on the run branch and nothing was "
        "published; press Run as a Job again with the same models, repo and settings: only the missing "
        "shards are submitted",
    )


def cancel(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    jobs_seen: object,
    login: Login | None,
    pasted_token: str | None,
) -> tuple[dict[str, str], list[str]]:
    """Cancel the latest job (every job of a split run) still scheduled or running; the ids cancelled."""
    ctx.check_open(workspace, session_hash)
    job = followed_record(workspace, jobs_seen)
    write_token = ctx.credentials.write_token(login, pasted_token)
    if "run" in job:
        return job, jobs.cancel_split_run(_run_ref(job), token=write_token, namespace=job["owner"])
    status = jobs.job_status(job["id"], token=write_token, namespace=job["owner"])
    if status.status.stage not in jobs.LIVE_STAGES:
        return job, []
    jobs.cancel_job(job["id"], token=write_token, namespace=job["owner"])
    return job, [job["id"]]
