"""The Space under strangers' load: each way one visitor could take the Space from the others, tried
against the app served as on Hugging Face (the `space` fixture), then all of them at once while an
honest visitor computes.

Each test asserts the bound, the words the visitor gets, and that the disk comes back.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, ModelCard
from waits import wait_for

from residuals_core import compute_residuals
from residuals_core.demo import DEMO_FAMILY
from residuals_core.writer import file_digest

ROOT = Path(__file__).resolve().parent.parent
ALICE = "hf_alice_write"
NAMED = "named (Hub id or demo model)"
needs_family = pytest.mark.skipif(not (DEMO_FAMILY / "world.json").is_file(), reason="demo family not built")
pytestmark = needs_family


def client(url: str, oauth_token: str | None = None, **kwargs):
    from gradio_client import Client

    return Client(url, oauth_token=oauth_token, verbose=False, analytics_enabled=False, **kwargs)


def refused(call, *words: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


def files(*folders: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for folder in folders for p in folder.rglob("*") if p.is_file()}


def session_folders(folders: dict[str, Path]) -> list[Path]:
    root = folders["tmp"] / "residuals-studio"
    return sorted(root.iterdir()) if root.is_dir() else []


def queue_is_empty(url: str) -> bool:
    with urllib.request.urlopen(url + "gradio_api/queue/status") as response:
        return json.loads(response.read())["queue_size"] == 0


def outside_code_spans(markdown: str) -> str:
    return re.sub(r"(`+)(?:(?!\1).)*?\1", "", markdown)


@pytest.fixture(scope="module")
def huge_residuals(hub_server, tmp_path_factory):
    """A public residuals repo whose one weight file declares 206 GB of tensors (stored sparse)."""
    folder = tmp_path_factory.mktemp("huge") / "residuals"
    compute_residuals(str(DEMO_FAMILY / "base-v1"), str(DEMO_FAMILY / "instruct-v1"), folder)
    api = HfApi(token=ALICE)
    api.create_repo("alice/huge-residuals", exist_ok=True)
    api.upload_file(
        path_or_fileobj=folder / "config.json", path_in_repo="config.json", repo_id="alice/huge-residuals"
    )
    header, offset = {}, 0
    for layer in range(48):
        size = 16384 * 65536 * 4
        header[f"model.layers.{layer}.mlp.down_proj.weight"] = {
            "dtype": "F32", "shape": [16384, 65536], "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    encoded = json.dumps(header).encode()
    head = struct.pack("<Q", len(encoded)) + encoded
    hub_server.add_large_file("alice/huge-residuals", "model.safetensors", head, len(head) + offset)
    return "alice/huge-residuals", len(head)


@pytest.fixture(scope="module")
def hostile_residuals(hub_server, tmp_path_factory):
    """Real residuals whose config names carry Markdown and whose manifest claims norms 20x the real ones."""
    folder = tmp_path_factory.mktemp("hostile") / "residuals"
    result = compute_residuals(str(DEMO_FAMILY / "base-v1"), str(DEMO_FAMILY / "instruct-v1"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["instruct_model_name"] = "[Claim your prize](http://phish.example/login)\n---\nlicense: x"
    config["base_model_name"] = "![t](http://track.example/p.png) <img src=x onerror=alert(1)>"
    (folder / "config.json").write_text(json.dumps(config))
    manifest = json.loads((folder / "residuals_manifest.json").read_text())
    for stats in manifest["tensors"].values():
        stats["norm"] *= 20
    manifest["files"]["config.json"] = file_digest(folder / "config.json")  # as its author would
    (folder / "residuals_manifest.json").write_text(json.dumps(manifest))
    api = HfApi(token=ALICE)
    api.create_repo("alice/hostile-residuals", exist_ok=True)
    api.upload_folder(repo_id="alice/hostile-residuals", folder_path=str(folder))
    return "alice/hostile-residuals", result.summary["total_norm"], len(result.tensors)


# ---- 1. one request holds the only heavy slot -------------------------------------------------------
def test_try_refuses_long_prompts_and_says_its_limits(space, hub_server):
    url, _, _ = space
    visitor = client(url)
    models = ("demo:base-v2", "demo:instruct-v1", "demo:base-v1")
    refused(lambda: visitor.predict("x" * 50_000, *models, api_name="/try_models"),
            "50,000 characters", "at most 512 tokens")  # fmt: skip
    refused(lambda: visitor.predict("alpha " * 600, *models, api_name="/try_models"),
            "tokens long for these models", "at most 512")  # fmt: skip
    answered = visitor.predict("Where does Bo live?", *models, api_name="/try_models")
    assert all(isinstance(reply, str) and reply for reply in answered[:3])
    with urllib.request.urlopen(url + "config") as response:
        page = response.read().decode()
    assert "Prompts of up to 512 tokens" in page and "40 new tokens" in page and "30 s per click" in page
    visitor.close()


def test_every_weight_reading_action_is_estimated_and_refused_beyond_the_limit(
    space, hub_server, huge_residuals
):
    url, folders, _ = space
    repo, header_bytes = huge_residuals
    before = files(folders["tmp"], folders["gradio"])
    hub_server.log.clear()
    visitor = client(url)
    refused(lambda: visitor.predict(NAMED, repo, "", api_name="/inspect"),
            "206.16 GB streamed from the Hub", "more than the 30 min", "smaller models")  # fmt: skip
    refused(
        lambda: visitor.predict(NAMED, "demo:base-v1", repo, api_name="/inspect"), "GB streamed from the Hub"
    )
    for api_name in ("/preview_export", "/export_lora"):
        message = refused(lambda n=api_name: visitor.predict(NAMED, repo, "rank", 8, 0.9, True, api_name=n),
                          "factorises its matrices", "more than the 30 min")  # fmt: skip
        assert "Run it as a Job" not in message  # Jobs on this Space run the merge only
    weight_reads = [e for e in hub_server.log if e["path"].startswith("cdn:") and e.get("range")]
    read = sum(int(b) - int(a) + 1 for e in weight_reads for a, b in [e["range"].split("=")[1].split("-")])
    assert 0 < read <= 4 * (header_bytes + 1024 * 1024)  # headers only, of 206 GB
    assert not files(folders["tmp"], folders["gradio"]).keys() - before.keys()  # nothing new on disk
    visitor.close()


def test_a_closed_tab_cancels_its_job_and_its_queued_calls(space, hub_server, families):
    url, folders, log_path = space
    fam = families("llama", size={"hidden": 256, "layers": 8})  # 2 x 25 MB to stream
    api = HfApi(token=ALICE)
    for role in ("base", "instruct"):
        api.create_repo(f"alice/slow-{role}", exist_ok=True)
        api.upload_folder(repo_id=f"alice/slow-{role}", folder_path=str(fam[role]))
    model_bytes = sum((fam[role] / "model.safetensors").stat().st_size for role in ("base", "instruct"))
    hub_server.link.bytes_per_s = 1_000_000  # the job would stream for about 50 s
    try:
        visitor = client(url)
        for _ in range(2):  # one runs, one waits in the queue behind it
            visitor.submit("alice/slow-base", "alice/slow-instruct", "float32", True, api_name="/compute")

        def job_running() -> bool:
            return any((folder / ".job-running").exists() for folder in session_folders(folders))

        wait_for(job_running, what="the first compute starts")
        hub_server.log.clear()
        visitor.close()  # the tab goes away (its heartbeat stops within 15 s)
        wait_for(lambda: not job_running(), what="the job stops")
        streamed = sum(e.get("bytes") or 0 for e in hub_server.log if e["path"].startswith("cdn:"))
        wait_for(lambda: not session_folders(folders), what="the session's folders go")
        wait_for(lambda: queue_is_empty(url), what="the queued compute's turn comes and goes")
        after_cancel = len(hub_server.log)
        assert streamed < model_bytes / 2, (streamed, model_bytes)  # it stopped instead of streaming on
        assert len(hub_server.log) == after_cancel  # the queued call was refused: not one more request
    finally:
        hub_server.link.bytes_per_s = None
    assert "FileNotFoundError" not in log_path.read_text()


# ---- 2. disk that never comes back --------------------------------------------------------------------
EXPECTED_ENDPOINTS = {
    "/check", "/compute", "/apply", "/merge", "/inspect", "/try_models", "/score_questions", "/push_residuals",
    "/push_merged", "/cancel", "/preview_export", "/export_lora", "/push_lora", "/plan_job", "/run_job",
    "/follow_job", "/cancel_job", "/_check_login_status",  # the login button's own
}  # fmt: skip


def test_only_the_pages_own_events_are_callable(space):
    url, _, _ = space
    with urllib.request.urlopen(url + "gradio_api/info") as response:
        info = json.loads(response.read())
    assert set(info["named_endpoints"]) == EXPECTED_ENDPOINTS and not info["unnamed_endpoints"]
    answer = httpx.post(url + "gradio_api/call/new_workspace", json={"data": []})
    assert answer.status_code >= 400 and "event_id" not in answer.text  # no route resets a session's state


def test_the_sweep_removes_folders_no_session_owns(space):
    url, folders, _ = space
    visitor = client(url)
    visitor.predict("demo:base-v1", "demo:instruct-v1", "float32", True, api_name="/compute")
    live = session_folders(folders)
    stray = folders["tmp"] / "residuals-studio" / "left-by-a-restart"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(os.urandom(100_000))
    stray_zip = folders["gradio"] / "studio-downloads" / "orphan.zip"
    stray_zip.write_bytes(os.urandom(100_000))
    old = time.time() - 7200
    for path in (stray, stray / "model.safetensors", stray_zip):
        os.utime(path, (old, old))
    wait_for(lambda: not stray.exists() and not stray_zip.exists(), 30, "the sweep removes the strays")
    assert all(folder.exists() for folder in live)  # a live session keeps its results
    visitor.close()
    wait_for(lambda: not session_folders(folders), what="the closed session goes too")


# ---- 3. open uploads -----------------------------------------------------------------------------------------
def test_uploads_are_refused_before_a_byte_is_stored(space):
    url, folders, _ = space
    before = files(folders["tmp"], folders["gradio"])
    for name, body in (("big.bin", os.urandom(5_000_000)), ("page.html", b"<script>alert(1)</script>")):
        answer = httpx.post(url + "gradio_api/upload", files={"files": (name, body)}, timeout=60)
        assert answer.status_code == 403 and "takes no file uploads" in answer.text
    assert not files(folders["tmp"], folders["gradio"]).keys() - before.keys()  # nothing stored


# ---- 4. "small" files -----------------------------------------------------------------------------------------
def test_small_files_are_the_ones_needed_each_capped(space, hub_server, tmp_path):
    url, _, _ = space
    api = HfApi(token=ALICE)
    extra = tmp_path / "extra"
    extra.mkdir()
    for file in (DEMO_FAMILY / "base-v1").iterdir():
        (extra / file.name).write_bytes(file.read_bytes())
    (extra / "tokenizer.extra.json").write_bytes(os.urandom(3_000_000))
    (extra / "README.md").write_text("x" * 3_000_000)
    api.create_repo("alice/extra-files", exist_ok=True)
    api.upload_folder(repo_id="alice/extra-files", folder_path=str(extra))
    visitor = client(url)
    hub_server.log.clear()
    text = visitor.predict("alice/extra-files", "demo:instruct-v1", "float32", True, api_name="/check")
    assert "Compatible" in text and "of config and tokenizer files" in text
    fetched = {e["path"].rsplit("/", 1)[-1] for e in hub_server.log if e["method"] == "GET"}
    assert "tokenizer.extra.json" not in fetched and "README.md" not in fetched
    (extra / "tokenizer.extra.json").unlink()
    (extra / "tokenizer.json").write_bytes(os.urandom(3_000_000))
    api.create_repo("alice/huge-tokenizer", exist_ok=True)
    api.upload_folder(repo_id="alice/huge-tokenizer", folder_path=str(extra))
    hub_server.log.clear()
    refused(lambda: visitor.predict("alice/huge-tokenizer", "demo:instruct-v1", "float32", True, api_name="/check"),
            "tokenizer.json is 3.0 MB, more than the 1 MB")  # fmt: skip
    assert not [e for e in hub_server.log if e["method"] == "GET" and e["path"].endswith("tokenizer.json")]
    visitor.close()


# ---- 5. third-party Markdown ----------------------------------------------------------------------------------
def test_a_repos_text_is_shown_as_text_and_its_claims_are_checked(space, hub_server, hostile_residuals):
    url, _, _ = space
    repo, true_norm, tensors = hostile_residuals
    bob = client(url, oauth_token="hf_bob_write")
    status = bob.predict(NAMED, repo, "", api_name="/inspect")[0]
    assert "phish.example" in status and "track.example" in status  # shown …
    plain = outside_code_spans(status)
    assert "http" not in plain and "<img" not in plain and "\n---" not in plain  # … only as code
    assert f"total ‖R‖ = {true_norm:.4g}" in status and f"**{tensors} tensors**" in status  # computed
    assert "claims norms for" in status and "do not match the weights" in status
    bob.predict(NAMED, repo, "demo:base-v2", 1.0, "same as target", True, "hostile-merged", True,
                api_name="/apply")  # fmt: skip
    card_text = Path(
        HfApi(token="hf_bob_write").hf_hub_download("bob/hostile-merged", "README.md")
    ).read_text()
    assert card_text.count("\n---\n") == 1 and card_text.startswith("---\n")  # the front matter, once
    assert ModelCard(card_text).data.license is None  # nothing of the name became metadata
    body = re.sub(r"```.*?```", "", card_text.split("\n---\n", 1)[1], flags=re.DOTALL)
    assert "license: x" in body and "license" not in outside_code_spans(body)  # the name, quoted as code
    bob.close()


# ---- 6. smaller breaks ----------------------------------------------------------------------------------------
def test_a_new_result_does_not_cut_the_download_of_the_previous_one(space, tmp_path):
    url, _, _ = space
    visitor = client(url, download_files=False)
    first = visitor.predict("demo:base-v1", "demo:instruct-v1", "float32", True, api_name="/compute")[3]
    with httpx.stream("GET", first["url"], timeout=60) as download:
        size = int(download.headers["content-length"])
        chunks = download.iter_bytes(chunk_size=4096)
        data = next(chunks)
        second = visitor.predict("demo:base-v1", "demo:base-v2", "float32", True, api_name="/compute")[3]
        assert second["url"] != first["url"]
        data += b"".join(chunks)
    assert len(data) == size
    (tmp_path / "got.zip").write_bytes(data)
    with zipfile.ZipFile(tmp_path / "got.zip") as zipped:
        assert zipped.testzip() is None and "model.safetensors" in zipped.namelist()
    visitor.close()


def test_check_names_models_as_typed_and_alpha_must_be_a_number(space):
    url, folders, _ = space
    visitor = client(url)
    text = visitor.predict("demo:base-v1", "demo:instruct-v1", "float32", True, api_name="/check")
    assert "`demo:base-v1`" in text and "`demo:instruct-v1`" in text
    for server_path in (str(DEMO_FAMILY), str(ROOT), str(folders["tmp"])):
        assert server_path not in text
    refused(lambda: visitor.predict("demo:base-v1", "demo:instruct-v1", "demo:base-v2", "lots", "same as target",
                                    api_name="/merge"), "α must be a number")  # fmt: skip
    visitor.close()


# ---- all at once --------------------------------------------------------------------------------------------
HOSTILE_CLIENTS = 6
HONEST_BOUND_S = 120  # the honest visitor's compute must be done by then; measured: see the closing note


def test_strangers_at_once_do_not_keep_an_honest_visitor_from_computing(
    space, hub_server, huge_residuals, capsys
):
    """Six hostile clients loop over every attack above while one honest visitor computes the demo
    family: the honest compute finishes within HONEST_BOUND_S, and the disk comes back to its baseline."""
    url, folders, _ = space
    repo, _ = huge_residuals
    watched = (folders["tmp"], folders["gradio"], folders["hf"])
    wait_for(lambda: not session_folders(folders), what="earlier sessions are gone")
    baseline = files(*watched)
    alone = client(url)
    started = time.monotonic()
    alone.predict("demo:base-v1", "demo:instruct-v1", "float32", True, api_name="/compute")
    took_alone = time.monotonic() - started
    alone.close()
    stop = threading.Event()
    refusals: list[str] = []

    def hostile(kind: int) -> None:
        while not stop.is_set():
            visitor = client(url)
            try:
                if kind % 3 == 0:
                    visitor.predict("y" * 200_000, "demo:base-v2", "demo:instruct-v1", "demo:base-v1",
                                    api_name="/try_models")  # fmt: skip
                elif kind % 3 == 1:
                    visitor.predict(NAMED, repo, "rank", 64, 0.9, True, api_name="/export_lora")
                else:  # a session that computes, then goes away without a word, then an upload
                    visitor.submit("demo:base-v1", "demo:instruct-v1", "float32", True, api_name="/compute")
                    httpx.post(url + "gradio_api/upload", files={"files": ("x.html", b"<p>" * 100_000)})
            except Exception as exc:
                refusals.append(str(exc)[:80])
            finally:
                visitor.close()

    threads = [threading.Thread(target=hostile, args=(i,), daemon=True) for i in range(HOSTILE_CLIENTS)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(refusals) >= 2, what="the strangers are at it")
    honest = client(url)
    started = time.monotonic()
    done = {}

    def compute() -> None:
        done["result"] = honest.predict(
            "demo:base-v1", "demo:instruct-v1", "float32", True, api_name="/compute"
        )

    worker = threading.Thread(target=compute)
    worker.start()
    worker.join(timeout=HONEST_BOUND_S)
    took = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    assert "result" in done and "Residuals ready" in done["result"][0], f"not done after {took:.0f} s"
    assert len(refusals) >= HOSTILE_CLIENTS  # the strangers were turned away, again and again
    honest.close()
    wait_for(lambda: files(*watched).keys() <= baseline.keys(), 90, "the disk returns to its baseline")
    with capsys.disabled():
        print(f"\n[load] honest compute: {took_alone:.1f} s alone, {took:.1f} s beside {HOSTILE_CLIENTS} hostile "
              f"clients ({len(refusals)} hostile calls refused meanwhile)")  # fmt: skip
