"""The real Hub's ways, each mimicked by the test Hub (DESIGN.md 3b) and handled by the engine: Xet uploads,
redirected reads, upload modes from .gitattributes, case-insensitive ids, rate limits, a late or refused
commit, card validation, token scopes and job timeouts."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi
from test_hub_native import pulled_state, same, upload
from tiny_models import load_state

from residuals_core import ResidualsError, compute_residuals, merge_models
from residuals_core.cli import main

ALICE = "hf_alice_write"


@pytest.fixture
def family_on_hub(hub, families):
    fam = families("llama")
    return fam, {role: upload(fam[role], f"alice/real-{role}") for role in ("base", "instruct", "target")}


def test_weights_come_from_a_second_origin_that_never_sees_the_token(hub, family_on_hub, tmp_path):
    fam, repos = family_on_hub
    hub.log.clear()
    result = compute_residuals(repos["base"], repos["instruct"], tmp_path / "res", token=ALICE)
    resolves = [r for r in hub.log if "/resolve/" in r["path"] and r["path"].endswith(".safetensors")]
    cdn = [r for r in hub.log if r["path"].startswith("cdn:")]
    assert resolves and cdn  # every weight read was redirected ...
    assert all(r["range"] for r in cdn) and not any(
        r["token"] for r in cdn
    )  # ... kept its Range, lost the token
    local = compute_residuals(fam["base"], fam["instruct"], tmp_path / "local")
    assert same(load_state(result.path), load_state(local.path))
    # the second origin is strict: a request that carries a token is refused, as by S3 or a CDN
    location = httpx.get(f"{hub.url}/alice/real-base/resolve/main/model.safetensors").headers["location"]
    assert httpx.get(location, headers={"Authorization": f"Bearer {ALICE}"}).status_code == 400


def test_a_shard_the_hub_wants_in_regular_mode_is_kept_until_the_commit(hub, family_on_hub, tmp_path):
    """A repo whose .gitattributes does not send *.safetensors to LFS: small shards travel in the commit."""
    fam, repos = family_on_hub
    api = HfApi(token=ALICE)
    api.create_repo("alice/plain-attributes")
    api.upload_file(path_or_fileobj=b"*.bin filter=lfs diff=lfs merge=lfs -text\n",
                    path_in_repo=".gitattributes", repo_id="alice/plain-attributes")  # fmt: skip
    hub.log.clear()  # (uploading the family may have gone through Xet)
    merge_models(
        repos["base"], repos["instruct"], repos["target"], push_to="alice/plain-attributes", token=ALICE
    )
    local = merge_models(fam["base"], fam["instruct"], fam["target"], tmp_path / "local")
    assert same(pulled_state("alice/plain-attributes", tmp_path), load_state(local.path))
    assert not [r for r in hub.log if r["method"] == "XET"]  # nothing went through Xet: all in the commit


def test_repo_ids_are_compared_as_the_hub_compares_them(hub, family_on_hub, monkeypatch):
    _fam, repos = family_on_hub
    before = hub.repos["alice/real-target"].head
    with pytest.raises(ResidualsError, match=r"one of this run's inputs.*case-insensitive"):
        merge_models(
            repos["base"], repos["instruct"], repos["target"], push_to="Alice/Real-TARGET", token=ALICE
        )
    assert hub.repos["alice/real-target"].head == before
    # the API answers other spellings with a 307 to the canonical name
    answer = httpx.get(f"{hub.url}/api/models/ALICE/Real-Base", follow_redirects=False)
    assert answer.status_code == 307 and answer.headers["location"] == "/api/models/alice/real-base"
    # two runs racing for one new name: the one that did not create it says so and deletes nothing
    HfApi(token=ALICE).create_repo("alice/raced")
    monkeypatch.setattr(HfApi, "repo_exists", lambda self, *a, **k: False)  # it did not exist a moment ago
    with pytest.raises(ResidualsError, match="alice/raced was created by someone else"):
        merge_models(repos["base"], repos["instruct"], repos["target"], push_to="alice/raced", token=ALICE)
    assert "alice/raced" in hub.repos


@pytest.mark.slow
def test_rate_limits_are_waited_out_and_said(hub, family_on_hub, tmp_path, caplog):
    _fam, repos = family_on_hub
    hub.rate_limit("api", 3, reset_s=0)
    hub.rate_limit("resolvers", 2, reset_s=0)
    with caplog.at_level(logging.WARNING):
        result = compute_residuals(repos["base"], repos["instruct"], tmp_path / "res", token=ALICE)
    assert result.path.is_dir()
    assert any("rate-limit" in r.getMessage().lower() for r in caplog.records)
    assert len([r for r in hub.log if r["path"].startswith("/api/")]) > 3
    # when the limit outlasts the retries, the words say so (not "check the id and your token")
    hub.rate_limit("api", 100, reset_s=0)
    try:
        with pytest.raises(ResidualsError, match=r"rate-limiting.*'api' limit") as failure:
            compute_residuals(repos["base"], repos["instruct"], tmp_path / "res2", token=ALICE)
    finally:
        hub.rate_limit("api", 0)
    assert "check the id" not in str(failure.value).lower()


def test_whoami_is_asked_once_per_token(hub, family_on_hub, tmp_path):
    _fam, repos = family_on_hub
    for name in ("who-1", "who-2"):
        compute_residuals(repos["base"], repos["instruct"], push_to=f"alice/{name}", token=ALICE)
    assert len(hub.requests("GET", "/api/whoami-v2")) <= 1


def test_a_commit_that_lands_then_times_out_is_found_not_repeated(hub, family_on_hub, tmp_path):
    fam, repos = family_on_hub
    hub.commit_faults = ["landed-then-504"]
    result = merge_models(
        repos["base"], repos["instruct"], repos["target"], push_to="alice/late", token=ALICE
    )
    assert result.url.endswith("alice/late")
    assert len(hub.repos["alice/late"].commits) == 2  # the initial commit and ours, once
    local = merge_models(fam["base"], fam["instruct"], fam["target"], tmp_path / "local")
    assert same(pulled_state("alice/late", tmp_path), load_state(local.path))


def test_a_commit_lost_to_a_server_error_is_tried_again(hub, family_on_hub):
    _fam, repos = family_on_hub
    hub.commit_faults = ["500"]
    merge_models(repos["base"], repos["instruct"], repos["target"], push_to="alice/retried", token=ALICE)
    assert len(hub.repos["alice/retried"].commits) == 2
    assert len(hub.requests("POST", "/api/models/alice/retried/commit/")) == 2


def test_a_quota_refusal_is_said_as_such_and_the_push_resumes(hub, family_on_hub):
    _fam, repos = family_on_hub
    hub.commit_faults = ["quota"]
    with pytest.raises(
        ResidualsError, match=r"(?s)private storage quota is full.*kept without a commit"
    ) as failure:
        merge_models(
            repos["base"], repos["instruct"], repos["target"], push_to="alice/full", token=ALICE, private=True
        )
    assert "--private" in failure.value.fix
    stored = hub.cas_bytes()
    merge_models(
        repos["base"], repos["instruct"], repos["target"], push_to="alice/full", token=ALICE, private=True
    )
    assert hub.cas_bytes() == stored  # the resumed push sent no weight bytes again
    assert "model.safetensors" in hub.repos["alice/full"].head[1]


def test_a_card_the_hub_would_refuse_is_refused_before_any_upload(hub, family_on_hub, tmp_path):
    """Residuals whose config names an instruct model the Hub does not hold: apply's card would fail
    validate-yaml at commit time; it is refused before a byte is uploaded or a repo created."""
    import json

    from residuals_core import apply_residuals

    fam, repos = family_on_hub
    residuals = compute_residuals(fam["base"], fam["instruct"], tmp_path / "res").path
    config = json.loads((residuals / "config.json").read_text())
    config["instruct_model_name"] = "ghost/not-on-this-hub"
    (residuals / "config.json").write_text(json.dumps(config))
    from residuals_core.manifest import MANIFEST_NAME, file_digest

    manifest = json.loads((residuals / MANIFEST_NAME).read_text())  # the folder stays self-consistent
    manifest["files"]["config.json"] = file_digest(residuals / "config.json")
    (residuals / MANIFEST_NAME).write_text(json.dumps(manifest))
    hub.log.clear()
    with pytest.raises(
        ResidualsError, match=r"(?s)refuse the model card.*ghost/not-on-this-hub.*Nothing was uploaded"
    ):
        apply_residuals(residuals, repos["target"], push_to="alice/refused-card", token=ALICE)
    assert "alice/refused-card" not in hub.repos
    assert not [r for r in hub.log if "xet-write-token" in r["path"] or "/preupload/" in r["path"]]


def test_scopes_a_token_lacks_are_named(hub, family_on_hub, tmp_path):
    _, repos = family_on_hub
    hub.tokens["hf_oauth_read_only"] = {"name": "carol", "orgs": [], "scopes": {"read-repos"}}
    with pytest.raises(ResidualsError, match=r"(?s)lacks the 'manage-repos' scope.*Log in again"):
        compute_residuals(repos["base"], repos["instruct"], push_to="carol/res", token="hf_oauth_read_only")
    with pytest.raises(ResidualsError, match=r"lacks the 'jobs' scope"):
        main_run = ["jobs", "run", "--image", "hf.co/spaces/a/b", "--token", "hf_oauth_read_only",
                    "merge", "--base", repos["base"], "--instruct", repos["instruct"], "--target", repos["target"],
                    "--push-to", "carol/out"]  # fmt: skip
        from residuals_core import cli

        cli.run(main_run)
    # a gated repo: refused with words without access, read once granted
    hub.repos["alice/real-instruct"].gated = True
    try:
        with pytest.raises(ResidualsError, match="gated"):
            compute_residuals(repos["base"], repos["instruct"], tmp_path / "o1", token="hf_bob_write")
        hub.repos["alice/real-instruct"].granted.add("bob")
        assert compute_residuals(repos["base"], repos["instruct"], tmp_path / "o2", token="hf_bob_write").path
    finally:
        hub.repos["alice/real-instruct"].gated = False


@pytest.mark.slow
def test_jobs_get_a_timeout_from_their_estimate_and_fail_loudly(hub, family_on_hub, capsys):
    _, repos = family_on_hub
    argv = ["jobs", "run", "--image", "hf.co/spaces/alice/residuals-studio", "--token", ALICE]
    merge = ["merge", "--base", repos["base"], "--instruct", repos["instruct"], "--target", repos["target"]]
    capsys.readouterr()
    hub.job_stage_lag_s = 1.0  # the log ends a second before the stage does, as on the Hub
    try:
        assert main([*argv, "--follow", *merge, "--push-to", "alice/timed"]) == 0
        out = capsys.readouterr().out
        job_id = re.search(r"job (\w+) submitted", out).group(1)
        timeout = hub.jobs[job_id].spec["timeoutSeconds"]
        assert 10 * 60 < timeout < 30 * 60 and "timeout 16 min (2 x the estimate + 10 min" in out
        assert f"job {job_id} ended COMPLETED" in out
        # a job that runs past its timeout: --follow says so and exits non-zero
        hub.job_time_scale = 0.001
        assert main([*argv, "--timeout", "1s", "--follow", *merge, "--push-to", "alice/too-slow"]) == 1
        out = capsys.readouterr().out
        assert "ended ERROR: Job timeout" in out and "longer --timeout" in out
        failed = re.search(r"job (\w+) submitted: (\S+)", out)
        # status takes the printed URL or OWNER/ID and shows the Hub's message
        for ref in (failed.group(2), f"alice/{failed.group(1)}"):
            assert main(["jobs", "status", ref, "--token", ALICE]) == 0
            assert "ERROR — Job timeout" in capsys.readouterr().out
    finally:
        hub.job_stage_lag_s, hub.job_time_scale = 0.0, 1.0
        for job in hub.jobs.values():
            if job.proc is not None and job.proc.poll() is None:
                job.proc.kill()


def test_a_job_that_would_outlive_the_login_is_refused(hub, family_on_hub):
    from residuals_core import jobs

    _, repos = family_on_hub
    argv = ["merge", "--base", repos["base"], "--instruct", repos["instruct"], "--target", repos["target"],
            "--push-to", "alice/late-login"]  # fmt: skip
    with pytest.raises(ResidualsError, match=r"your login expires in 30 s"):
        jobs.run_job(argv, token=ALICE, image="hf.co/spaces/a/b", token_expires_at=time.time() + 30)
    assert not hub.requests("POST", "/api/jobs/")


def test_a_file_committed_to_a_branch_is_copied_to_main_without_a_second_upload(hub, tmp_path):
    """The Hub's branches and copies (what a run split over several Jobs hands its shards over with): a
    large file committed to a run's branch is copied into main's one commit by reference, then the
    branch goes; main shows the file only from that commit on."""
    from huggingface_hub import CommitOperationAdd, CommitOperationCopy

    api = HfApi(token=ALICE)
    api.create_repo("alice/branched")
    api.create_branch("alice/branched", branch="run-1")
    shard = tmp_path / "model-00001-of-00002.safetensors"
    shard.write_bytes(os.urandom(11 * 1024 * 1024))  # large: stored through Xet
    api.upload_file(
        path_or_fileobj=shard, path_in_repo=shard.name, repo_id="alice/branched", revision="run-1"
    )
    assert shard.name not in {
        f.rfilename for f in api.model_info("alice/branched").siblings
    }  # not on main yet
    cas_before = hub.cas_bytes()
    hub.log.clear()
    api.create_commit(
        "alice/branched",
        operations=[
            CommitOperationCopy(shard.name, shard.name, src_revision="run-1"),
            CommitOperationAdd("config.json", b"{}"),
        ],
        commit_message="the whole result",
    )
    api.delete_branch("alice/branched", branch="run-1")
    assert hub.cas_bytes() == cas_before and not hub.requests("PUT")  # nothing uploaded again …
    assert not hub.requests(contains="xet-write-token")  # … not even offered to the CAS
    assert hub.requests("POST", "/paths-info/run-1")  # the copy was made by reference to the branch
    assert len(hub.requests("POST", "/commit/")) == 1
    got = api.hf_hub_download("alice/branched", shard.name, cache_dir=tmp_path / "cache")
    assert Path(got).read_bytes() == shard.read_bytes()
    assert [b.name for b in api.list_repo_refs("alice/branched").branches] == ["main"]
