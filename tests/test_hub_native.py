"""The Hub-native engine: Hub ids streamed in, results streamed into a Hub repo, on a disk smaller than a model.

Everything runs through the real huggingface_hub client against the local test Hub; the CLI runs
as a subprocess (HF_ENDPOINT pointed at the test Hub), its local disk a tmpfs smaller than one input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from tiny_models import build_tokenizer, load_state, make_model, save

from residuals_core import Residuals, ResidualsError, apply_residuals, compute_residuals, merge_models

ALICE = "hf_alice_write"
ROOT = Path(__file__).resolve().parent.parent
MEDIUM = {"hidden": 256, "layers": 4}  # ~10 MB per model in float32


def upload(folder, repo_id, token=ALICE):
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder))
    return repo_id


def pulled_state(repo_id: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    folder = HfApi(token=ALICE).snapshot_download(repo_id, local_dir=tmp_path / repo_id.replace("/", "--"))
    return load_state(Path(folder))


def same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def run_cli(*args, env_extra=None, check=True, poll: Path | None = None):
    """Run the CLI; with `poll`, also the highest disk usage of that file system while it ran."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "residuals_core", *map(str, args), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    high = {"used": 0}
    baseline = shutil.disk_usage(poll).used if poll else 0

    def watch():
        while proc.poll() is None:
            high["used"] = max(high["used"], shutil.disk_usage(poll).used - baseline)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    if poll:
        watcher.start()
    out, err = proc.communicate(timeout=300)
    if poll:
        watcher.join()
    if check:
        assert proc.returncode == 0, err
    return proc.returncode, out, err, high["used"]


@pytest.fixture(scope="module")
def medium_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    tok = build_tokenizer()
    base = make_model("llama", len(tok), seed=1, **MEDIUM)
    from tiny_models import perturbed

    return {
        "base": save(base, tok, root / "base", max_shard_size="4MB"),
        "instruct": save(perturbed(base, 2), tok, root / "instruct", max_shard_size="4MB"),
        "target": save(perturbed(base, 3), tok, root / "target"),  # one file: layouts differ
    }


@pytest.fixture
def medium_on_hub(hub, medium_family):
    return {role: upload(folder, f"alice/medium-{role}") for role, folder in medium_family.items()}


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: smaller than one input model (~10 MB)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def small_disk_env(mount: Path) -> dict:
    return {
        "TMPDIR": str(mount),
        "HF_HOME": str(mount / "hf"),
        "HF_HUB_CACHE": str(mount / "hf" / "hub"),
        "HF_TOKEN": ALICE,
    }


@pytest.mark.slow
def test_merge_hub_to_hub_on_a_disk_smaller_than_one_model(
    hub, medium_family, medium_on_hub, small_disk, tmp_path
):
    """The issue's command: Hub ids in, --push-to out, equal bit for bit to the local-folder result."""
    model_bytes = sum(p.stat().st_size for p in medium_family["base"].glob("*.safetensors"))
    assert model_bytes > shutil.disk_usage(small_disk).total  # the disk cannot hold one input
    h = medium_on_hub
    hub.log.clear()
    _, out, _, high = run_cli(
        "merge", "--base", h["base"], "--instruct", h["instruct"], "--target", h["target"],
        "--push-to", "alice/medium-merged", "--max-shard-size", "1MB",
        env_extra=small_disk_env(small_disk), poll=small_disk,
    )  # fmt: skip
    log = list(hub.log)
    assert "alice/medium-merged" in out
    local = merge_models(
        medium_family["base"], medium_family["instruct"], medium_family["target"], tmp_path / "local"
    )
    assert same(pulled_state("alice/medium-merged", tmp_path), load_state(local.path))
    # local disk: about two 1 MB shards plus small files, far below one input model
    assert high < 4 * 1024 * 1024 < model_bytes
    assert not list(small_disk.rglob("*.safetensors"))  # nothing of the inputs was stored
    # the request log: ranged reads of the inputs, Xet uploads of the shards, one commit
    commits = [r for r in log if r["method"] == "POST" and "/commit/" in r["path"]]
    assert len(commits) == 1
    # every shard went up through Xet (no LFS batch or PUT at all), each rebuilt from the CAS once
    assert not [r for r in log if r["method"] == "PUT" or "lfs/objects" in r["path"]]
    assert [r for r in log if "/xet-write-token/" in r["path"]]
    rebuilt = [r for r in log if r["method"] == "XET"]
    index = json.loads(hub.blob_path("alice/medium-merged", "model.safetensors.index.json").read_text())
    assert len(rebuilt) == len(set(index["weight_map"].values())) > 2
    # weights are read by range from the CDN the Hub redirects to, which never sees a token
    reads = [r for r in log if r["method"] == "GET" and r["path"].startswith("cdn:")]
    assert reads and all(r["range"] for r in reads) and not any(r["token"] for r in reads)
    downloaded = sum(r["bytes"] for r in reads)
    assert downloaded < 1.1 * 3 * model_bytes  # each input about once (+ headers)
    print("\nrequest log of one Hub→Hub merge:")
    for r in log:
        print(
            f"  {r['method']:4} {r['path']}"
            + (f"  Range: {r['range']}" if r["range"] else "")
            + f"  {r['bytes']} B"
        )


@pytest.mark.slow
def test_compute_hub_to_hub_reads_back_and_applies(hub, medium_family, medium_on_hub, small_disk, tmp_path):
    h = medium_on_hub
    run_cli(
        "compute", "--base", h["base"], "--instruct", h["instruct"], "--push-to", "alice/medium-res",
        "--private", "--max-shard-size", "1MB", env_extra=small_disk_env(small_disk),
    )  # fmt: skip
    assert hub.repos["alice/medium-res"].private
    local = compute_residuals(medium_family["base"], medium_family["instruct"], tmp_path / "res")
    assert same(pulled_state("alice/medium-res", tmp_path), load_state(local.path))
    # the pushed residuals are read where they are (streamed), and rebuild the instruct model exactly
    out = apply_residuals("alice/medium-res", h["base"], tmp_path / "rebuilt", token=ALICE)
    assert same(load_state(out.path), load_state(medium_family["instruct"]))


def test_too_small_disk_refused_up_front_with_the_numbers(hub, medium_on_hub, small_disk):
    h = medium_on_hub
    code, _, err, _ = run_cli(
        "merge", "--base", h["base"], "--instruct", h["instruct"], "--target", h["target"],
        "--push-to", "alice/never-made", "--max-shard-size", "4MB",
        env_extra=small_disk_env(small_disk), check=False,
    )  # fmt: skip
    assert code == 2
    assert "two output shards" in err and "MB are free" in err and "--max-shard-size" in err
    assert "alice/never-made" not in hub.repos


@pytest.mark.slow
def test_cut_connections_are_resumed(hub, medium_family, medium_on_hub, tmp_path):
    h = medium_on_hub
    hub.flaky_every = 2  # every second ranged read of a weight file is cut half-way
    try:
        result = merge_models(h["base"], h["instruct"], h["target"], tmp_path / "m", read_ahead_bytes=2 << 20)
    finally:
        hub.flaky_every = 0
    local = merge_models(
        medium_family["base"], medium_family["instruct"], medium_family["target"], tmp_path / "l"
    )
    assert same(load_state(result.path), load_state(local.path))
    reads = [r for r in hub.log if r["method"] == "GET" and r["path"].endswith(".safetensors")]
    starts = [int(r["range"][6:].split("-")[0]) for r in reads]
    assert any(s > 0 and s % (1 << 20) for s in starts)  # resumed where a cut stopped, not from the start


def test_a_flipped_byte_is_refused_with_the_file_name(hub, medium_on_hub, tmp_path):
    h = medium_on_hub
    hub.corrupt["alice/medium-instruct/model-00002-of-00003.safetensors"] = 1_000_000
    try:
        with pytest.raises(
            ResidualsError, match=r"alice/medium-instruct/model-00002-of-00003\.safetensors.*sha256"
        ):
            compute_residuals(h["base"], h["instruct"], tmp_path / "res")
    finally:
        hub.corrupt.clear()
    assert not (tmp_path / "res").exists() and not list(tmp_path.glob(".res.partial-*"))


def test_rerun_after_a_failed_commit_uploads_no_shard_twice(hub, medium_on_hub):
    h = medium_on_hub
    HfApi(token=ALICE).create_repo("alice/resumed")  # an existing repo keeps a failed run's uploads
    hub.fail_next_commit = True
    with pytest.raises(ResidualsError, match=r"existing repo alice/resumed was left as it was"):
        merge_models(
            h["base"], h["instruct"], h["target"], push_to="alice/resumed", token=ALICE, max_shard_size="1MB"
        )
    stored = hub.cas_bytes()
    assert stored > 3_000_000  # the shards went up through Xet
    result = merge_models(
        h["base"], h["instruct"], h["target"], push_to="alice/resumed", token=ALICE, max_shard_size="1MB"
    )
    assert hub.cas_bytes() == stored  # Xet found every chunk on the Hub: nothing sent again
    assert result.url.endswith("alice/resumed") and len(hub.repos["alice/resumed"].commits) == 2


def test_a_failed_commit_keeps_the_created_repo_for_a_resume(hub, medium_on_hub):
    """A commit refused after the uploads costs one commit, not the upload: the repo stays, says so, and
    the same command finishes it without sending the shards again."""
    h = medium_on_hub
    hub.fail_next_commit = True
    with pytest.raises(
        ResidualsError, match=r"alice/kept, created by this run, was kept.*Run the same command"
    ):
        merge_models(
            h["base"], h["instruct"], h["target"], push_to="alice/kept", token=ALICE, max_shard_size="1MB"
        )
    assert "alice/kept" in hub.repos and set(hub.repos["alice/kept"].head[1]) == {".gitattributes"}
    stored = hub.cas_bytes()
    merge_models(
        h["base"], h["instruct"], h["target"], push_to="alice/kept", token=ALICE, max_shard_size="1MB"
    )
    assert hub.cas_bytes() == stored
    assert any(p.endswith(".safetensors") for p in hub.repos["alice/kept"].head[1])


def test_a_push_stopped_on_purpose_deletes_the_repo_it_created(hub, medium_on_hub):
    from residuals_core.errors import Cancelled

    def stop(done, total, name):
        if done >= total // 2:
            raise Cancelled("The job was cancelled.", "Run it again when you want.")

    h = medium_on_hub
    with pytest.raises(Cancelled):
        merge_models(
            h["base"], h["instruct"], h["target"], push_to="alice/gone", token=ALICE, max_shard_size="1MB",
            progress=stop,
        )  # fmt: skip
    assert "alice/gone" not in hub.repos


def test_index_shards_with_any_names_are_found_on_the_hub(hub, families, tmp_path):
    """One rule for weight files: the index's weight_map, whatever the shards are called."""
    fam = families("llama")
    folder = tmp_path / "renamed"
    shutil.copytree(fam["instruct"], folder)
    state = load_state(folder)
    (folder / "model.safetensors").unlink()
    from safetensors.torch import save_file

    names = sorted(state)
    half = len(names) // 2
    parts = {"weights-a.safetensors": names[:half], "weights-b.safetensors": names[half:]}
    for file, part in parts.items():
        save_file({n: state[n] for n in part}, folder / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in parts.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    upload(folder, "alice/renamed-shards")
    result = compute_residuals(fam["base"], "alice/renamed-shards", tmp_path / "res")
    reference = compute_residuals(fam["base"], fam["instruct"], tmp_path / "ref")
    assert same(load_state(result.path), load_state(reference.path))


def test_push_to_hub_streams_without_a_full_local_copy(hub, families, tmp_path, monkeypatch):
    fam = families("llama")
    res = Residuals.from_models(fam["base"], fam["instruct"])
    url = res.push_to_hub("alice/streamed-res", token=ALICE, max_shard_size="40KB")
    assert url.endswith("alice/streamed-res")
    local = compute_residuals(fam["base"], fam["instruct"], tmp_path / "res")
    assert same(pulled_state("alice/streamed-res", tmp_path), load_state(local.path))
    assert len(hub.requests("POST", "/api/models/alice/streamed-res/commit/")) == 1


def test_instance_with_a_hub_id(hub, families):
    """from_models(instance, 'org/id') reads the Hub model's tensors as it needs them."""
    fam = families("llama")
    upload(fam["instruct"], "alice/llama-instruct-for-instance")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=torch.float32)
    res = Residuals.from_models(base, "alice/llama-instruct-for-instance")
    inst, b = load_state(fam["instruct"]), load_state(fam["base"])
    assert torch.equal(
        res.state_dict["model.norm.weight"], inst["model.norm.weight"] - b["model.norm.weight"]
    )


def test_offline_hub_message_is_reachable():
    from huggingface_hub.errors import LocalEntryNotFoundError

    from residuals_core.hub import hub_errors

    with pytest.raises(ResidualsError, match="unreachable"), hub_errors("org/model", None):
        raise LocalEntryNotFoundError("offline")


def test_both_apply_paths_ship_the_same_tokenizer_and_rows(families, tmp_path):
    """Lazy apply(out_dir=) and save-then-apply agree: the instruct tokenizer with its vocabulary rows."""
    fam = families("llama")
    tokenizer = build_tokenizer(["<|a|>", "<|b|>"])  # 302 tokens, models have 300 rows
    res = Residuals.from_models(fam["base"], fam["instruct"], instruct_tokenizer=tokenizer)
    lazy = res.apply(str(fam["target"]), out_dir=tmp_path / "lazy")
    res.to().save_pretrained(tmp_path / "res")
    saved = apply_residuals(tmp_path / "res", fam["target"], tmp_path / "saved").path
    from transformers import AutoTokenizer

    for folder in (lazy, saved):
        assert len(AutoTokenizer.from_pretrained(folder)) == 302
        assert load_state(folder)["model.embed_tokens.weight"].shape[0] == 302
    assert same(load_state(lazy), load_state(saved))


GIANT = r"""
import sys, torch
from safetensors.torch import save_file
out, seed = sys.argv[1], int(sys.argv[2])
g = torch.Generator().manual_seed(seed)
save_file({
    "experts.gate_up_proj": (torch.randn(2, 4096, 8192, generator=g) * 0.02).bfloat16(),  # fused 3-D experts
    "giant_row.weight": (torch.randn(1, 1 << 25, generator=g) * 0.02).bfloat16(),  # one 64 MB row
}, out + "/model.safetensors", metadata={"format": "pt"})
open(out + "/config.json", "w").write('{"model_type": "llama", "vocab_size": 300}')
"""


@pytest.fixture(scope="module")
def giant_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("giant")
    tok = build_tokenizer()
    for role, seed in (("base", 0), ("instruct", 1)):
        (root / role).mkdir()
        subprocess.run([sys.executable, "-c", GIANT, str(root / role), str(seed)], check=True)
        tok.save_pretrained(root / role)
    return root


def peak_rss_gib(*args, env_extra=None) -> float:
    """Peak resident memory (VmHWM) of a CLI run in its own process.

    Not ru_maxrss: Linux carries the forked parent's (pytest's) peak across exec into it.
    """
    script = (  # the command line's main() (`python -m` would end the process before the peak is read)
        "import sys\nfrom residuals_core.cli import main\n"
        "code = main(sys.argv[1:])\nassert not code, code\n"
        "print('PEAK', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args), "--quiet"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split("PEAK")[-1]) / 2**20


@pytest.mark.slow
def test_3d_experts_and_giant_rows_stay_under_the_memory_bound(giant_pair, tmp_path):
    peak = peak_rss_gib(
        "compute", "--base", giant_pair / "base", "--instruct", giant_pair / "instruct",
        "--dtype", "bfloat16", "--out", tmp_path / "res",
    )  # fmt: skip
    assert peak <= 0.5, f"peak RSS {peak:.2f} GiB"
    peak = peak_rss_gib(
        "apply",
        "--residuals",
        tmp_path / "res",
        "--model",
        giant_pair / "base",
        "--out",
        tmp_path / "applied",
    )
    assert peak <= 0.5, f"peak RSS {peak:.2f} GiB"


@pytest.mark.slow
def test_giant_tensors_from_the_hub_stay_under_the_hub_memory_bound(hub, giant_pair):
    for role in ("base", "instruct"):
        upload(giant_pair / role, f"alice/giant-{role}")
    peak = peak_rss_gib(
        "compute", "--base", "alice/giant-base", "--instruct", "alice/giant-instruct", "--dtype", "bfloat16",
        "--push-to", "alice/giant-res", "--max-shard-size", "100MB", env_extra={"HF_TOKEN": ALICE},
    )  # fmt: skip
    assert peak <= 1.0, f"peak RSS {peak:.2f} GiB"
    assert "alice/giant-res" in hub.repos


def test_hub_residuals_applied_to_an_instance_are_checked_first(hub, families, tmp_path):
    """In memory, tensors are read out of file order: each Hub file is verified whole before use."""
    fam = families("llama")
    compute_residuals(fam["base"], fam["instruct"], push_to="alice/res-for-instance", token=ALICE)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=torch.float32)
    Residuals.from_pretrained("alice/res-for-instance", token=ALICE).apply(model)
    expected = load_state(fam["instruct"])
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items() if k in expected)
    hub.corrupt["alice/res-for-instance/model.safetensors"] = 5000
    try:
        untouched = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=torch.float32)
        with pytest.raises(ResidualsError, match=r"alice/res-for-instance/model\.safetensors.*sha256"):
            Residuals.from_pretrained("alice/res-for-instance", token=ALICE).apply(untouched)
    finally:
        hub.corrupt.clear()
    assert all(
        torch.equal(v, load_state(fam["base"])[k])
        for k, v in untouched.state_dict().items()
        if k != "lm_head.weight"
    )
