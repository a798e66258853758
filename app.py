"""Residuals Studio — the Gradio Space. Wires UI events to residuals_core and formats the results."""

from __future__ import annotations

import collections
import contextlib
import functools
import html
import os
import shutil
import tempfile
import threading
from inspect import isgeneratorfunction
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import spaces
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_token

from residuals_core import (
    ResidualsError,
    apply_residuals,
    compute_residuals,
    export_lora,
    merge_models,
    operations,
)
from residuals_core.demo import DEMO_FAMILY, EOS, QUESTIONS, World, expected_reply, question_of, score_reply
from residuals_core.demo import generate as demo_generate
from residuals_core.demo import prompt as demo_prompt
from residuals_core.errors import Cancelled
from residuals_core.generation import complete, generation_dtype, load_causal_lm
from residuals_core.hosting import (
    SESSION_MERGED,
    SESSION_RESIDUALS,
    HostLimits,
    InputPolicy,
    JobEstimate,
    estimate_job,
    refuse_if_too_long,
    visitor_fix,
    visitor_token,
)
from residuals_core.hub import HUB_PREFIX, is_hub_id
from residuals_core.lora import preview_lora
from residuals_core.options import Options

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEMO = {name: str(DEMO_FAMILY / name) for name in ("base-v1", "instruct-v1", "base-v2")}
ON_SPACE = bool(os.environ.get("SPACE_ID"))
HEAVY_JOBS = int(os.environ.get("STUDIO_CONCURRENCY", "1"))  # heavy jobs running at once, all sessions
QUEUE_SIZE = int(os.environ.get("STUDIO_QUEUE_SIZE", "16"))  # events waiting at most
MAX_ZIP_BYTES = int(float(os.environ.get("STUDIO_MAX_ZIP_BYTES", 2e9)))  # larger results: push, not zip
POLICY = InputPolicy(on_space=ON_SPACE)
LIMITS = HostLimits.from_environment(os.environ)
JOB_OFFER_SECONDS = float(os.environ.get("STUDIO_JOB_OFFER_MINUTES", "10")) * 60  # beyond: suggest a Job
# (base, instruct, target): one version's instruction residuals onto another version's base, same shapes
CROSS_VERSION_EXAMPLES = (
    ("Qwen/Qwen2-0.5B", "Qwen/Qwen2-0.5B-Instruct", "Qwen/Qwen2.5-0.5B"),
    ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2-0.5B"),
    ("Qwen/Qwen2-1.5B", "Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2.5-1.5B"),
    ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Llama-3.1-8B"),
)
WIDE = 300  # min width of side-by-side fields: on a phone (390 px) they stack instead of clipping
FIELD_HINT = "Hub id or demo model" if ON_SPACE else "Hub id, local folder or demo model"
FROM_SESSION = "this session's Compute result"  # the radio choice for SESSION_RESIDUALS
MOCK_OAUTH = "mock-oauth-token-for-local-dev"  # gradio's stand-in login when not on a Space

INTRO = """# Residuals Studio
**Instruction residuals** R = θ_instruct − θ_base (Jindal et al. 2024; task arithmetic, Ilharco et al. 2022).
Continue pre-training a *base* model on your domain, then add R to get instruction following back — no
instruction tuning. Everything streams one tensor at a time, so 8B models fit in a few hundred MB of RAM.

**1. Compute** residuals of an instruct model over its base → **2. Apply** them to your continued-pre-trained
base (or merge three models in one pass) → **3. Inspect** per-layer norms → **4. Try** the models side by side →
push the result to your own Hub account. The fields start with a tiny bundled demo family: just click.
"""


# ---- per-session workspace --------------------------------------------------------------------------
def new_workspace() -> dict[str, Any]:
    """A session's workspace; its folders are made by its first job (`_ensure_folders`)."""
    return {"dir": None, "downloads": None, "residuals": None, "merged": None}


_SESSIONS: dict[str, dict[str, Any]] = {}  # session hash -> workspace, for removal when the tab closes
_SESSIONS_LOCK = threading.Lock()


def _ensure_folders(workspace: dict[str, Any], request: gr.Request | None) -> dict[str, Any]:
    """Each session works in its own temporary folder, removed when the session ends.

    Its zips go to a folder of their own inside Gradio's cache, so that Gradio serves them without
    copying them into its cache (copies it would never delete) and they go with the session.
    """
    if workspace.get("dir") is None or not Path(workspace["dir"]).is_dir():
        downloads = Path(gr.utils.get_upload_folder()) / "studio-downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        workspace["dir"] = tempfile.mkdtemp(prefix="studio-")
        workspace["downloads"] = tempfile.mkdtemp(prefix="session-", dir=downloads)
    if request is not None and getattr(request, "session_hash", None):
        with _SESSIONS_LOCK:
            _SESSIONS[request.session_hash] = workspace
    return workspace


def drop_workspace(workspace: dict[str, Any] | None) -> None:
    for key in ("dir", "downloads"):
        if workspace and workspace.get(key):
            shutil.rmtree(workspace[key], ignore_errors=True)


def end_session(request: gr.Request) -> None:
    """The tab closed (Gradio keeps its state an hour longer, in case it comes back): files and models go now."""
    with _SESSIONS_LOCK:
        workspace = _SESSIONS.pop(request.session_hash, None)
    drop_workspace(workspace)
    _free_session_models(request.session_hash)


def _session(workspace: dict[str, Any]) -> dict[str, str | None]:
    return {SESSION_RESIDUALS: workspace.get("residuals"), SESSION_MERGED: workspace.get("merged")}


def _model(text: str | None, role: str, workspace: dict[str, Any]) -> str:
    """What a model field names, by the host's rules (on a Space: Hub ids, demo models, session results)."""
    return POLICY.resolve(text, role=role, session=_session(workspace))


def _job_output(workspace: dict[str, Any], name: str) -> Path:
    """Where a job writes its result; the session's previous result stays until the new one is whole."""
    path = Path(_ensure_folders(workspace, None)["dir"]) / f"{name}.new"
    shutil.rmtree(path, ignore_errors=True)  # a crashed job's leftover, never a result
    return path


def _keep(workspace: dict[str, Any], name: str, written: Path) -> Path:
    """The new result replaces the session's previous one of its kind."""
    final = written.with_name(name)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(written, final)
    workspace[name] = str(final)
    return final


def _zip(folder: Path, workspace: dict[str, Any]) -> tuple[str | None, str]:
    """The result as one zip in the session's downloads (once), or none when it is too large to serve."""
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > MAX_ZIP_BYTES:
        return None, (
            f"\n\nThe result is {_size(size)}, more than this Space zips ({_size(MAX_ZIP_BYTES)}): push it to your "
            "Hub account below to get it out."
        )
    base = Path(workspace["downloads"]) / folder.name
    archive = shutil.make_archive(str(base), "zip", root_dir=folder)
    return archive, f"\n\nDownload: a {_size(Path(archive).stat().st_size)} zip below."


def ui_errors(fn):
    """Show ResidualsError messages (what went wrong + what to do) as gr.Error popups, escaped."""

    def shown(exc: ResidualsError) -> gr.Error:  # a field's text reaches the message as text, never as HTML
        fix = visitor_fix(exc.fix) if ON_SPACE else exc.fix
        return gr.Error(html.escape(f"{exc.problem} — {fix}"), duration=None)

    if isgeneratorfunction(fn):  # a live table: errors may come on any step

        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except ResidualsError as exc:
                raise shown(exc) from exc

        return stream

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ResidualsError as exc:
            raise shown(exc) from exc

    return wrapper


def _token(field: str | None, oauth_token: gr.OAuthToken | None = None) -> str | bool | None:
    """The token a visitor's reads carry: their own login on a Space (or none at all), never the Space's."""
    login = oauth_token.token if oauth_token is not None and oauth_token.token != MOCK_OAUTH else None
    return visitor_token(ON_SPACE, login, field)


def _check_scale(scale: float) -> float:
    """α as the slider allows it: typed or sent values outside (0, 2] are refused, not clamped."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise gr.Error(f"α must be a number, not {html.escape(repr(scale))}.") from None
    if value == 0:
        raise gr.Error(
            "α = 0 adds nothing: the result would be the target model itself. Choose α > 0 (1.0 adds the residuals once)."
        )
    if not 0 < value <= 2:
        raise gr.Error(
            f"α = {value:g} is outside the range this Space applies (0 < α ≤ 2). Choose a value in it."
        )
    return value


RUNNING, CANCEL = ".job-running", ".job-cancel"  # marker files in the session folder (work across processes)


@contextlib.contextmanager
def heavy_job(workspace: dict[str, Any], progress: gr.Progress, label: str):
    """One heavy job per session, stoppable by Cancel, with a per-job Hub cache (small files only).

    Yields (cache folder, progress callback). The callback maps the engine's tensors onto 0–90 % and
    raises once Cancel was pressed, so the engine stops and its sinks remove what they wrote.
    """
    folder = Path(workspace["dir"])
    try:
        os.close(os.open(folder / RUNNING, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise gr.Error(
            "This session is already running a job: wait for it to finish, or press Cancel."
        ) from None
    (folder / CANCEL).unlink(missing_ok=True)

    def report(done: int, total: int, name: str) -> None:
        if (folder / CANCEL).exists():
            raise Cancelled(
                "The job was cancelled.", "Nothing it wrote was kept; run it again when you want."
            )
        progress(0.9 * done / max(total, 1), desc=f"{label}: {done}/{total} tensors ({name})")

    cache = folder / "hub-cache"
    try:
        yield cache, report
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        (folder / CANCEL).unlink(missing_ok=True)
        (folder / RUNNING).unlink(missing_ok=True)


def preflight(models: list[tuple[str, str]], token: str | bool | None, dtype: str | None) -> JobEstimate:
    """What a job will read and write and about how long it takes, from headers; refused when too long.

    `models` are (model, role) with the output's shape taken from the last one (the target, or the
    instruct model for compute); `dtype` is the output's, None for the target's own.
    """
    with scratch_cache() as cache:
        opened = operations.open_models([(m, r) for m, r in models], Options(token=token, cache_dir=cache))
    try:
        shape_from = opened[-1]
        if dtype is None:
            write = shape_from.total_bytes
        else:
            itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            write = sum(
                t.numel * (itemsize if t.dtype.is_floating_point else t.dtype.itemsize)
                for t in shape_from.tensors.values()
            )
        estimate = estimate_job([(c.total_bytes, c.remote) for c in opened], write, LIMITS)
    finally:
        for checkpoint in opened:
            checkpoint.close()
    refuse_if_too_long(estimate, LIMITS)
    return estimate


@contextlib.contextmanager
def scratch_cache():
    """A Hub cache for one look at models (their small files), removed after it: a shared cache would
    grow with every stranger's models and keep them for everyone."""
    with tempfile.TemporaryDirectory(prefix="studio-look-") as folder:
        yield folder


def _job_hint(estimate: JobEstimate) -> str:
    """Beyond what this Space should take on (STUDIO_JOB_OFFER_MINUTES), the way out: a Job on your account."""
    if estimate.seconds <= JOB_OFFER_SECONDS:
        return ""
    return (
        f"\n- ⏱ that is more than {JOB_OFFER_SECONDS / 60:.0f} min: consider **Run as a Job on my account** "
        "(Apply tab, under the one-pass merge), which runs it on your own hardware and pushes the result."
    )


def cancel_job(workspace: dict[str, Any]) -> str:
    """Ask the session's running job to stop: it does so at its next tensor and removes what it wrote."""
    folder = workspace.get("dir")
    if not folder or not Path(folder, RUNNING).exists():
        return "No job is running in this session."
    Path(folder, CANCEL).touch()
    return "Cancelling: the job stops at its next tensor and removes what it wrote."


def _gpu_seconds(*args, **kwargs) -> int:
    """ZeroGPU duration from the inputs' size on disk (headers only; ≈0.5 GB/s plus start-up), 60–900 s.

    The fields are read by the same rules and with the same token as the job itself.
    """
    values = [*args, *kwargs.values()]
    workspace = next((v for v in values if isinstance(v, dict) and "dir" in v), {})
    oauth = next((v for v in values if isinstance(v, gr.OAuthToken)), None)
    token = _token(None, oauth)
    size = 0
    for value in values:
        if not isinstance(value, str) or ("/" not in value and ":" not in value) or "\n" in value:
            continue  # only model ids (org/name), demo names and folders count
        try:
            with (
                scratch_cache() as cache,
                operations.open_model(
                    _model(value, "input", workspace),
                    role="input",
                    options=Options(token=token, cache_dir=cache),
                ) as checkpoint,
            ):
                size += checkpoint.total_bytes
        except Exception:  # not a model (a dtype, a radio choice…), refused or unreachable: count nothing
            continue
    return int(min(900, 60 + 2 * size / 1e9))


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1000
    return ""


# ---- plots ------------------------------------------------------------------------------------------
def layer_frame(summary: dict[str, Any]) -> pd.DataFrame:
    rows = [
        {
            "layer": str(r["layer"]),
            "norm": r["norm"],
            "relative": r["relative"] if r["relative"] is not None else 0.0,
        }
        for r in summary.get("layers", [])
    ]
    return pd.DataFrame(rows, columns=["layer", "norm", "relative"])


def module_heatmap(summary: dict[str, Any]) -> go.Figure:
    layers = [str(r["layer"]) for r in summary.get("layers", [])]
    modules = sorted({m["module"] for m in summary.get("modules", [])})
    grid = {(m["module"], str(m["layer"])): m["norm"] for m in summary.get("modules", [])}
    z = [[grid.get((module, layer)) for layer in layers] for module in modules]
    fig = go.Figure(go.Heatmap(z=z, x=layers, y=modules, colorscale="Viridis", colorbar={"title": "‖R‖"}))
    fig.update_layout(title="‖R‖ by module × layer", xaxis_title="layer", yaxis_title="module", height=360)
    fig.update_xaxes(type="category")
    return fig


def largest_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["tensor", "layer", "module", "norm", "relative", "numel"])
    return frame.round({"norm": 6, "relative": 6})


# ---- Compute ----------------------------------------------------------------------------------------
def _require_pair(base: str, instruct: str) -> None:
    if not base.strip() or not instruct.strip():
        raise gr.Error(
            "Fill in both the base and the instruct model (a Hub id like org/name, or a local folder)."
        )


@ui_errors
def check_models(
    base: str,
    instruct: str,
    dtype: str,
    normalize: bool,
    token: str | None,
    workspace: dict[str, Any] | None = None,
    oauth_token: gr.OAuthToken | None = None,
) -> str:
    _require_pair(base, instruct)
    workspace = workspace or {}
    base_model, instruct_model = (
        _model(base, "base model", workspace),
        _model(instruct, "instruct model", workspace),
    )
    read_token = _token(token, oauth_token)
    with scratch_cache() as cache:
        report = operations.check_compatibility(
            base_model,
            instruct_model,
            normalize_embeddings=normalize,
            dtype=dtype,
            token=read_token,
            cache_dir=cache,
        )
    # the estimate from the headers just read, not from a second opening of the same models
    inputs = [(size, is_hub_id(label)) for label, size in report["size_on_disk"].items()]
    estimate = estimate_job(inputs, report["expected_output_bytes"], LIMITS)
    refuse_if_too_long(estimate, LIMITS)
    sizes = ", ".join(f"`{k}` {_size(v)}" for k, v in report["size_on_disk"].items())
    notes = "".join(f"\n- note: {n}" for n in report["notes"])
    return (
        f"✅ **Compatible** (checked from headers, no weights downloaded)\n\n"
        f"- architecture: **{report['architecture']}**, {report['layers']} layers, "
        f"{report['parameters'] / 1e6:.2f} M parameters in {report['tensors']} tensors\n"
        f"- vocabulary: base {report['vocab_size']['base']}, instruct {report['vocab_size']['instruct']}, "
        f"tokenizer {report['tokenizer_length']}; tied embeddings: {report['tie_word_embeddings']}\n"
        f"- size on disk: {sizes}\n- residuals will take **{_size(report['expected_output_bytes'])}** ({dtype})\n"
        f"- the job {estimate.describe()} (limit here: {LIMITS.max_seconds / 60:.0f} min)"
        f"{_job_hint(estimate)}"
        f"{notes}\n\nNext: **Compute residuals**."
    )


@spaces.GPU(duration=_gpu_seconds)
@ui_errors
def compute(
    base: str,
    instruct: str,
    dtype: str,
    normalize: bool,
    token: str | None,
    workspace: dict[str, Any],
    progress: gr.Progress = gr.Progress(),  # noqa: B008 (gradio injects it)
    direct: bool = False,
    repo_name: str = "",
    private: bool = True,
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request | None = None,
):
    """Residuals into the session's folder, or with `direct` straight into the visitor's Hub repo."""
    _require_pair(base, instruct)  # compute itself rejects incompatible models from headers, before work
    base_model, instruct_model = (
        _model(base, "base model", workspace),
        _model(instruct, "instruct model", workspace),
    )
    push, read_token = _direct_push(direct, repo_name, private, token, oauth_token)
    estimate = preflight([(base_model, "base"), (instruct_model, "instruct")], read_token, dtype)
    _ensure_folders(workspace, request)
    with heavy_job(workspace, progress, "computing") as (cache, report):
        result = compute_residuals(
            base_model,
            instruct_model,
            None if push else _job_output(workspace, "residuals"),
            push_to=push[0] if push else None,
            private=private,
            dtype=dtype,
            normalize_embeddings=normalize,
            token=read_token,
            cache_dir=cache,
            device=DEVICE,
            progress=report,
        )
        if push:
            archive, download = None, _streamed(result, workspace, "residuals")
        else:
            kept = _keep(workspace, "residuals", result.path)
            progress(0.92, desc="zipping the residuals for download")
            archive, download = _zip(kept, workspace)
    recon = result.reconstruction or {}
    exact = (
        "base + R reproduces the instruct model **bit for bit**"
        if recon.get("exact")
        else f"{recon.get('mismatched_elements')} of {recon.get('elements')} elements differ after reconstruction "
        f"(max error {recon.get('max_abs_error', 0):.2g}) — the price of {dtype} storage"
    )
    summary = (
        f"### Residuals ready\n{len(result.tensors)} tensors, total ‖R‖ = {result.summary['total_norm']:.4g}, "
        f"‖R‖/‖θ_base‖ = {result.summary['relative'] or 0:.3g}. {exact}. (The job {estimate.describe()}.)\n\n"
        "Next: **Apply** them to your continued-pre-trained base, **Inspect** them, or push them to the Hub below."
    )
    name = _repo_name(instruct) + "-residuals"
    return (
        summary + download,
        layer_frame(result.summary),
        module_heatmap(result.summary),
        archive,
        workspace,
        name,
    )


def _repo_name(field: str) -> str:
    """A default repo name from a model field: the model's own name, whatever its kind."""
    return Path(field.strip().rstrip("/").removeprefix("demo:")).name


# ---- Apply / merge ----------------------------------------------------------------------------------
def _residuals_source(source: str, path: str, workspace: dict[str, Any]) -> str:
    if source == FROM_SESSION:
        if not workspace.get("residuals"):
            raise gr.Error(
                "No residuals in this session yet: run the Compute tab first, or choose a Hub id"
                + ("." if ON_SPACE else " / folder.")
            )
        return workspace["residuals"]
    if not path.strip():
        raise gr.Error("Give the residuals' Hub id" + ("." if ON_SPACE else " or local folder."))
    return _model(path, "residuals", workspace)


def _merged_summary(result, what: str, estimate: JobEstimate) -> str:
    return (
        f"### Merged model ready\n{what}: {len(result.tensors)} tensors, ‖α·R‖ = {result.summary['total_norm']:.4g} "
        f"(the job {estimate.describe()}). "
        "The folder holds weights, config, generation config, tokenizer and a model card "
        "(`base_model`: the target and the instruct model, `base_model_relation: merge`).\n\n"
        "Next: compare generations in **Try**, download the zip, or push it below."
    )


@spaces.GPU(duration=_gpu_seconds)
@ui_errors
def apply(
    source: str,
    residuals_path: str,
    target: str,
    scale: float,
    dtype: str,
    token: str | None,
    workspace: dict[str, Any],
    progress: gr.Progress = gr.Progress(),  # noqa: B008
    direct: bool = False,
    repo_name: str = "",
    private: bool = True,
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request | None = None,
):
    scale = _check_scale(scale)
    push, read_token = _direct_push(direct, repo_name, private, token, oauth_token)
    residuals = _residuals_source(source, residuals_path, workspace)
    if not target.strip():
        raise gr.Error("Give the target model (your continued-pre-trained base): a Hub id or a demo model.")
    return _into_merged(
        workspace,
        apply_residuals,
        (residuals,),
        target,
        scale,
        dtype,
        read_token,
        progress,
        "applying",
        f"`{html.escape(target.strip())}` + {scale:g}·R",
        request,
        push,
    )


def _into_merged(
    workspace,
    operation,
    inputs: tuple,
    target: str,
    scale,
    dtype,
    token,
    progress,
    label: str,
    what: str,
    request: gr.Request | None = None,
    push: tuple[str, bool] | None = None,
):
    """Run apply or merge into the session's `merged` folder (or straight into the Hub repo `push`)."""
    target_model = _model(target, "target model", workspace)
    roles = ["residuals"] if operation is apply_residuals else ["base", "instruct"]
    out_dtype = None if dtype == "same as target" else dtype
    estimate = preflight([*zip(inputs, roles, strict=True), (target_model, "target")], token, out_dtype)
    _ensure_folders(workspace, request)
    with heavy_job(workspace, progress, label) as (cache, report):
        result = operation(
            *inputs,
            target_model,
            None if push else _job_output(workspace, "merged"),
            push_to=push[0] if push else None,
            private=push[1] if push else False,
            scale=scale,
            dtype=out_dtype,
            token=token,
            cache_dir=cache,
            device=DEVICE,
            progress=report,
        )
        if push:
            archive, download = None, _streamed(result, workspace, "merged")
        else:
            kept = _keep(workspace, "merged", result.path)
            progress(0.92, desc="zipping the merged model for download")
            archive, download = _zip(kept, workspace)
    name = _repo_name(target) + "-plus-residuals"
    return _merged_summary(result, what, estimate) + download, archive, workspace, name


@spaces.GPU(duration=_gpu_seconds)
@ui_errors
def merge(
    base: str,
    instruct: str,
    target: str,
    scale: float,
    dtype: str,
    token: str | None,
    workspace: dict[str, Any],
    progress: gr.Progress = gr.Progress(),  # noqa: B008
    direct: bool = False,
    repo_name: str = "",
    private: bool = True,
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request | None = None,
):
    scale = _check_scale(scale)
    push, read_token = _direct_push(direct, repo_name, private, token, oauth_token)
    if not (base.strip() and instruct.strip() and target.strip()):
        raise gr.Error("Fill in base, instruct and target models for a one-pass merge.")
    return _into_merged(
        workspace,
        merge_models,
        (_model(base, "base model", workspace), _model(instruct, "instruct model", workspace)),
        target,
        scale,
        dtype,
        read_token,
        progress,
        "merging",
        "one pass",
        request,
        push,
    )


# ---- Inspect ----------------------------------------------------------------------------------------
@ui_errors
def inspect(
    source: str,
    path: str,
    compare: str,
    token: str | None,
    workspace: dict[str, Any],
    oauth_token: gr.OAuthToken | None = None,
):
    target = _residuals_source(source, path, workspace)
    read_token = _token(token, oauth_token)
    with scratch_cache() as cache:
        report = operations.inspect_residuals(target, token=read_token, cache_dir=cache)
    relative = f", ‖R‖/‖θ_base‖ = {report['relative']:.3g}" if report.get("relative") else ""
    summary = (
        f"**{html.escape(str(report['instruct_model']))} − {html.escape(str(report['base_model']))}** "
        f"({report['dtype']}, {report['tensors']} tensors): total ‖R‖ = {report['total_norm']:.4g}{relative}."
    )
    cosine = pd.DataFrame(columns=["layer", "cosine"])
    if compare.strip():
        other = _model(compare, "comparison residuals", workspace)
        with scratch_cache() as cache:
            rows = operations.compare_residuals(target, other, token=read_token, cache_dir=cache)
        cosine = pd.DataFrame(rows, columns=["layer", "cosine"]).fillna(0.0)
        mean = cosine["cosine"].mean() if len(cosine) else 0.0
        summary += f"\n\nCompared with `{html.escape(compare.strip())}`: mean per-layer cosine similarity **{mean:.3f}**."
    layers = layer_frame(report)
    return (
        summary,
        layers,
        layers,
        module_heatmap(report),
        largest_frame(report["largest"]),
        cosine,
    )


# ---- Jobs: a job beyond the Space, on the visitor's own account -------------------------------------
JOB_FLAVORS = ["cpu-basic", "cpu-upgrade", "t4-small", "a10g-small", "a10g-large"]
JOB_STAGES_DONE = ("COMPLETED", "CANCELED", "ERROR", "DELETED")


def _job_image() -> str:
    """The image a job runs in: this Space's own (it holds this project), or STUDIO_JOB_IMAGE."""
    image = os.environ.get("STUDIO_JOB_IMAGE") or (
        f"hf.co/spaces/{os.environ['SPACE_ID']}" if ON_SPACE else None
    )
    if image is None:
        raise gr.Error("Jobs need an image of this app: run it as a Space, or set STUDIO_JOB_IMAGE.")
    return image


def _job_model(text: str, role: str, workspace: dict[str, Any]) -> str:
    """A model a job can read: a Hub id or a demo model (the job's image has the demo family), not a
    result that only this Space's disk holds."""
    model = _model(text, role, workspace)
    if model.startswith(HUB_PREFIX) or model.startswith(str(DEMO_FAMILY)) or not ON_SPACE:
        return model.removeprefix(HUB_PREFIX)
    raise gr.Error(
        f"The {role} is a result on this Space's disk, which a Job cannot read: push it first, "
        "or write it straight into your Hub repo."
    )


@ui_errors
def run_as_job(
    base: str,
    instruct: str,
    target: str,
    scale: float,
    dtype: str,
    repo_name: str,
    private: bool,
    flavor: str,
    jobs_seen: list | None = None,
    token: str | None = None,
    workspace: dict[str, Any] | None = None,
    oauth_token: gr.OAuthToken | None = None,
):
    """Submit the one-pass merge as a Hugging Face Job under the visitor's account; the job id is kept in
    the browser (not the token), so the page can follow it after a reload."""
    from residuals_core import jobs

    write_token = _write_token(token, oauth_token)  # refused here, before anything is submitted
    scale = _check_scale(scale)
    workspace = workspace or {}
    argv = ["merge", "--base", _job_model(base, "base model", workspace),
            "--instruct", _job_model(instruct, "instruct model", workspace),
            "--target", _job_model(target, "target model", workspace),
            "--scale", f"{scale:g}", "--push-to", _repo_name_given(repo_name), "--quiet"]  # fmt: skip
    if dtype != "same as target":
        argv += ["--dtype", dtype]
    if private:
        argv.append("--private")
    if oauth_token is not None and "jobs" not in (oauth_token.scope or "jobs").split():
        raise gr.Error(
            "Your login did not grant this Space the right to run Jobs: log out and in again, "
            "allowing 'Run Jobs' when Hugging Face asks."
        )
    info = jobs.run_job(
        argv,
        token=write_token,
        image=_job_image(),
        flavor=flavor or None,
        token_expires_at=getattr(oauth_token, "expires_at", None) or None,  # 0: a token given through the API
    )
    seen = [*(jobs_seen or []), {"id": info.id, "url": info.url, "repo": _repo_name_given(repo_name)}]
    return (
        f"Job [{info.id}]({info.url}) submitted on your account: it {info.plan.describe()}. "
        "**Follow my job** shows its logs.",
        seen,
    )


@ui_errors
def follow_job(
    jobs_seen: list | None = None, token: str | None = None, oauth_token: gr.OAuthToken | None = None
):
    """The latest job's stage and logs, live until it ends; then the pushed repo's link."""
    from residuals_core import jobs

    if not jobs_seen:
        raise gr.Error("No job was submitted from this browser yet.")
    job = jobs_seen[-1]
    write_token = _write_token(token, oauth_token)
    lines: list[str] = []
    yield f"Job [{job['id']}]({job['url']}): starting…", ""
    for line in jobs.job_logs(job["url"], token=write_token):
        lines.append(line)
        yield f"Job [{job['id']}]({job['url']}): running", "\n".join(lines[-40:])
    final = jobs.wait_for_job(job["url"], token=write_token)  # the log can end before the job does
    stage = final.status.stage
    message = f" ({final.status.message})" if final.status.message else ""
    done = f"Job [{job['id']}]({job['url']}): **{stage}**{message}"
    if stage == "COMPLETED":
        url = f"{hub_constants.ENDPOINT}/{job['repo']}"
        done += f" — the result is at [{url}]({url})"
    yield done, "\n".join(lines[-40:])


# ---- Export smaller (LoRA) -------------------------------------------------------------------------------
def _cut(mode: str, rank: float, energy: float) -> dict[str, Any]:
    return {"rank": int(rank), "energy": None} if mode == "rank" else {"rank": None, "energy": float(energy)}


@ui_errors
def preview_export(
    source: str,
    path: str,
    mode: str,
    rank: float,
    energy: float,
    embeddings: bool,
    token: str | None,
    workspace: dict[str, Any],
    oauth_token: gr.OAuthToken | None = None,
):
    """Per layer, the share of ‖R‖² the adapter would keep, and its size — before anything is written."""
    target = _residuals_source(source, path, workspace)
    with scratch_cache() as cache:
        checkpoint, _ = operations.open_residuals(
            target, options=Options(token=_token(token, oauth_token), cache_dir=cache)
        )
        with checkpoint:
            report = preview_lora(
                checkpoint, embeddings=embeddings, device=DEVICE, **_cut(mode, rank, energy)
            )
    text = (
        f"The adapter would keep **{100 * report['kept']:.1f}%** of ‖R‖² and weigh about "
        f"**{_size(report['adapter_bytes'])}** (the full residuals: {_size(report['residual_bytes'])}). "
        "Nothing was written yet: **Export** writes it."
    )
    return text, pd.DataFrame(report["layers"], columns=["layer", "kept"])


@spaces.GPU(duration=_gpu_seconds)
@ui_errors
def export_smaller(
    source: str,
    path: str,
    mode: str,
    rank: float,
    energy: float,
    embeddings: bool,
    token: str | None,
    workspace: dict[str, Any],
    progress: gr.Progress = gr.Progress(),  # noqa: B008
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request | None = None,
):
    """The LoRA adapter into the session's folder, zipped for download (it is small), ready to push."""
    target = _residuals_source(source, path, workspace)
    _ensure_folders(workspace, request)
    with heavy_job(workspace, progress, "exporting") as (cache, report):
        result = export_lora(
            target,
            _job_output(workspace, "lora"),
            embeddings=embeddings,
            token=_token(token, oauth_token),
            cache_dir=cache,
            device=DEVICE,
            progress=report,
            **_cut(mode, rank, energy),
        )
        kept = _keep(workspace, "lora", result.path)
        archive, download = _zip(kept, workspace)
    summary = result.summary
    ranks = sorted({m["rank"] for m in summary["matrices"]})
    text = (
        f"### LoRA adapter ready\n{len(summary['matrices'])} matrices, ranks {ranks[0]}–{ranks[-1]}, "
        f"‖R − R̂‖/‖R‖ = {summary['relative_error']:.3f} over them; {_size(summary['adapter_bytes'])} "
        f"(the full residuals: {_size(summary['residual_bytes'])}). Load it with peft on your CPT'd base: "
        "`PeftModel.from_pretrained(model, ...)`." + download
    )
    return text, archive, workspace


# ---- Try ----------------------------------------------------------------------------------------------
TRY_MEMORY_BYTES = float(os.environ.get("STUDIO_TRY_MEMORY_GB", "8")) * 1e9  # the Try tab's models, together
TRY_SESSIONS = int(os.environ.get("STUDIO_TRY_SESSIONS", "1"))  # sessions whose models stay loaded at once
_TRY_MODELS: collections.OrderedDict[str, dict[str, tuple]] = collections.OrderedDict()
_TRY_LOCK = threading.Lock()
SCORE_QUESTIONS = 30


def _try_paths(cpt_base, merged, instruct, workspace, token) -> list[str]:
    """The three models' local folders (Hub ids downloaded), refused with the numbers beyond the memory budget."""
    models = [
        _model(cpt_base, "CPT'd base", workspace),
        _model(merged, "merged model", workspace),
        _model(instruct, "instruct model", workspace),
    ]
    dtype = generation_dtype(DEVICE)
    needed = 0
    for model in dict.fromkeys(models):  # headers only: the size in memory before anything is loaded
        with (
            scratch_cache() as cache,
            operations.open_model(
                model, role="model", options=Options(token=token, cache_dir=cache)
            ) as checkpoint,
        ):
            needed += sum(t.numel for t in checkpoint.tensors.values()) * dtype.itemsize
    if needed > TRY_MEMORY_BYTES:
        raise gr.Error(
            f"These models need {_size(needed)} of memory together in {str(dtype).removeprefix('torch.')}, more than "
            f"the {_size(TRY_MEMORY_BYTES)} this Space gives the Try tab. Compare smaller models here, or run the app "
            "on your own machine (scripts/serve.sh)."
        )
    # downloads for generation go to the session's own cache, removed with the session
    cache = Path(_ensure_folders(workspace, None)["dir"]) / "try-cache"
    return [operations.resolve_for_generation(m, token=token, cache_dir=cache) for m in models]


def _session_models(key: str, paths: list[str]) -> list[tuple]:
    """One set of models per session, loaded once; the oldest session's set goes when another needs room."""
    with _TRY_LOCK:
        loaded = _TRY_MODELS.pop(key, {})
        _TRY_MODELS[key] = loaded
        for path in [p for p in loaded if p not in paths]:
            del loaded[path]
        while len(_TRY_MODELS) > TRY_SESSIONS:
            _TRY_MODELS.popitem(last=False)
    for path in paths:
        if path not in loaded:
            loaded[path] = load_causal_lm(path, device=DEVICE)
    return [loaded[p] for p in paths]


def _free_session_models(key: str) -> None:
    with _TRY_LOCK:
        _TRY_MODELS.pop(key, None)


@spaces.GPU(duration=60)
def _generate_side_by_side(models: list[tuple], prompts: list[str], raw: bool) -> list[list[str]]:
    """The only GPU lease of the Try tab: generation alone, models already loaded, downloads done."""
    if raw:  # the demo family's own question format, the end marker kept so that stopping can be scored
        return [demo_generate(model, tokenizer, prompts) for model, tokenizer in models]
    return [
        [
            complete(model, tokenizer, p, max_new_tokens=40).strip()
            or "(empty answer: the model stopped at once)"
            for p in prompts
        ]
        for model, tokenizer in models
    ]


def _mark(formatted: bool, correct: bool) -> str:
    return f"format {'✓' if formatted else '✗'} · answer {'✓' if correct else '✗'}"


@ui_errors
def try_models(
    text: str,
    cpt_base: str,
    instruct: str,
    workspace: dict[str, Any],
    progress=gr.Progress(),  # noqa: B008
    merged: str = SESSION_MERGED,
    token: str | None = None,
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request | None = None,
):
    """The three models on one prompt; the merged one is this session's, or the one named — never a stand-in.

    A question of the demo family is asked in its own format and scored: the expected answer is
    shown and each reply marked for format and value.
    """
    if not text.strip():
        raise gr.Error("Type a prompt (or pick an example) first.")
    read_token = _token(token, oauth_token)
    _ensure_folders(workspace, request)
    progress(0.05, desc="fetching the models")
    paths = _try_paths(cpt_base, merged, instruct, workspace, read_token)
    progress(0.3, desc="loading the models")
    models = _session_models(getattr(request, "session_hash", None) or "local", paths)
    world = World.load(DEMO_FAMILY) if (DEMO_FAMILY / "world.json").is_file() else None
    question = question_of(world, text) if world else None
    progress(0.6, desc="generating")
    replies = [r[0] for r in _generate_side_by_side(models, [text], raw=question is not None)]
    if question is None:
        return (*replies, "Not a demo-family question: no expected answer to compare with.", workspace)
    shown = [r.split(EOS)[0].strip() or "(empty answer)" for r in replies]
    marks = [_mark(*score_reply(r, world, *question)) for r in replies]
    verdict = f"**Expected:** {html.escape(expected_reply(world, *question))}\n\n" + "\n".join(
        f"- {label}: {mark}" for label, mark in zip(TRY_LABELS, marks, strict=True)
    )
    return (*shown, verdict, workspace)


TRY_LABELS = ("CPT'd base", "Merged", "Instruct")


@ui_errors
def score_questions(
    cpt_base: str,
    instruct: str,
    workspace: dict[str, Any],
    merged: str = SESSION_MERGED,
    token: str | None = None,
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request | None = None,
):
    """Ask the three models SCORE_QUESTIONS world-B questions; the table fills in as answers come."""
    if not (DEMO_FAMILY / "world.json").is_file():
        raise gr.Error("The demo family is not installed here, so there are no questions to score.")
    world = World.load(DEMO_FAMILY)
    _ensure_folders(workspace, request)
    paths = _try_paths(cpt_base, merged, instruct, workspace, _token(token, oauth_token))
    models = _session_models(getattr(request, "session_hash", None) or "local", paths)
    items = world.questions(world.world_b, SCORE_QUESTIONS, seed=0)
    scores = [[0, 0] for _ in models]
    for done, (name, attribute, style) in enumerate(items, start=1):
        replies = [
            r[0] for r in _generate_side_by_side(models, [demo_prompt(name, attribute, style)], raw=True)
        ]
        for tally, reply in zip(scores, replies, strict=True):
            formatted, correct = score_reply(reply, world, name, attribute, style)
            tally[0] += formatted
            tally[1] += correct
        yield pd.DataFrame(
            [
                {"model": label, "questions": done, "format %": 100 * f / done, "exact %": 100 * c / done}
                for label, (f, c) in zip(TRY_LABELS, scores, strict=True)
            ]
        ).round(1)


def example_prompts() -> list[str]:
    if not (DEMO_FAMILY / "world.json").is_file():
        return []
    world = World.load(DEMO_FAMILY)
    attributes = list(QUESTIONS)
    return [
        demo_prompt(name, attributes[i % len(attributes)], ("word", "sentence")[i % 2])
        for i, name in enumerate(world.world_b[:6])
    ]


# ---- Push -------------------------------------------------------------------------------------------------
def _push(kind: str, repo_name: str, private: bool, token_field: str | None, workspace, oauth_token) -> str:
    folder = workspace.get(kind)
    if not folder:
        raise gr.Error(f"Nothing to push yet: {NEXT_STEP[kind]} first.")
    if folder.startswith(HUB_PREFIX):
        url = f"{hub_constants.ENDPOINT}/{folder.removeprefix(HUB_PREFIX)}"
        return f"✅ Already on the Hub: it was written straight into [{url}]({url})."
    token = _write_token(token_field, oauth_token)
    url = operations.push_to_hub(folder, _repo_name_given(repo_name), private=private, token=token)
    return f"✅ Pushed to [{url}]({url})" + (" (private)" if private else "")


def _write_token(token_field: str | None, oauth_token: gr.OAuthToken | None) -> str:
    """The token a push is made with: the visitor's own login (locally also a pasted or the machine's token)."""
    token = None
    if oauth_token is not None and oauth_token.token != MOCK_OAUTH:
        token = oauth_token.token  # the logged-in visitor's own token
    elif oauth_token is not None and not ON_SPACE:
        token = get_token()  # locally, gradio mocks the login with this machine's token
    if not ON_SPACE:
        token = (token_field or "").strip() or token  # on a Space there is no token field
    if token is None:
        raise gr.Error(
            "You are not logged in: click 'Sign in with Hugging Face' above"
            + (
                ""
                if ON_SPACE
                else ", or (running locally) paste a write token in the token field or set HF_TOKEN"
            )
            + ". Nothing was pushed."
        )
    return token


def _repo_name_given(repo_name: str | None) -> str:
    name = (repo_name or "").strip()
    if not name:
        raise gr.Error("Give the repository a name.")
    return name


def _direct_push(
    direct: bool, repo_name: str, private: bool, token: str | None, oauth_token: gr.OAuthToken | None
) -> tuple[tuple[str, bool] | None, str | bool | None]:
    """(push_to repo and private, token) for a job: written straight into the visitor's repo with their
    write login, or (None, the read token) for the session's folder."""
    if direct:
        return (_repo_name_given(repo_name), private), _write_token(token, oauth_token)
    return None, _token(token, oauth_token)


def _streamed(result, workspace: dict[str, Any], kind: str) -> str:
    """A result written straight into a Hub repo: the session's result is that repo; nothing is kept here."""
    from huggingface_hub import RepoUrl

    workspace[kind] = HUB_PREFIX + RepoUrl(result.url).repo_id
    return f"\n\nStreamed straight into [{result.url}]({result.url}): nothing of it was kept on this Space."


NEXT_STEP = {"residuals": "compute residuals", "merged": "apply or merge", "lora": "export an adapter"}


@ui_errors
def push_lora(repo_name, private, token_field, workspace, oauth_token: gr.OAuthToken | None):
    return _push("lora", repo_name, private, token_field, workspace, oauth_token)


@ui_errors
def push_residuals(repo_name, private, token_field, workspace, oauth_token: gr.OAuthToken | None):
    return _push("residuals", repo_name, private, token_field, workspace, oauth_token)


@ui_errors
def push_merged(repo_name, private, token_field, workspace, oauth_token: gr.OAuthToken | None):
    return _push("merged", repo_name, private, token_field, workspace, oauth_token)


# ---- layout -----------------------------------------------------------------------------------------------
def push_box(label: str):
    with gr.Group():
        gr.Markdown(f"#### Push {label} to your Hub namespace")
        with gr.Row():
            repo = gr.Textbox(label="Repository name", value="", placeholder="my-model-residuals", scale=3)
            private = gr.Checkbox(label="Private", value=True, scale=1)
        button = gr.Button(f"Push {label}")
        status = gr.Markdown()
    return repo, private, button, status


# What signing in lets the Space do, feature by feature (the scopes in README.md's hf_oauth_scopes).
PERMISSIONS = (
    "Signing in asks for: **read your repos** and **gated repos** (to read your private models and the "
    "gated ones you accepted, such as Llama), **write** and **manage repos** (to create your result's repo "
    "and push to it), and **run Jobs** (for *Run as a Job*, billed to your account). A login lasts 8 hours: "
    "a Job that would outlast it is refused until you sign in again."
)


def build() -> gr.Blocks:
    with gr.Blocks(title="Residuals Studio") as demo:
        workspace = gr.State(new_workspace, delete_callback=drop_workspace)
        jobs_seen = gr.BrowserState([], storage_key="residuals-studio-jobs")  # job ids only, never a token
        gr.Markdown(INTRO)
        with gr.Row():
            if ON_SPACE or get_token():
                gr.LoginButton()
                gr.Markdown(PERMISSIONS)
            else:
                gr.Markdown(
                    "Running locally without a Hub token: everything works offline; to push, paste a write "
                    "token in the field below or start the app with `HF_TOKEN` set."
                )
            if ON_SPACE:  # a visitor's reads and pushes use their own login; nothing typed, nothing stored
                token = gr.State(None)
            else:
                token = gr.Textbox(
                    label="Access token (optional: gated/private models, or pushing when running locally)",
                    type="password",
                    placeholder="hf_…",
                )

        with gr.Tab("Compute"):
            with gr.Row():
                base = gr.Textbox(
                    label=f"Base model ({FIELD_HINT})", value=POLICY.demo_name("base-v1"), min_width=WIDE
                )
                instruct = gr.Textbox(
                    label=f"Instruct model ({FIELD_HINT})",
                    value=POLICY.demo_name("instruct-v1"),
                    min_width=WIDE,
                )
            with gr.Column():
                dtype = gr.Dropdown(
                    ["float32", "bfloat16", "float16"],
                    value="float32",
                    label="Storage dtype",
                    min_width=WIDE,
                    info="float32 reconstructs exactly; bf16/fp16 halve the size",
                )
                normalize = gr.Checkbox(
                    value=True, label="normalize_embeddings (zero-pad differing vocabularies)", min_width=WIDE
                )
            with gr.Row():
                check_button = gr.Button("Check compatibility")
                compute_button = gr.Button("Compute residuals", variant="primary")
            res_direct = gr.Checkbox(
                value=False,
                label="Write the result straight into my Hub repo (named below) instead of this Space's disk — "
                "for large results: nothing is kept here",
            )
            compute_cancel = gr.Button("Cancel", variant="stop", size="sm")
            compute_status = gr.Markdown("The summary of the residuals will appear here.")
            with gr.Row():
                compute_bar = gr.BarPlot(
                    x="layer", y="norm", title="‖R‖ per layer", x_title="layer", y_title="‖R‖"
                )
                compute_heat = gr.Plot(label="module × layer")
            compute_zip = gr.File(label="Download the residuals folder (zip)")
            res_repo, res_private, res_push, res_status = push_box("residuals")

        with gr.Tab("Apply"):
            gr.Markdown("Add α·R to a target model — typically your continued-pre-trained base.")
            source = gr.Radio([FROM_SESSION, f"named ({FIELD_HINT})"], value=FROM_SESSION, label="Residuals")
            residuals_path = gr.Textbox(label=f"Residuals ({FIELD_HINT})", placeholder="org/residuals")
            target = gr.Textbox(label="Target model (your CPT'd base)", value=POLICY.demo_name("base-v2"))
            with gr.Row():
                scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Scale α", min_width=WIDE)
                out_dtype = gr.Dropdown(
                    ["same as target", "float32", "bfloat16", "float16"],
                    value="same as target",
                    label="Output dtype",
                    min_width=WIDE,
                )
            apply_button = gr.Button("Apply residuals", variant="primary")
            with gr.Accordion("…or merge three models in one pass (no residuals written)", open=False):
                with gr.Row():
                    m_base = gr.Textbox(label="Base", value=POLICY.demo_name("base-v1"), min_width=WIDE)
                    m_inst = gr.Textbox(
                        label="Instruct", value=POLICY.demo_name("instruct-v1"), min_width=WIDE
                    )
                    m_target = gr.Textbox(
                        label="Target (CPT'd base)", value=POLICY.demo_name("base-v2"), min_width=WIDE
                    )
                with gr.Accordion(
                    "Too big for this Space? Run the merge as a Job on your account", open=False
                ):
                    gr.Markdown(
                        "The same merge on Hugging Face hardware billed to your account; the result is pushed to "
                        "the repo named under *Push merged model* below. Your login travels as the job's secret."
                    )
                    j_flavor = gr.Dropdown(JOB_FLAVORS, value="cpu-upgrade", label="Hardware")
                    with gr.Row():
                        j_run = gr.Button("Run as a Job on my account")
                        j_follow = gr.Button("Follow my job")
                    j_status = gr.Markdown("The job's link and stage will appear here.")
                    j_logs = gr.Textbox(label="Job logs", lines=8, max_lines=20)
                gr.Examples(
                    [list(example) for example in CROSS_VERSION_EXAMPLES],
                    inputs=[m_base, m_inst, m_target],
                    label="Real cross-version pairs (residuals of one version onto the other's base; "
                    "Llama needs a login with access to the gated models)",
                )
                merge_button = gr.Button("One-pass merge")
            m_direct = gr.Checkbox(
                value=False,
                label="Write the result straight into my Hub repo (named below) instead of this Space's disk — "
                "for large results: nothing is kept here",
            )
            apply_cancel = gr.Button("Cancel", variant="stop", size="sm")
            apply_status = gr.Markdown("The summary of the merged model will appear here.")
            apply_zip = gr.File(label="Download the merged model (zip)")
            m_repo, m_private, m_push, m_status = push_box("merged model")

        with gr.Tab("Inspect"):
            i_source = gr.Radio(
                [FROM_SESSION, f"named ({FIELD_HINT})"], value=FROM_SESSION, label="Residuals"
            )
            i_path = gr.Textbox(label=f"Residuals ({FIELD_HINT})")
            i_compare = gr.Textbox(
                label="Compare with another residual set (optional: e.g. another version of the family)"
            )
            inspect_button = gr.Button("Inspect", variant="primary")
            inspect_status = gr.Markdown(
                "The residuals' lineage and norms will appear here; the plots below fill in.",
                elem_id="inspect-status",
            )
            with gr.Row():
                inspect_bar = gr.BarPlot(
                    x="layer", y="norm", title="‖R‖ per layer", x_title="layer", y_title="‖R‖"
                )
                inspect_rel = gr.BarPlot(
                    x="layer",
                    y="relative",
                    title="‖R‖ / ‖θ_base‖ per layer",
                    x_title="layer",
                    y_title="relative",
                )
            inspect_heat = gr.Plot(label="module × layer")
            inspect_table = gr.Dataframe(label="Largest tensors", interactive=False)
            inspect_cos = gr.BarPlot(
                x="layer",
                y="cosine",
                title="Per-layer cosine similarity of the two residual sets",
                y_lim=[-1, 1],
            )
            with gr.Accordion("Export smaller: a LoRA adapter of these residuals", open=False):
                gr.Markdown(
                    "The truncated SVD of each projection's residual (and of the embedding and output head), "
                    "in PEFT's format. **Preview** shows what a rank keeps, per layer, before anything is written."
                )
                with gr.Row():
                    x_mode = gr.Radio(["rank", "energy"], value="rank", label="Cut by", min_width=WIDE)
                    x_rank = gr.Slider(1, 64, value=8, step=1, label="Rank", min_width=WIDE)
                    x_energy = gr.Slider(
                        0.5, 0.99, value=0.9, step=0.01, label="Energy kept per matrix", min_width=WIDE
                    )
                x_embeddings = gr.Checkbox(value=True, label="Adapt the embedding and output head too")
                with gr.Row():
                    x_preview = gr.Button("Preview")
                    x_export = gr.Button("Export", variant="primary")
                x_status = gr.Markdown("What the adapter keeps and weighs will appear here.")
                x_bar = gr.BarPlot(
                    x="layer", y="kept", title="Share of ‖R‖² kept per layer", x_title="layer", y_title="kept",
                    y_lim=[0, 1],
                )  # fmt: skip
                x_zip = gr.File(label="Download the adapter (zip)")
                x_repo, x_private, x_push, x_pstatus = push_box("LoRA adapter")

        with gr.Tab("Try"):
            gr.Markdown(
                "One prompt, three models: the CPT'd base (new knowledge, no instruction following), the merged model "
                "(CPT'd base + residuals) and the old instruct model (follows instructions, lacks the new knowledge)."
            )
            with gr.Row():
                t_base = gr.Textbox(label="CPT'd base", value=POLICY.demo_name("base-v2"), min_width=WIDE)
                t_merged = gr.Textbox(label="Merged model", value=SESSION_MERGED, min_width=WIDE)
                t_inst = gr.Textbox(
                    label="Instruct model", value=POLICY.demo_name("instruct-v1"), min_width=WIDE
                )
            examples = example_prompts()
            t_prompt = gr.Textbox(label="Prompt", value=examples[0] if examples else "", lines=2)
            if examples:
                gr.Examples(examples, inputs=t_prompt, label="Questions about the new domain (world B)")
            try_button = gr.Button("Generate side by side", variant="primary")
            with gr.Row():
                out_base = gr.Textbox(label="CPT'd base", lines=4, placeholder="its answer will appear here")
                out_merged = gr.Textbox(
                    label="Merged (CPT'd base + residuals)",
                    lines=4,
                    placeholder="its answer will appear here",
                )
                out_inst = gr.Textbox(
                    label="Instruct model", lines=4, placeholder="its answer will appear here"
                )
            verdict = gr.Markdown(
                "For a question about the demo family, the expected answer and a ✓/✗ per model will appear here.",
                elem_id="try-verdict",
            )
            score_button = gr.Button(f"Score {SCORE_QUESTIONS} questions")
            score_table = gr.Dataframe(
                headers=["model", "questions", "format %", "exact %"],
                label=f"Format and exact answers on {SCORE_QUESTIONS} world-B questions (fills in live)",
                interactive=False,
                elem_id="score-table",
            )

        heavy = {"concurrency_limit": HEAVY_JOBS, "concurrency_id": "heavy"}
        # every action has a stable api_name: the README shows them with gradio_client
        check_button.click(
            check_models,
            [base, instruct, dtype, normalize, token, workspace],
            compute_status,
            api_name="check",
        )
        compute_event = compute_button.click(
            compute,
            [base, instruct, dtype, normalize, token, workspace, res_direct, res_repo, res_private],
            [compute_status, compute_bar, compute_heat, compute_zip, workspace, res_repo],
            api_name="compute",
            **heavy,
        )
        apply_event = apply_button.click(
            apply,
            [source, residuals_path, target, scale, out_dtype, token, workspace, m_direct, m_repo, m_private],
            [apply_status, apply_zip, workspace, m_repo],
            api_name="apply",
            **heavy,
        )
        merge_event = merge_button.click(
            merge,
            [m_base, m_inst, m_target, scale, out_dtype, token, workspace, m_direct, m_repo, m_private],
            [apply_status, apply_zip, workspace, m_repo],
            api_name="merge",
            **heavy,
        )
        inspect_button.click(
            inspect,
            [i_source, i_path, i_compare, token, workspace],
            [inspect_status, inspect_bar, inspect_rel, inspect_heat, inspect_table, inspect_cos],
            api_name="inspect",
        )
        try_button.click(
            try_models,
            [t_prompt, t_base, t_inst, workspace, t_merged, token],
            [out_base, out_merged, out_inst, verdict, workspace],
            api_name="try_models",
            **heavy,
        )
        score_button.click(
            score_questions,
            [t_base, t_inst, workspace, t_merged, token],
            score_table,
            api_name="score_questions",
            **heavy,
        )
        res_push.click(
            push_residuals, [res_repo, res_private, token, workspace], res_status, api_name="push_residuals"
        )
        m_push.click(push_merged, [m_repo, m_private, token, workspace], m_status, api_name="push_merged")
        compute_cancel.click(
            cancel_job, [workspace], compute_status, cancels=[compute_event], api_name="cancel"
        )
        apply_cancel.click(
            cancel_job, [workspace], apply_status, cancels=[apply_event, merge_event], api_name=False
        )
        x_inputs = [i_source, i_path, x_mode, x_rank, x_energy, x_embeddings, token, workspace]
        x_preview.click(preview_export, x_inputs, [x_status, x_bar], api_name="preview_export", **heavy)
        x_export.click(
            export_smaller, x_inputs, [x_status, x_zip, workspace], api_name="export_lora", **heavy
        )
        x_push.click(push_lora, [x_repo, x_private, token, workspace], x_pstatus, api_name="push_lora")
        j_run.click(
            run_as_job,
            [
                m_base,
                m_inst,
                m_target,
                scale,
                out_dtype,
                m_repo,
                m_private,
                j_flavor,
                jobs_seen,
                token,
                workspace,
            ],
            [j_status, jobs_seen],
            api_name="run_job",
        )
        j_follow.click(follow_job, [jobs_seen, token], [j_status, j_logs], api_name="follow_job")
        demo.unload(end_session)
    return demo


demo = build()

if __name__ == "__main__":
    # a bounded queue: the position is shown to each waiting visitor, and a full queue says so
    demo.queue(default_concurrency_limit=4, max_size=QUEUE_SIZE).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        run_history=False,  # the browser's run history would keep every input, tokens included
    )
