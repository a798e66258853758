"""The Space: event functions called directly, then the launched app driven over its API and in a browser."""

import dataclasses
import threading
import time
from pathlib import Path

import gradio as gr
import pytest

import app
from residuals_core.demo import DEMO_FAMILY
from studio.session import RUNNING

needs_family = pytest.mark.skipif(not (DEMO_FAMILY / "world.json").is_file(), reason="demo family not built")
ROOT = Path(__file__).resolve().parent.parent
DEMO = {name: str(DEMO_FAMILY / name) for name in ("base-v1", "instruct-v1", "base-v2")}


class NoProgress:
    def __call__(self, *args, **kwargs):
        pass


@pytest.fixture
def workspace():
    ws = app.new_workspace()
    yield ws
    app.drop_workspace(ws)


# ---- event functions ----------------------------------------------------------------------------------------
def test_push_logged_out_is_refused_before_any_work(workspace, hub):
    workspace["residuals"] = "/nonexistent"  # would fail loudly if any work started
    with pytest.raises(gr.Error, match=r"not logged in.*Nothing was pushed"):
        app.push_residuals("name", True, "", workspace, None)
    assert not hub.log


def test_push_before_compute_says_what_to_do(workspace):
    with pytest.raises(gr.Error, match="compute residuals first"):
        app.push_residuals("name", True, "hf_alice_write", workspace, None)


def test_errors_are_actionable_gr_errors(workspace, tmp_path):
    with pytest.raises(gr.Error, match=r"No folder at .* Check the path"):
        app.check_models(str(tmp_path / "missing"), str(tmp_path / "missing2"), "float32", True, None)
    with pytest.raises(gr.Error, match="Fill in both"):
        app.check_models("", "x", "float32", True, None)
    with pytest.raises(gr.Error, match="run the Compute tab first"):
        app.apply(
            "this session's Compute result", "", "x", 1.0, "same as target", None, workspace, NoProgress()
        )


def test_incompatible_models_error_in_ui(families, workspace):
    with pytest.raises(gr.Error, match="not have the same tensors"):
        app.compute(
            str(families("llama")["base"]),
            str(families("gpt2")["instruct"]),
            "float32",
            True,
            None,
            workspace,
            NoProgress(),
        )
    assert not (app.SESSIONS.session(workspace["session"]).folder / "residuals").exists()


@needs_family
def test_compute_apply_inspect_try_on_demo_family(workspace, hub):
    summary, bars, heat, archive, workspace, name = app.compute(
        DEMO["base-v1"], DEMO["instruct-v1"], "float32", True, None, workspace, NoProgress()
    )
    assert "bit for bit" in summary and name == "instruct-v1-residuals"
    assert list(bars["layer"]) == ["embed", "0", "1", "2", "3", "final_norm"]
    assert Path(archive).is_file() and heat.data[0].type == "heatmap"
    summary, archive, workspace, name = app.apply(
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
    _text, bars, rel, heat, table, cosine = app.inspect(
        "this session's Compute result", "", workspace["residuals"], None, workspace, NoProgress()
    )
    assert (rel["relative"] > 0).all() and len(table) > 5 and (cosine["cosine"] > 0.999).all()
    base_out, merged_out, inst_out, verdict, _ = app.try_models(
        app.example_prompts()[0], DEMO["base-v2"], DEMO["instruct-v1"], workspace, NoProgress()
    )
    assert merged_out and base_out and inst_out
    assert verdict.startswith("**Expected:**") and verdict.count("format ") == 3  # a ✓/✗ per model
    table = list(app.score_questions(DEMO["base-v2"], DEMO["instruct-v1"], workspace))
    assert len(table) == app.SCORE_QUESTIONS and list(table[-1]["questions"]) == [app.SCORE_QUESTIONS] * 3
    scores = table[-1].set_index("model")
    assert scores.loc["Merged", "format %"] > scores.loc["CPT'd base", "format %"]  # the paper's effect
    url = app.push_merged("demo-merged", False, "hf_alice_write", workspace, None)
    assert "alice/demo-merged" in url and "alice/demo-merged" in hub.repos


@needs_family
def test_gpu_duration_from_model_sizes_reads_headers_only(hub):
    small = app._gpu_seconds(DEMO["base-v1"], "float32", True)
    assert small == 60  # 2 MB of weights
    assert not hub.log  # 'float32' and the flags were not taken for Hub ids


def test_session_folder_removed_with_the_session():
    ws = app.new_workspace()
    session = app._session(ws, None)
    Path(session.folder, "file").write_text("x")
    Path(session.downloads, "result.zip").write_text("x")
    app.drop_workspace(ws)
    assert not session.folder.exists() and not session.downloads.exists()
    with pytest.raises(
        gr.Error, match=r"session has ended.*Reload the page"
    ):  # a call that waited in the queue
        app.check_models("demo:base-v1", "demo:instruct-v1", "float32", True, None, ws)


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


def test_cancel_stops_the_job_and_keeps_the_earlier_result(families, workspace):
    fam = families("llama")
    app.compute(str(fam["base"]), str(fam["instruct"]), "float32", True, None, workspace, NoProgress())
    earlier = Path(workspace["residuals"])
    stamp = (earlier / "model.safetensors").stat().st_mtime_ns
    errors: list[str] = []

    def run():
        try:
            app.compute(
                str(fam["base"]), str(fam["target"]), "float32", True, None, workspace, SlowProgress()
            )
        except gr.Error as exc:
            errors.append(str(exc))

    job = threading.Thread(target=run)
    job.start()
    folder = app.SESSIONS.session(workspace["session"]).folder
    deadline = time.time() + 30
    while not (folder / RUNNING).exists() and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(gr.Error, match="already running a job"):  # one heavy job per session
        app.compute(str(fam["base"]), str(fam["instruct"]), "float32", True, None, workspace, NoProgress())
    assert "Cancelling" in app.cancel_job(workspace)
    job.join(timeout=60)
    assert errors and "cancelled" in errors[0]
    assert sorted(p.name for p in folder.iterdir()) == ["residuals"]  # no partial, no markers, no cache
    assert (earlier / "model.safetensors").stat().st_mtime_ns == stamp  # the earlier result is kept
    assert "No job is running" in app.cancel_job(workspace)


def test_a_job_too_long_for_the_space_is_refused_with_the_numbers(families, workspace, monkeypatch):
    from residuals_core.hosting import HostLimits

    fam = families("llama")
    monkeypatch.setattr(app, "LIMITS", HostLimits(max_seconds=2, local_bytes_per_s=1e5))
    before = set(app.SESSIONS.root.iterdir()) if app.SESSIONS.root.is_dir() else set()
    with pytest.raises(
        gr.Error,
        match=r"reads [\d.]+ [KMG]?B from local files, writes [\d.]+ [KMG]?B, about \d+ s here.*smaller models",
    ):
        app.compute(str(fam["base"]), str(fam["instruct"]), "float32", True, None, workspace, NoProgress())
    assert set(app.SESSIONS.root.iterdir()) == before  # nothing was made for it


def test_check_offers_a_job_beyond_what_the_space_should_take_on(families, monkeypatch):
    fam = families("llama")
    text = app.check_models(str(fam["base"]), str(fam["instruct"]), "float32", True, None)
    assert "Run as a Job" not in text  # a small job: no offer
    monkeypatch.setattr(app, "SETTINGS", dataclasses.replace(app.SETTINGS, job_offer_seconds=0.5))
    text = app.check_models(str(fam["base"]), str(fam["instruct"]), "float32", True, None)
    assert "Run as a Job on my account" in text


@needs_family
def test_try_stops_at_its_time_budget_and_says_so(workspace, monkeypatch):
    monkeypatch.setattr(app, "SETTINGS", dataclasses.replace(app.SETTINGS, try_max_seconds=0.0))
    replies = app.try_models(
        "Hello there", DEMO["base-v2"], DEMO["instruct-v1"], workspace, NoProgress(), merged=DEMO["base-v1"]
    )
    assert all(
        "not generated" in reply and "0 s this Space gives one click" in reply for reply in replies[:3]
    )


def test_too_long_compute_and_merge_point_where_each_can_run(families, workspace, monkeypatch):
    from residuals_core.hosting import HostLimits

    fam = families("llama")
    monkeypatch.setattr(app, "LIMITS", HostLimits(max_seconds=2, local_bytes_per_s=1e5))
    with pytest.raises(gr.Error) as compute_refusal:
        app.compute(str(fam["base"]), str(fam["instruct"]), "float32", True, None, workspace, NoProgress())
    assert "Run it as a Job" not in str(compute_refusal.value)  # Jobs on the Space run the merge only
    assert "jobs run" in str(compute_refusal.value)  # … the command line can send a compute to Jobs
    with pytest.raises(gr.Error, match="Run it as a Job on your account"):
        app.merge(str(fam["base"]), str(fam["instruct"]), str(fam["target"]), 1.0, "same as target", None,
                  workspace, NoProgress())  # fmt: skip


def test_check_and_follow_run_few_at_once_and_heavy_actions_share_one_slot():
    limits = {fn.api_name: (fn.concurrency_id, fn.concurrency_limit) for fn in app.demo.fns.values()}
    assert limits["check"] == ("look", app.SETTINGS.check_concurrency)
    assert limits["follow_job"] == ("follow", app.SETTINGS.check_concurrency)
    for name in ("compute", "apply", "merge", "inspect", "try_models", "score_questions", "preview_export",
                 "export_lora"):  # fmt: skip
        assert limits[name] == ("heavy", app.SETTINGS.heavy_jobs), name
