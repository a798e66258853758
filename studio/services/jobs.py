"""A merge too big for the Space, run as a Hugging Face Job on the visitor's own account, and followed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from huggingface_hub import HfApi

from residuals_core import jobs
from residuals_core.demo import DEMO_PREFIX
from residuals_core.errors import ResidualsError
from residuals_core.hub import HUB_PREFIX, valid_repo_id, writable_repo_id

from ..auth import Login
from ..context import StudioContext, Workspace
from . import repo_name_given
from .merge import SAME_AS_TARGET, space_scale

FLAVORS = ["cpu-basic", "cpu-upgrade", "t4-small", "a10g-small", "a10g-large"]


@dataclass(frozen=True)
class SubmittedJob:
    id: str
    owner: str  # the namespace the job runs in
    repo: str  # the full id of the repo it pushes to
    plan: jobs.JobPlan

    def record(self) -> dict[str, str]:
        """What the page keeps of it (in the session, and in the browser to follow it after a reload)."""
        return {"id": self.id, "owner": self.owner, "repo": self.repo}


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


def submit(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    *,
    base: str,
    instruct: str,
    target: str,
    scale: Any,
    dtype: str,
    repo_name: str,
    private: bool,
    flavor: str,
    login: Login | None,
    pasted_token: str | None,
    image: str | None,
) -> SubmittedJob:
    """The one-pass merge as a Job under the visitor's account, pushing to a repo checked beforehand."""
    ctx.check_open(workspace, session_hash)
    write_token = ctx.credentials.write_token(
        login, pasted_token
    )  # refused here, before anything is submitted
    scale = space_scale(scale)
    if flavor not in FLAVORS:
        raise ResidualsError("That hardware is not offered here.", f"Choose among {', '.join(FLAVORS)}.")
    ctx.credentials.check_may_run_jobs(login)
    if image is None:
        raise ResidualsError("Jobs need an image of this app.", "Run it as a Space, or set STUDIO_JOB_IMAGE.")
    argv = ["merge", "--base", job_model(ctx, base, "base model", workspace),
            "--instruct", job_model(ctx, instruct, "instruct model", workspace),
            "--target", job_model(ctx, target, "target model", workspace), "--scale", f"{scale:g}"]  # fmt: skip
    repo = writable_repo_id(HfApi(token=write_token), repo_name_given(repo_name))
    argv += ["--push-to", repo, "--quiet"]
    if dtype != SAME_AS_TARGET:
        argv += ["--dtype", dtype]
    if private:
        argv.append("--private")
    info = jobs.run_job(
        argv,
        token=write_token,
        image=image,
        flavor=flavor,
        token_expires_at=(login.expires_at if login is not None else None)
        or None,  # 0: given through the API
    )
    submitted = SubmittedJob(info.id, jobs.parse_job_ref(info.url)[0] or repo.split("/")[0], repo, info.plan)
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
    return record


def follow(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    jobs_seen: object,
    login: Login | None,
    pasted_token: str | None,
) -> Iterator[JobUpdate]:
    """The latest job's log lines as they come, then its final stage."""
    ctx.check_open(workspace, session_hash)
    job = followed_record(workspace, jobs_seen)
    write_token = ctx.credentials.write_token(login, pasted_token)
    ref = f"{job['owner']}/{job['id']}"
    lines: list[str] = []
    yield JobUpdate(job, lines)
    for line in jobs.job_logs(ref, token=write_token):
        lines.append(line)
        yield JobUpdate(job, lines[-40:])
    final = jobs.wait_for_job(ref, token=write_token)  # the log can end before the job does
    yield JobUpdate(job, lines[-40:], final.status.stage, final.status.message)
