"""The Space's page (studio.ui): its event functions called directly on a page built with chosen
settings, then the launched app driven over its API."""

import threading
import time
from pathlib import Path

import gradio as gr
import pytest

from residuals_core.demo import DEMO_FAMILY
from studio.context import new_workspace
from studio.hosting import HostLimits
from studio.services import tryout
from studio.session import RUNNING
from studio.settings import Settings
from studio.ui import build
from studio.ui.common import gpu_seconds

needs_family = pytest.mark.skipif(not (DEMO_FAMILY / "world.json").is_file(), reason="demo family not built")
ROOT = Path(__file__).resolve().parent.parent
DEMO = {name: str(DEMO_FAMILY / name) for name in ("base-v1", "instruct-v1", "base-v2")}


class NoProgress:
    def __call__(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def studio():
    """The page as run locally, with the default settings."""
    return build(Settings())


@pytest.fixture
def events(studio):
    return studio.handlers


@pytest.fixture
def workspace(studio):
    ws = new_workspace()
    yield ws
    if ws.get("session"):
        studio.ctx.sessions.close(ws["session"])


def too_long_here() -> dict:
    """A page whose jobs may take 2 s on a 100 kB/s disk: the tiny families' jobs are too long for it."""
    return build(Settings(limits=HostLimits(max_seconds=2, local_bytes_per_s=1e5))).handlers


# ---- event functions ----------------------------------------------------------------------------------------
def test_push_logged_out_is_refused_before_any_work(workspace, hub, events):
    workspace["residuals"] = "/nonexistent"  # would fail loudly if any work started
    with pytest.raises(gr.Error, match=r"not logged in.*Nothing was pushed"):
        events["push_residuals"]("name", True, "", workspace, None)
    assert not hub.log


def test_push_before_compute_says_what_to_do(workspace, events):
    with pytest.raises(gr.Error, match="compute residuals first"):
        events["push_residuals"]("name", True, "hf_alice_write", workspace, None)


def test_errors_are_actionable_gr_errors(workspace, tmp_path, events):
    with pytest.raises(gr.Error, match=r"No folder at .* Check the path"):
        events["check"](str(tmp_path / "missing"), str(tmp_path / "missing2"), "float32", True, None)
    with pytest.raises(gr.Error, match="Fill in both"):
        events["check"]("", "x", "float32", True, None)
    with pytest.raises(gr.Error, match=r"No residuals in this session yet.*Run the Compute tab first"):
        events["apply"](
            "this session's Compute result", "", "x", 1.0, "same as target", None, workspace, NoProgress()
        )


def test_incompatible_models_error_in_ui(studio, families, workspace, events):
    with pytest.raises(gr.Error, match="not have the same tensors"):
        events["compute"](
            str(families("llama")["base"]),
            str(families("gpt2")["instruct"]),
            "float32",
            True,
            None,
            workspace,
            NoProgress(),
        )
    assert not (studio.ctx.sessions.session(workspace["session"]).folder / "residuals").exists()


@needs_family
def test_compute_apply_inspect_try_on_demo_family(workspace, hub, events):
    summary, bars, heat, archive, workspace, name = events["compute"](
        DEMO["base-v1"], DEMO["instruct-v1"], "float32", True, None, workspace, NoProgress()
    )
    assert "bit for bit" in summary and name == "instruct-v1-residuals"
    assert list(bars["layer"]) == ["embed", "0", "1", "2", "3", "final_norm"]
    assert Path(archive).is_file() and heat.data[0].type == "heatmap"
    summary, archive, workspace, name = events["apply"](
        "this session's Compute result",
        "",
        DEMO["base-v2"],
        1.0,
        "same as target",
        None,
        workspace,
        NoProgress(),
    )
    assert "Merged model ready" in summary and Path(workspace["merged"], "model.safetensors").is_file()
    _text, bars, rel, heat, table, cosine = events["inspect"](
        "this session's Compute result", "", workspace["residuals"], None, workspace, NoProgress()
    )
    assert (rel["relative"] > 0).all() and len(table) > 5 and (cosine["cosine"] > 0.999).all()
    base_out, merged_out, inst_out, verdict, _ = events["try_models"](
        tryout.example_prompts()[0], DEMO["base-v2"], DEMO["instruct-v1"], workspace, NoProgress()
    )
    assert merged_out and base_out and inst_out
    assert verdict.startswith("**Expected:**") and verdict.count("format ") == 3  # a ✓/✗ per model
    table = list(events["score_questions"](DEMO["base-v2"], DEMO["instruct-v1"], workspace))
    assert (
        len(table) == tryout.SCORE_QUESTIONS and list(table[-1]["questions"]) == [tryout.SCORE_QUESTIONS] * 3
    )
    scores = table[-1].set_index("model")
    assert scores.loc["Merged", "format %"] > scores.loc["CPT'd base", "format %"]  # the paper's effect
    url = events["push_merged"]("demo-merged", False, "hf_alice_write", workspace, None)
    assert "alice/demo-merged" in url and "alice/demo-merged" in hub.repos


@needs_family
def test_gpu_duration_from_model_sizes_reads_headers_only(studio, hub):
    small = gpu_seconds(studio.ctx)(DEMO["base-v1"], "float32", True)
    assert small == 60  # 2 MB of weights
    assert not hub.log  # 'float32' and the flags were not taken for Hub ids


def test_session_folder_removed_with_the_session(studio, events):
    ws = new_workspace()
    session = studio.ctx.session(ws, None)
    Path(session.folder, "file").write_text("x")
    Path(session.downloads, "result.zip").write_text("x")
    studio.ctx.sessions.close(ws["session"])
    assert not session.folder.exists() and not session.downloads.exists()
    with pytest.raises(
        gr.Error, match=r"session has ended.*Reload the page"
    ):  # a call that waited in the queue
        events["check"]("demo:base-v1", "demo:instruct-v1", "float32", True, None, ws)


def test_space_front_matter_is_valid():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(ROOT / "README.md")
    data = card.data.to_dict()
    assert data["sdk"] == "gradio" and data["app_file"] == "app.py" and data["hf_oauth"] is True
    assert "write-repos" in data["hf_oauth_scopes"] and data["suggested_hardware"]
    assert data["sdk_version"].split(".")[0] == gr.__version__.split(".")[0]
    requirements = (ROOT / "requirements.txt").read_text()
    for package in (
        "gradio[oauth]",
        "torch",
        "transformers",
        "safetensors",
        "huggingface_hub",
        "accelerate",
        "spaces",
    ):
        assert package in requirements


# ---- the launched app (served_app: see conftest.py) -------------------------------------------------
@needs_family
def test_app_over_its_api_compute_inspect_apply_push(served_app, hub_server):
    from gradio_client import Client

    client = Client(served_app, oauth_token="hf_bob_write", verbose=False, analytics_enabled=False)
    result = client.predict(DEMO["base-v1"], DEMO["instruct-v1"], "float32", True, "", api_name="/compute")
    assert "Residuals ready" in result[0]
    inspected = client.predict("this session's Compute result", "", "", "", api_name="/inspect")
    assert "total ‖R‖" in inspected[0]
    applied = client.predict(
        "this session's Compute result", "", DEMO["base-v2"], 1.0, "same as target", "", api_name="/apply"
    )
    assert "Merged model ready" in applied[0]
    pushed = client.predict("api-merged", True, "", api_name="/push_merged")
    assert "bob/api-merged" in pushed
    assert hub_server.repos["bob/api-merged"].private


class SlowProgress:
    """Progress that takes its time, so that a job is still running when the test acts on it."""

    def __call__(self, *args, **kwargs):
        time.sleep(0.05)


def test_cancel_stops_the_job_and_keeps_the_earlier_result(studio, families, workspace, events):
    fam = families("llama")
    events["compute"](str(fam["base"]), str(fam["instruct"]), "float32", True, None, workspace, NoProgress())
    earlier = Path(workspace["residuals"])
    stamp = (earlier / "model.safetensors").stat().st_mtime_ns
    errors: list[str] = []

    def run():
        try:
            events["compute"](
                str(fam["base"]), str(fam["target"]), "float32", True, None, workspace, SlowProgress()
            )
        except gr.Error as exc:
            errors.append(str(exc))

    job = threading.Thread(target=run)
    job.start()
    folder = studio.ctx.sessions.session(workspace["session"]).folder
    deadline = time.time() + 30
    while not (folder / RUNNING).exists() and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(gr.Error, match="already running a job"):  # one heavy job per session
        events["compute"](
            str(fam["base"]), str(fam["instruct"]), "float32", True, None, workspace, NoProgress()
        )
    assert "Cancelling" in events["cancel"](workspace)
    job.join(timeout=60)
    assert errors and "cancelled" in errors[0]
    assert sorted(p.name for p in folder.iterdir()) == ["residuals"]  # no partial, no markers, no cache
    assert (earlier / "model.safetensors").stat().st_mtime_ns == stamp  # the earlier result is kept
    assert "No job is running" in events["cancel"](workspace)


def test_a_job_too_long_for_the_space_is_refused_with_the_numbers(studio, families, workspace):
    fam = families("llama")
    events = too_long_here()
    root = studio.ctx.sessions.root
    before = set(root.iterdir()) if root.is_dir() else set()
    with pytest.raises(
        gr.Error,
        match=r"reads [\d.]+ [KMG]?B from local files, writes [\d.]+ [KMG]?B, about \d+ s here.*smaller models",
    ):
        events["compute"](
            str(fam["base"]), str(fam["instruct"]), "float32", True, None, workspace, NoProgress()
        )
    assert (set(root.iterdir()) if root.is_dir() else set()) == before  # nothing was made for it


def test_check_offers_a_job_beyond_what_the_space_should_take_on(families, events):
    fam = families("llama")
    text = events["check"](str(fam["base"]), str(fam["instruct"]), "float32", True, None)
    assert "Run as a Job" not in text  # a small job: no offer
    events = build(Settings(job_offer_seconds=0.5)).handlers
    text = events["check"](str(fam["base"]), str(fam["instruct"]), "float32", True, None)
    assert "Run as a Job on my account" in text


@needs_family
def test_try_stops_at_its_time_budget_and_says_so(workspace):
    events = build(Settings(try_max_seconds=0.0)).handlers
    replies = events["try_models"](
        "Hello there", DEMO["base-v2"], DEMO["instruct-v1"], workspace, NoProgress(), merged=DEMO["base-v1"]
    )
    assert all(
        "not generated" in reply and "0 s this Space gives one click" in reply for reply in replies[:3]
    )


def test_too_long_compute_and_merge_point_where_each_can_run(families, workspace):
    fam = families("llama")
    events = too_long_here()
    with pytest.raises(gr.Error) as compute_refusal:
        events["compute"](
            str(fam["base"]), str(fam["instruct"]), "float32", True, None, workspace, NoProgress()
        )
    assert "Run it as a Job" not in str(compute_refusal.value)  # Jobs on the Space run the merge only
    assert "jobs run" in str(compute_refusal.value)  # … the command line can send a compute to Jobs
    with pytest.raises(gr.Error, match="Run it as a Job on your account"):
        events["merge"](str(fam["base"]), str(fam["instruct"]), str(fam["target"]), 1.0, "same as target", None,
                  workspace, NoProgress())  # fmt: skip


def test_check_and_follow_run_few_at_once_and_heavy_actions_share_one_slot(studio):
    settings = studio.ctx.settings
    limits = {fn.api_name: (fn.concurrency_id, fn.concurrency_limit) for fn in studio.demo.fns.values()}
    assert limits["check"] == ("look", settings.check_concurrency)
    assert limits["follow_job"] == ("follow", settings.check_concurrency)
    for name in ("compute", "apply", "merge", "inspect", "try_models", "score_questions", "preview_export",
                 "export_lora"):  # fmt: skip
        assert limits[name] == ("heavy", settings.heavy_jobs), name
