"""Jobs: a command run on the user's account through huggingface_hub's Jobs API, against the test Hub,
which runs a submitted job's command as a local subprocess (its image stands for this machine)."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from huggingface_hub import HfApi
from tiny_models import load_state
from waits import wait_for

from residuals_core import merge_models
from residuals_core.cli import main

pytestmark = pytest.mark.slow  # Jobs, the demo family's build, a browser: seconds each

ALICE = "hf_alice_write"
IMAGE = "hf.co/spaces/alice/residuals-studio"


def upload_family(fam, prefix: str) -> dict[str, str]:
    api = HfApi(token=ALICE)
    repos = {}
    for role in ("base", "instruct", "target"):
        repos[role] = f"alice/{prefix}-{role}"
        api.create_repo(repos[role], exist_ok=True)
        api.upload_folder(repo_id=repos[role], folder_path=str(fam[role]))
    return repos


def submit(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(["jobs", "run", "--image", IMAGE, "--token", ALICE, *argv]) == 0
    out = capsys.readouterr().out
    return re.search(r"job (\w+) submitted: (\S+)", out).group(1)


def wait(hub, job_id: str, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while hub.jobs[job_id].stage == "RUNNING" and time.time() < deadline:
        time.sleep(0.1)
    return hub.jobs[job_id].stage


def test_a_merge_job_runs_streams_its_logs_and_pushes(hub, families, tmp_path, capsys):
    fam = families("llama")
    repos = upload_family(fam, "job")
    job_id = submit(capsys, "merge", "--base", repos["base"], "--instruct", repos["instruct"],
                    "--target", repos["target"], "--push-to", "alice/job-merged")  # fmt: skip
    job = hub.jobs[job_id]
    assert job.spec["spaceId"] == "alice/residuals-studio"
    assert job.spec["secrets"] == {"HF_TOKEN": ALICE}  # the token travels as a secret, and only so
    visible = json.dumps({k: job.spec.get(k) for k in ("command", "arguments", "environment", "labels")})
    assert ALICE not in visible
    assert main(["jobs", "logs", job_id, "--token", ALICE]) == 0
    logs = capsys.readouterr().out
    assert "merged model written to" in logs and "alice/job-merged" in logs  # read like a local run
    assert wait(hub, job_id) == "COMPLETED"
    assert main(["jobs", "status", job_id, "--token", ALICE]) == 0
    assert "COMPLETED" in capsys.readouterr().out
    pushed = HfApi(token=ALICE).snapshot_download("alice/job-merged", local_dir=tmp_path / "pushed")
    local = merge_models(fam["base"], fam["instruct"], fam["target"], tmp_path / "local").path
    a, b = load_state(pushed), load_state(local)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_cancel_stops_the_job(hub, families, capsys):
    fam = families("llama", size={"hidden": 256, "layers": 4})
    repos = upload_family(fam, "slow")
    hub.link.bytes_per_s = 500_000  # a slow line: the job is still streaming when it is cancelled
    hub.log.clear()
    try:
        job_id = submit(capsys, "merge", "--base", repos["base"], "--instruct", repos["instruct"],
                        "--target", repos["target"], "--push-to", "alice/slow-merged")  # fmt: skip
        wait_for(lambda: hub.requests("GET", "/resolve/"), what="the job reads its inputs")
        assert hub.jobs[job_id].stage == "RUNNING"
        assert main(["jobs", "cancel", job_id, "--token", ALICE]) == 0
        assert wait(hub, job_id, 30) == "CANCELED"
        assert hub.jobs[job_id].proc.wait(timeout=30) is not None  # the process is gone
    finally:
        hub.link.bytes_per_s = None
    # the repo the cancelled run created is deleted
    wait_for(lambda: "alice/slow-merged" not in hub.repos, what="the cancelled run's repo is deleted")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (
            ["merge", "--base", "a/b", "--instruct", "a/c", "--target", "a/d", "--out", "x"],
            "must go to the Hub",
        ),
        (["inspect", "a/b"], "A Job runs one of compute, apply, merge, lora"),
        (["merge", "--base", "a/b", "--push-to", "alice/x", "--token", ALICE], "holds a token"),
    ],
)
def test_refused_submissions_say_why(hub, capsys, argv, words):
    assert main(["jobs", "run", "--image", IMAGE, "--token", ALICE, *argv]) == 2
    assert words in capsys.readouterr().err
    assert not hub.jobs or all(j.spec.get("command", [])[3:] != argv for j in hub.jobs.values())


def test_no_token_or_a_foreign_namespace_refused(hub, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    argv = ["merge", "--base", "a/b", "--instruct", "a/c", "--target", "a/d", "--push-to", "alice/x"]
    assert main(["jobs", "run", "--image", IMAGE, *argv]) == 2
    assert "needs your Hugging Face token" in capsys.readouterr().err
    count = len(hub.jobs)
    assert (
        main(
            [
                "jobs",
                "run",
                "--image",
                IMAGE,
                "--token",
                "hf_bob_write",
                "--namespace",
                "residuals-lab",
                *argv,
            ]
        )
        == 2
    )
    assert "error:" in capsys.readouterr().err and len(hub.jobs) == count


def test_the_app_follows_a_job_until_its_repo_appears(hub, families):
    from residuals_core import jobs
    from studio.settings import Settings
    from studio.ui import build

    fam = families("llama")
    repos = upload_family(fam, "follow")
    argv = ["merge", "--base", repos["base"], "--instruct", repos["instruct"], "--target", repos["target"],
            "--push-to", "alice/follow-merged"]  # fmt: skip
    info = jobs.run_job(argv, token=ALICE, image=IMAGE)
    updates = list(
        build(Settings()).handlers["follow_job"](
            [{"id": info.id, "owner": "alice", "repo": "alice/follow-merged"}], ALICE, None
        )
    )
    status, logs = updates[-1]
    assert "COMPLETED" in status and "alice/follow-merged" in status
    assert "merged model written to" in logs
    assert len(updates) > 2  # the logs came live, line by line
