"""A run split over several Jobs by output shard: shares write into a run branch, one commit publishes."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from residuals_core.cli import main

ALICE = "hf_alice_write"
SHARD = "80KB"  # the llama family below at this size: 11 output shards


def upload_family(fam, prefix: str) -> dict[str, str]:
    api = HfApi(token=ALICE)
    repos = {}
    for role in ("base", "instruct", "target"):
        repos[role] = f"alice/{prefix}-{role}"
        api.create_repo(repos[role], exist_ok=True)
        api.upload_folder(repo_id=repos[role], folder_path=str(fam[role]))
    return repos


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
