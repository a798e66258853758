"""The app as a hosted Space meets it: strangers sharing one machine that holds the Space's own secret.

The app runs as on Hugging Face (`SYSTEM=spaces`, `SPACE_ID`, fake OAuth settings and a Space
`HF_TOKEN` the test Hub knows), with its temp folders and Gradio's cache in a folder of the test's,
and is driven through gradio_client as visitors would drive it.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from waits import wait_for

from residuals_core.demo import DEMO_FAMILY
from studio.ui.apply_tab import CROSS_VERSION_EXAMPLES

ROOT = Path(__file__).resolve().parent.parent
SPACE_SECRET = "hf_space_secret"
needs_family = pytest.mark.skipif(not (DEMO_FAMILY / "world.json").is_file(), reason="demo family not built")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client(url: str, oauth_token: str | None = None):
    from gradio_client import Client

    return Client(url, oauth_token=oauth_token, verbose=False, analytics_enabled=False)


def refused(call, match: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        call()
    message = str(info.value)
    assert match in message, message
    return message


def disk_bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for folder in folders for p in folder.rglob("*") if p.is_file())


# ---- 1. inputs on a Space ---------------------------------------------------------------------------
FIELDS = {  # endpoint -> (arguments with {} where a model name goes, one tuple per field)
    "/check": [("{}", "demo:instruct-v1", "float32", True), ("demo:base-v1", "{}", "float32", True)],
    "/compute": [("{}", "demo:instruct-v1", "float32", True), ("demo:base-v1", "{}", "float32", True)],
    "/apply": [
        ("named (Hub id or demo model)", "{}", "demo:base-v2", 1.0, "same as target"),
        ("named (Hub id or demo model)", "studio-owner/none", "{}", 1.0, "same as target"),
    ],
    "/merge": [
        ("{}", "demo:instruct-v1", "demo:base-v2", 1.0, "same as target"),
        ("demo:base-v1", "{}", "demo:base-v2", 1.0, "same as target"),
        ("demo:base-v1", "demo:instruct-v1", "{}", 1.0, "same as target"),
    ],
    "/inspect": [("named (Hub id or demo model)", "{}", "")],
    "/try_models": [("hello", "{}", "demo:instruct-v1", "demo:base-v1"), ("hello", "demo:base-v2", "{}", "demo:base-v1"),
                    ("hello", "demo:base-v2", "demo:instruct-v1", "{}")],
}  # fmt: skip


@needs_family
def test_server_paths_refused_in_every_field(space, hub_server):
    url, folders, _ = space
    visitor = client(url)
    paths = ["/", "/etc", str(ROOT), str(folders["tmp"] / "studio-abc123" / "residuals"),
             str(folders["hf"] / "hub"), "../../etc/passwd", "~/.cache/huggingface", "app.py"]  # fmt: skip
    hub_server.log.clear()
    count = 0
    for api_name, calls in FIELDS.items():
        for template in calls:
            for path in paths:
                args = [path if a == "{}" else a for a in template]
                refused(lambda a=args, n=api_name: visitor.predict(*a, api_name=n), "cannot be read")
                count += 1
    assert count == 13 * len(paths)
    assert not hub_server.log  # refused before anything was asked of the Hub, let alone read on disk
    visitor.close()


@needs_family
def test_a_long_name_and_html_get_words_not_markup(space):
    url, _, _ = space
    visitor = client(url)
    message = refused(lambda: visitor.predict("x" * 5000, "demo:instruct-v1", "float32", True, api_name="/check"),
                      "5000 characters, which is not a model name")  # fmt: skip
    message = refused(
        lambda: visitor.predict("<img src=x onerror=alert(1)>", "demo:instruct-v1", "float32", True, api_name="/check"),
        "cannot be read",
    )  # fmt: skip
    assert "<img" not in message and "&lt;img" in message
    for scale, words in (
        (5.0, "greater than maximum value 2"),
        (-3.0, "less than minimum value 0"),
        (0.0, "α = 0 adds nothing"),
    ):
        refused(lambda s=scale: visitor.predict("demo:base-v1", "demo:instruct-v1", "demo:base-v2", s, "same as target",
                                                 api_name="/merge"), words)  # fmt: skip
    visitor.close()


@needs_family
def test_visitor_reads_never_carry_the_space_token(space, hub_server):
    url, _, _ = space
    owner = HfApi(token=SPACE_SECRET)
    owner.create_repo("studio-owner/private-base", private=True, exist_ok=True)
    owner.upload_folder(repo_id="studio-owner/private-base", folder_path=str(DEMO_FAMILY / "base-v1"))
    hub_server.log.clear()
    anonymous = client(url)
    refused(lambda: anonymous.predict("studio-owner/private-base", "demo:instruct-v1", "float32", True,
                                      api_name="/check"), "not found")  # fmt: skip
    bob = client(url, oauth_token="hf_bob_write")
    refused(lambda: bob.predict("studio-owner/private-base", "demo:instruct-v1", "float32", True,
                                api_name="/check"), "not found")  # fmt: skip
    message = refused(lambda: anonymous.predict("studio-owner/private-base", "demo:instruct-v1", "float32", True,
                                                api_name="/check"), "Sign in with Hugging Face")  # fmt: skip
    assert "HF_TOKEN" not in message  # a visitor is not told to set the server's environment
    tokens = {entry["token"] for entry in hub_server.log}
    assert hub_server.log and SPACE_SECRET not in tokens
    assert tokens <= {None, "hf_bob_write"} and "hf_bob_write" in tokens  # bob's requests carry bob's own
    anonymous.close()
    bob.close()


# ---- 2. what results say, and what is left behind ------------------------------------------------------
@needs_family
def test_results_name_no_server_paths_and_sessions_leave_nothing(space, hub_server, tmp_path):
    """Three visitors at once get their own results; cards and manifests name no server path; the disk
    (session folders, Gradio's cache) is back at its baseline once their tabs close."""
    url, folders, log_path = space
    watched = (folders["tmp"], folders["gradio"], folders["hf"])
    studio_root = folders["tmp"] / "residuals-studio"
    wait_for(
        lambda: not studio_root.is_dir() or not any(studio_root.iterdir()), what="earlier sessions are gone"
    )
    baseline = disk_bytes(*watched)
    downloads = folders["gradio"] / "studio-downloads"
    before = set(downloads.iterdir()) if downloads.is_dir() else set()
    pairs = [
        ("demo:base-v1", "demo:instruct-v1"),
        ("demo:base-v2", "demo:instruct-v1"),
        ("demo:base-v1", "demo:base-v2"),
    ]
    visitors = [client(url, oauth_token="hf_bob_write") for _ in pairs]
    results: dict[int, tuple] = {}

    def run(index: int) -> None:
        base, instruct = pairs[index]
        visitor = visitors[index]
        computed = visitor.predict(base, instruct, "float32", True, api_name="/compute")
        inspected = visitor.predict("this session's Compute result", "", "", api_name="/inspect")
        merged = visitor.predict("this session's Compute result", "", "demo:base-v2", 1.0, "same as target",
                                 api_name="/apply")  # fmt: skip
        results[index] = (computed, inspected, merged)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pairs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(results) == [0, 1, 2]
    during = disk_bytes(*watched)
    assert during > baseline + 3 * 1_000_000  # three sessions' residuals, merged models and zips
    assert len(set(downloads.iterdir()) - before) == 3  # one downloads folder per session
    for index, (computed, inspected, merged) in results.items():
        base, instruct = (name.removeprefix("demo:") for name in pairs[index])
        assert f"`{instruct}` − `{base}`" in inspected[0]  # each session sees its own residuals
        for archive in (computed[3], merged[1]):
            with zipfile.ZipFile(archive) as zipped:
                texts = {
                    n: zipped.read(n).decode() for n in zipped.namelist() if n.endswith((".json", ".md"))
                }
            assert {"README.md", "config.json", "residuals_manifest.json"} <= set(texts)
            for name, text in texts.items():
                for server_path in (
                    str(folders["tmp"]),
                    str(folders["gradio"]),
                    str(ROOT),
                    str(DEMO_FAMILY),
                    "/tmp/",
                ):
                    assert server_path not in text, (name, server_path)
    for visitor in visitors:
        visitor.close()
    deadline = time.time() + 60
    while disk_bytes(*watched) > baseline and time.time() < deadline:
        time.sleep(0.5)
    assert disk_bytes(*watched) == baseline, sorted(
        str(p) for folder in watched for p in folder.rglob("*") if p.is_file()
    )[:10]
    # no token, pasted or OAuth, in the app's log or its files
    assert "hf_bob_write" not in log_path.read_text() and SPACE_SECRET not in log_path.read_text()


def test_run_history_is_off(space):
    """Gradio's run history keeps every input in the browser's localStorage: off, so no token lands there."""
    url, _, _ = space
    with urllib.request.urlopen(url + "config") as response:
        config = json.loads(response.read())
    assert config.get("run_history") is False


# ---- 5. real cross-version examples ------------------------------------------------------------------
def sparse_checkpoint(folder: Path, config: dict) -> None:
    """A checkpoint with the real model's exact tensor names, shapes and dtypes, its data a sparse hole."""
    import struct

    import torch
    from tiny_models import build_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    header, offset = {}, 0
    for name, tensor in model.state_dict().items():
        if config["tie_word_embeddings"] and name == "lm_head.weight":
            continue  # tied: save_pretrained stores it once, as the embedding
        size = tensor.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        f.truncate(8 + len(encoded) + offset)
    build_tokenizer().save_pretrained(folder)


@pytest.mark.parametrize("example", CROSS_VERSION_EXAMPLES, ids=lambda e: e[2])
def test_cross_version_examples_line_up(example, tmp_path):
    """Each suggested (base, instruct, target) has the same tensors and shapes, checked at the real models'
    configurations from headers, as the merge itself checks them before reading a weight."""
    from real_configs import CONFIGS

    from residuals_core import operations

    folders = []
    for repo in example:
        folder = tmp_path / repo.replace("/", "--")
        sparse_checkpoint(folder, CONFIGS[repo])
        folders.append(folder)
    report = operations.check_compatibility(folders[0], folders[1], target=folders[2])
    assert report["tensors"] > 100 and not report["notes"]
    assert report["parameters"] > 4e8


@needs_family
def test_a_visitor_pushes_into_their_own_namespace_with_their_own_token(space, hub_server):
    url, folders, _ = space
    bob = client(url, oauth_token="hf_bob_write")
    bob.predict("demo:base-v1", "demo:instruct-v1", "float32", True, api_name="/compute")
    hub_server.log.clear()
    pushed = bob.predict("space-pushed-residuals", True, api_name="/push_residuals")
    assert "bob/space-pushed-residuals" in pushed and hub_server.repos["bob/space-pushed-residuals"].private
    tokens = {e["token"] for e in hub_server.log}  # (LFS uploads go to pre-signed addresses, without one)
    assert "hf_bob_write" in tokens and tokens <= {"hf_bob_write", None}  # never the Space's own secret
    card = HfApi(token="hf_bob_write").hf_hub_download("bob/space-pushed-residuals", "README.md")
    text = Path(card).read_text()
    assert str(DEMO_FAMILY) not in text
    assert str(folders["tmp"]) not in text and "/tmp/" not in text and str(ROOT) not in text
    anonymous = client(url)
    anonymous.predict("demo:base-v1", "demo:instruct-v1", "float32", True, api_name="/compute")
    refused(lambda: anonymous.predict("x", True, api_name="/push_residuals"), "not logged in")
    bob.close()
    anonymous.close()


@needs_family
def test_large_results_stream_straight_into_the_visitors_repo(space, hub_server):
    """'Write straight into my Hub repo': the result goes to the visitor's repo as it is computed, nothing
    of it stays on the Space, and the session's next steps read it from there with the visitor's token."""
    url, folders, _ = space

    def residual_folders() -> set[Path]:
        return {p for p in folders["tmp"].rglob("residuals*") if p.is_dir()}

    before = residual_folders()
    bob = client(url, oauth_token="hf_bob_write")
    computed = bob.predict(
        "demo:base-v1",
        "demo:instruct-v1",
        "float32",
        True,
        True,
        "streamed-residuals",
        True,
        api_name="/compute",
    )
    assert "Streamed straight into" in computed[0] and computed[3] is None  # no zip: nothing kept here
    files = {f.rfilename for f in HfApi(token="hf_bob_write").model_info("bob/streamed-residuals").siblings}
    assert {"model.safetensors", "config.json", "residuals_manifest.json", "README.md"} <= files
    assert residual_folders() <= before  # no residuals folder of this session on the Space's disk
    applied = bob.predict("this session's Compute result", "", "demo:base-v2", 1.0, "same as target",
                          api_name="/apply")  # fmt: skip
    assert "Merged model ready" in applied[0]
    refused(lambda: bob.predict("demo:base-v1", "demo:instruct-v1", "float32", True, True, "", True,
                                api_name="/compute"), "Give the repository a name")  # fmt: skip
    anonymous = client(url)
    refused(lambda: anonymous.predict("demo:base-v1", "demo:instruct-v1", "float32", True, True, "x", True,
                                      api_name="/compute"), "not logged in")  # fmt: skip
    bob.close()
    anonymous.close()


@needs_family
def test_export_smaller_through_the_api(space, hub_server):
    """Inspect's Export smaller: a preview per layer before anything is written, then the adapter, then a push."""
    url, _, _ = space
    bob = client(url, oauth_token="hf_bob_write")
    bob.predict("demo:base-v1", "demo:instruct-v1", "float32", True, api_name="/compute")
    source = "this session's Compute result"
    text, bars = bob.predict(source, "", "rank", 8, 0.9, True, api_name="/preview_export")
    assert "would keep" in text and "Nothing was written yet" in text
    layers = bars["value"]["data"] if isinstance(bars, dict) and "value" in bars else bars
    assert layers  # one bar per layer
    status, archive = bob.predict(source, "", "rank", 8, 0.9, True, api_name="/export_lora")
    assert "LoRA adapter ready" in status
    with zipfile.ZipFile(archive) as zipped:
        names = set(zipped.namelist())
        config = json.loads(zipped.read("adapter_config.json"))
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= names and config["r"] == 8
    pushed = bob.predict("demo-lora", True, api_name="/push_lora")
    assert "bob/demo-lora" in pushed
    files = {f.rfilename for f in HfApi(token="hf_bob_write").model_info("bob/demo-lora").siblings}
    assert "adapter_model.safetensors" in files
    bob.close()


@needs_family
def test_a_merge_too_big_for_the_space_runs_as_a_job_on_the_visitors_account(space, hub_server, tmp_path):
    """The job's command names models as the job must read them (hf://, demo:), never a path of the Space;
    its push target is checked before submission; Follow my job links to the pushed repo."""
    url, folders, _ = space
    owner = HfApi(token=SPACE_SECRET)
    owner.create_repo("studio-owner/job-target", exist_ok=True)
    owner.upload_folder(repo_id="studio-owner/job-target", folder_path=str(DEMO_FAMILY / "base-v2"))
    (tmp_path / "studio-owner" / "job-target").mkdir(parents=True)  # the same name as a folder in the image
    hub_server.job_cwd = tmp_path
    anonymous = client(url)
    before = len(hub_server.jobs)
    args = ("demo:base-v1", "demo:instruct-v1", "studio-owner/job-target", 1.0, "same as target", "space-job-merged",
            True, "cpu-upgrade")  # fmt: skip
    refused(lambda: anonymous.predict(*args, api_name="/run_job"), "not logged in")
    bob = client(url, oauth_token="hf_bob_write")
    for bad in ("--help", "-x/y", "a b"):
        refused(lambda b=bad: bob.predict(*args[:5], b, True, "cpu-upgrade", api_name="/run_job"),
                "not a repository name the Hub accepts")  # fmt: skip
    assert len(hub_server.jobs) == before  # nothing submitted for any of these
    status = bob.predict(*args, api_name="/run_job")
    status = status if isinstance(status, str) else status[0]
    job_id = re.search(r"Job \[`(\w+)`\]", status).group(1)
    assert f"{hub_server.url}/bob/space-job-merged" in status
    job = hub_server.jobs[job_id]
    assert job.namespace == "bob" and job.spec["spaceId"] == "studio-owner/residuals-studio"
    assert job.spec["secrets"] == {"HF_TOKEN": "hf_bob_write"}
    command = json.dumps(job.spec["command"])
    assert "hf_bob_write" not in command and SPACE_SECRET not in json.dumps(job.spec)
    assert (
        "hf://studio-owner/job-target" in command
        and "demo:base-v1" in command
        and "bob/space-job-merged" in command
    )
    for server_path in (str(ROOT), str(DEMO_FAMILY), str(folders["tmp"]), "/tmp/"):
        assert server_path not in command, server_path
    deadline = time.time() + 120
    while job.stage == "RUNNING" and time.time() < deadline:
        time.sleep(0.2)
    assert job.stage == "COMPLETED", "\n".join(
        line for _, line in job.lines
    )  # the Hub target, not the folder
    assert "bob/space-job-merged" in hub_server.repos and hub_server.repos["bob/space-job-merged"].private
    followed, _logs = bob.predict(api_name="/follow_job")
    assert "COMPLETED" in followed and f"]({hub_server.url}/bob/space-job-merged)" in followed
    hub_server.job_cwd = None
    anonymous.close()
    bob.close()
