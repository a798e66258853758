"""A run split over several Jobs by output shard: shares write into a run branch, one commit publishes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from test_jobs import upload_family
from waits import wait_for

from residuals_core.cli import main

ALICE = "hf_alice_write"
SHARD = "80KB"  # the llama family below at this size: 11 output shards


def merge_argv(repos: dict[str, str], push_to: str) -> list[str]:
    return ["merge", "--base", repos["base"], "--instruct", repos["instruct"], "--target", repos["target"],
            "--push-to", push_to, "--max-shard-size", SHARD, "--token", ALICE, "--quiet"]  # fmt: skip


def same_result(api: HfApi, one: str, other: str, tmp_path: Path) -> None:
    """Every file of two pushed results is equal byte for byte (the card differs only in the repo's name)."""
    a = Path(api.snapshot_download(one, cache_dir=tmp_path / "a"))
    b = Path(api.snapshot_download(other, cache_dir=tmp_path / "b"))
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    assert names == sorted(p.name for p in b.iterdir() if p.is_file())
    for name in names:
        left, right = (a / name).read_bytes(), (b / name).read_bytes()
        if name == "README.md":
            left = left.replace(one.encode(), other.encode())
        assert left == right, name


def test_shares_written_in_any_order_publish_one_commit_equal_to_a_one_job_merge(
    hub, families, tmp_path, capsys
):
    fam = families("llama", size={"hidden": 64, "layers": 4})
    repos = upload_family(fam, "split")
    assert main(merge_argv(repos, "alice/split-one")) == 0
    api = HfApi(token=ALICE)
    shards = [
        f.rfilename for f in api.model_info("alice/split-one").siblings if f.rfilename.startswith("model-0")
    ]
    assert len(shards) == 11
    branch = "residuals-run-test"
    for part, expected in ((["--only-shards", "2,5"], "2 of 11"), (["--only-shards", "1,3"], "4 of 11")):
        capsys.readouterr()
        assert main([*merge_argv(repos, "alice/split-many"), "--run-branch", branch, *part]) == 0
        assert f"{expected} shards on the run branch" in capsys.readouterr().out
        assert [c.title for c in api.list_repo_commits("alice/split-many")] == [
            "initial commit"
        ]  # main untouched
    assert (
        main([*merge_argv(repos, "alice/split-many"), "--run-branch", branch]) == 0
    )  # the rest, then publish
    assert "merged model written to" in capsys.readouterr().out
    commits = api.list_repo_commits("alice/split-many")
    assert [c.title for c in commits] == ["Upload with Residuals Studio", "initial commit"]
    assert f"residuals-run: {branch}" in commits[0].message
    assert [b.name for b in api.list_repo_refs("alice/split-many").branches] == ["main"]
    same_result(api, "alice/split-one", "alice/split-many", tmp_path)


# ---- the same, as Jobs ----------------------------------------------------------------------------------
IMAGE = "hf.co/spaces/alice/residuals-studio"


def data_start(path: Path) -> int:
    """Where a safetensors file's tensor data begins (8-byte length + header)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def weight_reads(hub, repos: dict[str, str], fam) -> list[tuple[str, int, int, str]]:
    """(input file, first byte, last byte, job) of every ranged read of tensor data (headers left out)."""
    starts = {f"{repos[r]}/model.safetensors": data_start(Path(fam[r]) / "model.safetensors") for r in repos}
    reads = []
    for entry in hub.requests("GET", "/resolve/"):
        parts = entry["path"].strip("/").split("/")
        name = f"{parts[0]}/{parts[1]}/{parts[-1]}"
        if name not in starts or not entry["range"]:
            continue
        first, last = (int(x) for x in entry["range"].removeprefix("bytes=").split("-"))
        job = entry["agent"].split("origin/job-")[-1] if "origin/job-" in entry["agent"] else "client"
        if first > 0 and last >= starts[name]:  # a read from byte 0 is the header's (each job reads it)
            reads.append((name, max(first, starts[name]), last, job))
    return reads


@pytest.mark.slow
def test_a_merge_split_over_four_jobs_survives_a_killed_job_and_commits_once(hub, families, tmp_path, capsys):
    fam = families("llama", size={"hidden": 64, "layers": 4})
    repos = upload_family(fam, "jobsplit")
    argv = merge_argv(repos, "alice/jobsplit-merged")
    argv = [a for a in argv if a not in ("--token", ALICE)]
    api = HfApi(token=ALICE)
    committed: list[tuple[str, str, str]] = []  # (revision, path, job) of every commit of the result

    def on_commit(repo_id, revision, paths, agent):
        if repo_id.lower() != "alice/jobsplit-merged":
            return
        job = agent.split("origin/job-")[-1] if "origin/job-" in agent else "client"
        committed.extend((revision, p, job) for p in paths)
        if "model-00002-of-00011.safetensors" in paths and revision != "main":
            hub.jobs[job].proc.kill()  # job 2 dies right after its first shard is on the branch

    hub.on_commit = on_commit
    cas_before = hub.cas_bytes()
    try:
        capsys.readouterr()
        code = main(["jobs", "run", "--shards", "4", "--follow", "--image", IMAGE, "--token", ALICE, *argv])
        captured = capsys.readouterr()
        out = captured.out
        assert code == 1, captured  # one job failed: the run is not complete …
        assert "11 output shards" in out and "job 2/4: shards 2,6,10" in out and "$" in out
        assert "run the same `jobs run --shards` command again" in out
        assert [c.title for c in api.list_repo_commits("alice/jobsplit-merged")] == [
            "initial commit"
        ]  # … main untouched
        killed = {j for r, p, j in committed if p.endswith("model-00002-of-00011.safetensors")}
        there = {int(p[6:11]) for r, p, j in committed if r != "main" and p.startswith("model-0")}
        missing = sorted({2, 6, 10} - there)  # a commit the killed job had in flight may have landed
        assert 2 in there and missing and len(there) == 11 - len(missing)
        ref = re.search(r"run (\S+@residuals-run-\w+):", out).group(1)
        assert main(["jobs", "status", ref, "--token", ALICE]) == 0
        status = capsys.readouterr().out
        assert f"{len(there)} of 11 shards on the run branch" in status and "3 COMPLETED, 1 ERROR" in status

        # the failed job's shards alone, as one job; the others' are not written again
        code = main(["jobs", "run", "--shards", "1", "--follow", "--image", IMAGE, "--token", ALICE, *argv])
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"{len(there)} already on the run branch" in out
        assert f"job 1/1: shards {','.join(map(str, missing))}" in out
    finally:
        hub.on_commit = None
    commits = api.list_repo_commits("alice/jobsplit-merged")
    assert [c.title for c in commits] == ["Upload with Residuals Studio", "initial commit"]  # one commit
    assert [b.name for b in api.list_repo_refs("alice/jobsplit-merged").branches] == ["main"]

    # no shard uploaded twice: each committed to the branch once, and the store grew by one copy of them
    shard_commits = sorted(p for r, p, j in committed if r != "main" and p.startswith("model-0"))
    assert shard_commits == [f"model-{i:05d}-of-00011.safetensors" for i in range(1, 12)]
    sizes = {
        f.rfilename: f.size for f in api.model_info("alice/jobsplit-merged", files_metadata=True).siblings
    }
    shard_bytes = sum(size for name, size in sizes.items() if name.startswith("model-0"))
    # the killed job may have sent part of a shard it never committed; the test Hub gives each job its own
    # CAS, so its rerun cannot deduplicate against those bytes as the Hub's one Xet store does
    in_flight = sum(sizes[f"model-{n:05d}-of-00011.safetensors"] for n in missing)
    stored = hub.cas_bytes() - cas_before
    assert stored <= (shard_bytes + in_flight) * 1.02, (stored, shard_bytes, in_flight)
    # no tensor byte read by two jobs (but what the killed job read for a shard it never committed,
    # which its rerun read again); the client that planned the run read headers only
    by_job: dict[str, list] = {}
    for name, first, last, job in weight_reads(hub, repos, fam):
        by_job.setdefault(job, []).append((name, first, last))
    assert "client" not in by_job
    rerun = next(j for r, p, j in committed if p == f"model-{missing[0]:05d}-of-00011.safetensors")
    readers = sorted(by_job)
    assert len(readers) == 5  # four jobs and the rerun
    for i, a in enumerate(readers):
        for b in readers[i + 1 :]:
            if {a, b} == {rerun, *killed}:
                continue
            for name, f1, l1 in by_job[a]:
                for other, f2, l2 in by_job[b]:
                    assert name != other or l1 < f2 or l2 < f1, (a, b, name, (f1, l1), (f2, l2))
    print(
        f"reads per job {[len(by_job[j]) for j in readers]}, stored {stored} B for {shard_bytes} B of shards"
    )

    # the same bytes as one job's merge
    assert main(["merge", *argv[1:-5], "--push-to", "alice/jobsplit-one", "--max-shard-size", SHARD,
                 "--token", ALICE, "--quiet"]) == 0  # fmt: skip
    same_result(api, "alice/jobsplit-one", "alice/jobsplit-merged", tmp_path)


@pytest.mark.slow
def test_cancel_stops_every_job_of_a_run_and_leaves_main_untouched(hub, families, capsys):
    fam = families("llama", size={"hidden": 64, "layers": 4})
    repos = upload_family(fam, "cancelsplit")
    argv = [a for a in merge_argv(repos, "alice/cancelsplit-merged") if a not in ("--token", ALICE)]
    hub.link.bytes_per_s = 100_000  # a slow line: the jobs are still streaming when the run is cancelled
    try:
        capsys.readouterr()
        assert main(["jobs", "run", "--shards", "3", "--image", IMAGE, "--token", ALICE, *argv]) == 0
        ref = re.search(r"run (\S+@residuals-run-\w+):", capsys.readouterr().out).group(1)
        branch = ref.split("@")[1]
        run_jobs = [
            j for j in hub.jobs.values() if (j.spec.get("labels") or {}).get("residuals-run") == branch
        ]
        assert len(run_jobs) == 3
        assert main(["jobs", "cancel", ref, "--token", ALICE]) == 0
        assert "cancel requested for 3 job(s)" in capsys.readouterr().out
        wait_for(
            lambda: all(j.stage == "CANCELED" for j in run_jobs), what="every job of the run is cancelled"
        )
    finally:
        hub.link.bytes_per_s = None
    assert [c.title for c in HfApi(token=ALICE).list_repo_commits("alice/cancelsplit-merged")] == [
        "initial commit"
    ]


def test_shard_numbers_and_their_jobs():
    from residuals_core.errors import ResidualsError
    from residuals_core.split_run import assign_shards, parse_shard_numbers

    assert parse_shard_numbers("3") == (3,) and parse_shard_numbers("7,2-4,3") == (2, 3, 4, 7)
    assert parse_shard_numbers("none") == ()
    for bad in ("0", "x", "2-", ""):
        with pytest.raises(ResidualsError, match="not a list of shard numbers"):
            parse_shard_numbers(bad)
    assert assign_shards(list(range(1, 12)), 4) == [[1, 5, 9], [2, 6, 10], [3, 7, 11], [4, 8]]
    assert assign_shards([6, 10], 1) == [[6, 10]]


def test_the_space_offers_the_split_past_its_bound_follows_every_job_and_cancels_them(
    hub, families, tmp_path, monkeypatch
):
    """Plan shows one job against the split; Run as a Job submits the split, Follow my job shows every job
    until the one commit, the result equals a one-job merge; Cancel my job cancels every job of a run."""
    from studio.settings import Settings
    from studio.ui import build

    fam = families("llama", size={"hidden": 64, "layers": 4})
    repos = upload_family(fam, "spacesplit")
    monkeypatch.setenv("STUDIO_JOB_IMAGE", IMAGE)
    fields = (repos["base"], repos["instruct"], repos["target"], 1.0, "same as target")
    settings = Settings(job_max_shard_size=SHARD, job_poll_seconds=0.2)
    handlers = build(settings).handlers
    before = len(hub.jobs)

    within = handlers["plan_job"](*fields, "spacesplit-merged", True, "cpu-upgrade", "auto", ALICE, {})
    assert "**one job**" in within and "split over" not in within and "⏱" not in within
    past = build(Settings(job_max_shard_size=SHARD, job_split_seconds=60)).handlers["plan_job"](
        *fields, "spacesplit-merged", True, "cpu-upgrade", "1", ALICE, {}
    )
    assert "⏱ one job takes more than 60 s" in past and "split over" not in past
    asked = handlers["plan_job"](*fields, "spacesplit-merged", True, "cpu-upgrade", "4", ALICE, {})
    assert "11 output shards" in asked and "**split over 4 jobs**" in asked
    assert "job 4: shards 4, 8 —" in asked and "$" in asked  # each job's share, and the price
    assert len(hub.jobs) == before  # planning submits nothing

    workspace: dict = {}
    status, seen, _ = handlers["run_job"](
        *fields, "spacesplit-merged", True, "cpu-upgrade", "4", [], ALICE, workspace
    )
    assert "4 jobs submitted on your account" in status and len(hub.jobs) == before + 4
    record = seen[-1]
    assert record["run"].startswith("residuals-run-") and record["repo"] == "alice/spacesplit-merged"
    updates = list(handlers["follow_job"](seen, ALICE, {}))
    final, lines = updates[-1]
    assert "**COMPLETED**" in final and "alice/spacesplit-merged" in final
    assert "published to main" in lines and len(re.findall(r"\(\d-of-4\): [A-Z]+", lines)) == 4
    assert len(updates) > 2  # the jobs' stages came while they ran
    api = HfApi(token=ALICE)
    titles = [c.title for c in api.list_repo_commits("alice/spacesplit-merged")]
    assert titles == ["Upload with Residuals Studio", "initial commit"]  # one commit publishes the run
    assert main(merge_argv(repos, "alice/spacesplit-one")) == 0
    one = Path(api.snapshot_download("alice/spacesplit-one", cache_dir=tmp_path / "one"))
    split = Path(api.snapshot_download("alice/spacesplit-merged", cache_dir=tmp_path / "split"))
    weights = sorted(p.name for p in one.glob("model*"))
    assert len(weights) == 12  # 11 shards and the index
    assert all((one / name).read_bytes() == (split / name).read_bytes() for name in weights)

    hub.link.bytes_per_s = 100_000  # a slow line: the jobs are still streaming when they are cancelled
    try:
        with pytest.raises(Exception, match="Jobs: 3 is not a choice offered here"):
            handlers["run_job"](*fields, "spacesplit-cancelled", True, "cpu-upgrade", "3", [], ALICE, {})
        _, seen, _ = handlers["run_job"](
            *fields, "spacesplit-cancelled", True, "cpu-upgrade", "2", [], ALICE, {}
        )
        cancelled = handlers["cancel_my_job"](seen, ALICE, {})
        assert "2 job(s) of the split run cancelled" in cancelled
        branch = seen[-1]["run"]
        run_jobs = [
            j for j in hub.jobs.values() if (j.spec.get("labels") or {}).get("residuals-run") == branch
        ]
        wait_for(
            lambda: all(j.stage == "CANCELED" for j in run_jobs), what="every job of the run is cancelled"
        )
    finally:
        hub.link.bytes_per_s = None
    assert [c.title for c in api.list_repo_commits("alice/spacesplit-cancelled")] == ["initial commit"]
    assert "Nothing to cancel" in handlers["cancel_my_job"](seen, ALICE, {})


def test_a_run_is_split_only_as_far_as_its_busiest_job_needs():
    from residuals_core.jobs import SplitPlan

    def plan(shards: int, shard_bytes: int) -> SplitPlan:
        files = [{"file": f"model-{i}.safetensors", "bytes": shard_bytes} for i in range(1, shards + 1)]
        todo = list(range(1, shards + 1))
        return SplitPlan("me/out", "residuals-run-0", [], files, [], [], [], [], "cpu-basic", 0.03, False,
                         3 * shards * shard_bytes, todo).split(1)  # fmt: skip

    # one job: 3 × 160 GB read + 160 GB written at 100 MB/s = 6400 s, + 180 s of start-up
    big = plan(8, 20 * 10**9)
    assert [round(j.estimate_s) for j in big.jobs] == [6580]
    assert big.fewest_jobs_within(7000) == 1
    assert big.fewest_jobs_within(3600) == 2  # 3380 s each
    assert big.fewest_jobs_within(1000) == 8  # 980 s each; 4 jobs would take 1780 s
    split = big.split(2)
    assert split.parts == [[1, 3, 5, 7], [2, 4, 6, 8]] and round(split.wall_s) == 3380
    assert round(split.job_hours * 3600) == 2 * 3380  # a split pays a start-up per job
    assert "$0.06" in split.cost_text()  # 1.88 job-hours at $0.03/h
    few = plan(5, 20 * 10**9)
    assert len(few.split(few.fewest_jobs_within(1)).parts) == 5  # never more jobs than shards
