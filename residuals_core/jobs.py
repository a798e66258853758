"""The same command, elsewhere: a compute / apply / merge / lora that pushes to the Hub, run as a
Hugging Face Job on the user's own account (huggingface_hub's `run_job`, `inspect_job`,
`fetch_job_logs`, `cancel_job`).

The job runs `python -m residuals_core <command> …` in an image that holds this project (the
Space's own image when run from a Space), so its logs read like a local run. The user's token
travels only as the job's secret `HF_TOKEN` — never in the command line, the environment or the
labels, which the Hub shows to anyone who can see the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .errors import ResidualsError
from .hub import hub_errors

JOB_COMMANDS = ("compute", "apply", "merge", "lora")
JOB_LABELS = {"created-by": "residuals-studio"}


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
    timeout: str | None = None,
    namespace: str | None = None,
) -> Any:
    """Submit `python -m residuals_core <argv>` as a Job; returns huggingface_hub's JobInfo (id, url)."""
    check_job_command(argv)
    api = _api(token)
    with hub_errors(namespace or "your account", None):
        return api.run_job(
            image=image,
            command=["python", "-m", "residuals_core", *argv],
            secrets={"HF_TOKEN": token},
            flavor=flavor,
            timeout=timeout,
            labels=dict(JOB_LABELS),
            namespace=namespace,
        )


def job_status(job_id: str, *, token: str | None, namespace: str | None = None) -> Any:
    with hub_errors(f"job {job_id}", None):
        return _api(token).inspect_job(job_id=job_id, namespace=namespace)


def job_logs(
    job_id: str, *, token: str | None, namespace: str | None = None, follow: bool = True
) -> Iterator[str]:
    """The job's log lines as they come, until it ends (`follow=False`: those logged so far)."""
    api = _api(token)
    with hub_errors(f"job {job_id}", None):
        yield from api.fetch_job_logs(job_id=job_id, namespace=namespace, follow=follow)


def cancel_job(job_id: str, *, token: str | None, namespace: str | None = None) -> None:
    with hub_errors(f"job {job_id}", None):
        _api(token).cancel_job(job_id=job_id, namespace=namespace)
