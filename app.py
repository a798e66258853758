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
import time
import uuid
from inspect import isgeneratorfunction
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import spaces
import torch
from huggingface_hub import RepoUrl, get_token
from huggingface_hub import constants as hub_constants

from residuals_core import (
    ResidualsError,
    apply_residuals,
    compute_residuals,
    export_lora,
    merge_models,
    operations,
)
from residuals_core.card import code_span, markdown_text
from residuals_core.demo import (
    DEMO_FAMILY,
    DEMO_PREFIX,
    EOS,
    QUESTIONS,
    World,
    expected_reply,
    question_of,
    score_reply,
)
from residuals_core.demo import generate as demo_generate
from residuals_core.demo import prompt as demo_prompt
from residuals_core.errors import Cancelled
from residuals_core.generation import complete, generation_dtype, load_causal_lm, prompt_length
from residuals_core.hosting import (
    SESSION_MERGED,
    SESSION_RESIDUALS,
    InputPolicy,
    JobEstimate,
    estimate_job,
    refuse_if_too_long,
    visitor_fix,
    visitor_token,
)
from residuals_core.hub import HUB_PREFIX, writable_repo_id
from residuals_core.lora import preview_lora, svd_work
from residuals_core.options import Options
from studio.session import Session, SessionRegistry
from studio.settings import Settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = Settings.from_environment(os.environ)
ON_SPACE = SETTINGS.on_space
LIMITS = SETTINGS.limits
POLICY = InputPolicy(on_space=ON_SPACE)
# Every folder made for a visitor lives under these two roots, owned by the registry (see studio.session).
SESSIONS = SessionRegistry(
    Path(tempfile.gettempdir()) / "residuals-studio",
    Path(gr.utils.get_upload_folder()) / "studio-downloads",  # served by Gradio without a copy
    idle_seconds=SETTINGS.session_idle_seconds,
)
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
    """What the page keeps per session: its key in the registry and where its results are.

    The folders themselves belong to `SESSIONS`, so no change to this state can orphan one.
    """
    return {"session": None, "residuals": None, "merged": None, "lora": None, "job": None}


def _session_key(workspace: dict[str, Any], request: gr.Request | None) -> str:
    """The session's key: Gradio's session hash, or one of its own for a call made without a page."""
    key = getattr(request, "session_hash", None) or workspace.get("session") or f"direct-{uuid.uuid4().hex}"
    workspace["session"] = key
    return key


def _session(workspace: dict[str, Any], request: gr.Request | None) -> Session:
    """The session's folders (made on its first job); refused when the session has already ended."""
    return SESSIONS.session(_session_key(workspace, request))


def _check_open(workspace: dict[str, Any] | None, request: gr.Request | None) -> None:
    """A call that waited in the queue while its tab closed is refused, not run."""
    SESSIONS.check_open(_session_key(workspace if workspace is not None else {}, request))


def drop_workspace(workspace: dict[str, Any] | None) -> None:
    """Gradio forgets a session's state (an hour after its tab closed): the session ends if it has not."""
    if workspace and workspace.get("session"):
        SESSIONS.close(workspace["session"])


def end_session(request: gr.Request) -> None:
    """The tab closed: its running job is cancelled, its queued calls refused, its files removed."""
    SESSIONS.close(request.session_hash)


def _results(workspace: dict[str, Any]) -> dict[str, str | None]:
    return {SESSION_RESIDUALS: workspace.get("residuals"), SESSION_MERGED: workspace.get("merged")}


def _model(text: str | None, role: str, workspace: dict[str, Any]) -> str:
    """What a model field names, by the host's rules (on a Space: Hub ids, demo models, session results)."""
    return POLICY.resolve(text, role=role, session=_results(workspace))


def _keep(workspace: dict[str, Any], session: Session, kind: str, written: Path) -> Path:
    """The new result replaces the session's previous one of its kind."""
    final = session.keep(kind, written)
    workspace[kind] = str(final)
    return final


def _zip(folder: Path, session: Session, kind: str) -> tuple[str | None, str]:
    """The result as one zip in the session's downloads, or none when it is too large to serve."""
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > SETTINGS.max_zip_bytes:
        return None, (
            f"\n\nThe result is {_size(size)}, more than this Space zips ({_size(SETTINGS.max_zip_bytes)}): push it "
            "to your Hub account below to get it out."
        )
    archive = session.zip(folder, kind)
    return str(archive), f"\n\nDownload: a {_size(archive.stat().st_size)} zip below."


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


def _options(token: str | bool | None, cache_dir: str | Path | None, **more: Any) -> Options:
    """How this Space reads models for a visitor: their token, a cache of the job's own, capped small files."""
    return Options(
        token=token, cache_dir=cache_dir, max_small_file_bytes=SETTINGS.max_small_file_bytes, **more
    )


def _check_scale(scale: Any) -> float:
    """α as the slider allows it: typed or sent values outside (0, 2] are refused, not clamped."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise gr.Error(
            f"α must be a number between 0 and 2 (such as 1.0), not {html.escape(repr(scale))}."
        ) from None
    if value == 0:
        raise gr.Error(
            "α = 0 adds nothing: the result would be the target model itself. Choose α > 0 (1.0 adds the residuals once)."
        )
    if not 0 < value <= 2:
        raise gr.Error(
            f"α = {value:g} is outside the range this Space applies (0 < α ≤ 2). Choose a value in it."
        )
    return value


OVERRUN = 1.5  # a job running this many times the host's time limit is stopped, whatever its estimate said


@contextlib.contextmanager
def heavy_job(session: Session, progress: gr.Progress, label: str, estimate: JobEstimate):
    """One heavy job per session, stoppable by Cancel (or the session's end), with a Hub cache of its own.

    Yields (cache folder, progress callback). The callback maps the engine's tensors onto 0–90 % and
    raises once Cancel was pressed, or once the job has run OVERRUN times the host's limit (an estimate
    is only an estimate: a slow link must not hold the slot for hours), so the engine stops and its
    sinks remove what they wrote.
    """
    started, limit = time.monotonic(), LIMITS.max_seconds * OVERRUN

    def report(done: int, total: int, name: str) -> None:
        session.raise_if_cancelled()
        if time.monotonic() - started > limit:
            raise Cancelled(
                f"The job was stopped after {_minutes(limit)}: jobs here may take {_minutes(LIMITS.max_seconds)} "
                f"(it was estimated at {_minutes(estimate.seconds)}; the Hub was slower than that today).",
                "Nothing it wrote was kept. Try again later, choose smaller models, or run it on your own machine.",
            )
        progress(0.9 * done / max(total, 1), desc=f"{label}: {done}/{total} tensors")

    try:
        with session.job("This session is already running a job.") as cache:
            yield cache, report
    finally:
        SESSIONS.job_ended(session.key)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def preflight(
    models: list[tuple[str, str]],
    token: str | bool | None,
    dtype: str | None,
    *,
    writes: bool = True,
    svd_embeddings: bool | None = None,
    kind: str = "other",
) -> JobEstimate:
    """What a job will read and write and about how long it takes, from headers; refused when too long.

    `models` are (model, role) with the output's shape taken from the last one (the target, or the
    instruct model for compute); `dtype` is the output's, None for the target's own. `writes=False`
    for a job that only reads (Inspect, Preview); `svd_embeddings` (True/False) for one that also
    factorises the matrices of a LoRA export, with or without the embeddings; `kind` "merge" for
    an apply or merge (too long here, it can run as a Job).
    """
    with scratch_cache() as cache:
        opened = operations.open_models(models, _options(token, cache))
    try:
        shape_from = opened[-1]
        if not writes:
            write = 0
        elif dtype is None:
            write = shape_from.total_bytes
        else:
            itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            write = sum(
                t.numel * (itemsize if t.dtype.is_floating_point else t.dtype.itemsize)
                for t in shape_from.tensors.values()
            )
        work = svd_work(shape_from.tensors, embeddings=svd_embeddings) if svd_embeddings is not None else 0.0
        reads = [(c.total_bytes + c.small_file_bytes, c.remote) for c in opened]
        estimate = estimate_job(reads, write, LIMITS, svd_work=work)
    finally:
        for checkpoint in opened:
            checkpoint.close()
    refuse_if_too_long(estimate, LIMITS, kind=kind)
    return estimate


@contextlib.contextmanager
def scratch_cache():
    """A Hub cache for one look at models (their small files), removed after it: a shared cache would
    grow with every stranger's models and keep them for everyone."""
    with tempfile.TemporaryDirectory(prefix="studio-look-") as folder:
        yield folder


def _job_hint(estimate: JobEstimate) -> str:
    """Beyond what this Space should take on (STUDIO_JOB_OFFER_MINUTES), the way out for a merge: a Job."""
    if estimate.seconds <= SETTINGS.job_offer_seconds:
        return ""
    return (
        f"\n- ⏱ that is more than {SETTINGS.job_offer_seconds / 60:.0f} min: the **one-pass merge** of these "
        "residuals onto your CPT'd base can run as a Job on your account (Apply tab, *Run as a Job on my "
        "account*), which needs no residuals written here."
    )


@ui_errors
def cancel_job(workspace: dict[str, Any], request: gr.Request | None = None) -> str:
    """Ask the session's running job to stop: it does so at its next tensor and removes what it wrote."""
    if not _session(workspace, request).cancel():
        return "No job is running in this session."
    return "Cancelling: the job stops at its next tensor and removes what it wrote."


def _gpu_seconds(*args, **kwargs) -> int:
    """ZeroGPU duration from the inputs' size on disk (headers only; ≈0.5 GB/s plus start-up), 60–900 s.

    The fields are read by the same rules and with the same token as the job itself.
    """
    values = [*args, *kwargs.values()]
    workspace = next((v for v in values if isinstance(v, dict) and "session" in v), {})
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
                    _model(value, "input", workspace), role="input", options=_options(token, cache)
                ) as checkpoint,
            ):
                size += checkpoint.total_bytes
        except Exception:  # not a model (a dtype, a radio choice…), refused or unreachable: count nothing
            continue
    return int(min(900, 60 + 2 * size / 1e9))


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes:.0f} B"
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
    request: gr.Request | None = None,
) -> str:
    _require_pair(base, instruct)
    workspace = workspace if workspace is not None else new_workspace()
    _check_open(workspace, request)
    fields = {"base": base.strip(), "instruct": instruct.strip()}
    base_model, instruct_model = (
        _model(base, "base model", workspace),
        _model(instruct, "instruct model", workspace),
    )
    with scratch_cache() as cache:
        opened = operations.open_models(
            [(base_model, "base"), (instruct_model, "instruct")], _options(_token(token, oauth_token), cache)
        )
        try:
            report = operations.check_compatibility(
                opened[0], opened[1], normalize_embeddings=normalize, dtype=dtype
            )
            sizes = {role: c.total_bytes for role, c in zip(fields, opened, strict=True)}
            small = {role: c.small_file_bytes for role, c in zip(fields, opened, strict=True)}
        finally:
            for checkpoint in opened:
                checkpoint.close()
    # the estimate from the headers just read, not from a second opening of the same models
    inputs = [(sizes[role] + small[role], model.startswith(HUB_PREFIX)) for role, model in
              (("base", base_model), ("instruct", instruct_model))]  # fmt: skip
    estimate = estimate_job(inputs, report["expected_output_bytes"], LIMITS)
    refuse_if_too_long(estimate, LIMITS)
    size_text = ", ".join(f"{role} {code_span(fields[role])} {_size(sizes[role])}" for role in fields)
    small_text = (
        f" (plus {_size(sum(small.values()))} of config and tokenizer files)" if any(small.values()) else ""
    )
    notes = "".join(f"\n- note: {markdown_text(n)}" for n in report["notes"])
    return (
        f"✅ **Compatible** (checked from headers, no weights downloaded)\n\n"
        f"- architecture: {code_span(report['architecture'])}, {report['layers']} layers, "
        f"{report['parameters'] / 1e6:.2f} M parameters in {report['tensors']} tensors\n"
        f"- vocabulary: base {report['vocab_size']['base']}, instruct {report['vocab_size']['instruct']}, "
        f"tokenizer {report['tokenizer_length']}; tied embeddings: {report['tie_word_embeddings']}\n"
        f"- size on disk: {size_text}{small_text}\n"
        f"- residuals will take **{_size(report['expected_output_bytes'])}** ({dtype})\n"
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
    _check_open(workspace, request)
    base_model, instruct_model = (
        _model(base, "base model", workspace),
        _model(instruct, "instruct model", workspace),
    )
    push, read_token = _direct_push(direct, repo_name, private, token, oauth_token)
    estimate = preflight([(base_model, "base"), (instruct_model, "instruct")], read_token, dtype)
    session = _session(workspace, request)
    with heavy_job(session, progress, "computing", estimate) as (cache, report):
        result = compute_residuals(
            base_model,
            instruct_model,
            None if push else session.output("residuals"),
            push_to=push[0] if push else None,
            private=private,
            dtype=dtype,
            normalize_embeddings=normalize,
            options=_options(read_token, cache, device=DEVICE, progress=report),
        )
        if push:
            archive, download = None, _streamed(result, workspace, "residuals")
        else:
            kept = _keep(workspace, session, "residuals", result.path)
            progress(0.92, desc="zipping the residuals for download")
            archive, download = _zip(kept, session, "residuals")
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
        f"{code_span(target.strip())} + {scale:g}·R",
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
    _check_open(workspace, request)
    target_model = _model(target, "target model", workspace)
    roles = ["residuals"] if operation is apply_residuals else ["base", "instruct"]
    out_dtype = None if dtype == "same as target" else dtype
    models = [*zip(inputs, roles, strict=True), (target_model, "target")]
    estimate = preflight(models, token, out_dtype, kind="merge")
    session = _session(workspace, request)
    with heavy_job(session, progress, label, estimate) as (cache, report):
        result = operation(
            *inputs,
            target_model,
            None if push else session.output("merged"),
            push_to=push[0] if push else None,
            private=push[1] if push else False,
            scale=scale,
            dtype=out_dtype,
            options=_options(token, cache, device=DEVICE, progress=report),
        )
        if push:
            archive, download = None, _streamed(result, workspace, "merged")
        else:
            kept = _keep(workspace, session, "merged", result.path)
            progress(0.92, desc="zipping the merged model for download")
            archive, download = _zip(kept, session, "merged")
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
    progress: gr.Progress = gr.Progress(),  # noqa: B008
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request | None = None,
):
    """Norms computed from the residuals' weights (streamed: estimated and bounded like any job);
    what the repo only states about itself is said to be its claim."""
    _check_open(workspace, request)
    target = _residuals_source(source, path, workspace)
    other = _model(compare, "comparison residuals", workspace) if compare.strip() else None
    read_token = _token(token, oauth_token)
    looked_at = [(target, "residuals"), *([(other, "comparison residuals")] if other else [])]
    estimate = preflight(looked_at, read_token, None, writes=False)
    session = _session(workspace, request)
    with heavy_job(session, progress, "inspecting", estimate) as (cache, report):
        options = _options(read_token, cache, progress=report)
        result = operations.inspect_residuals(target, options=options)
        rows = operations.compare_residuals(target, other, options=options) if other else None
    relative = f", ‖R‖/‖θ_base‖ = {result['relative']:.3g}" if result.get("relative") else ""
    summary = (
        f"**{result['tensors']} tensors** ({code_span(result['dtype'])}): total ‖R‖ = "
        f"{result['total_norm']:.4g}{relative}, computed from the weights (the job {estimate.describe()}).\n\n"
        f"Lineage as the repo's config states it: {code_span(result['instruct_model'])} − "
        f"{code_span(result['base_model'])}.\n\n{_claims_text(result['claims'], result['tensors'])}"
    )
    cosine = pd.DataFrame(columns=["layer", "cosine"])
    if rows is not None:
        cosine = pd.DataFrame(rows, columns=["layer", "cosine"]).fillna(0.0)
        mean = cosine["cosine"].mean() if len(cosine) else 0.0
        summary += f"\n\nCompared with {code_span(compare.strip())}: mean per-layer cosine similarity **{mean:.3f}**."
    layers = layer_frame(result)
    return (
        summary,
        layers,
        layers,
        module_heatmap(result),
        largest_frame(result["largest"]),
        cosine,
    )


def _claims_text(claims: dict[str, int], tensors: int) -> str:
    """What the repo's manifest claimed about its norms, against what its weights gave."""
    if not claims["claimed"]:
        return "The repo records no per-tensor norms; ‖R‖/‖θ_base‖ needs them, so it is not shown."
    if not claims["mismatched"] and claims["claimed"] == tensors:
        return "The norms its manifest records match the weights."
    return (
        f"⚠ Its manifest claims norms for {claims['claimed']} tensors; {claims['mismatched']} of them do not match "
        f"the weights ({tensors} tensors): every number here is computed, and the manifest's ‖θ_base‖ is used only "
        "where its ‖R‖ matched."
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
    """A model as a job's command line names it: `hf://org/name` (so that a folder of the same name in
    the job's image is never read instead) or `demo:NAME` (the image has the demo family) — no path
    of this Space; a result only this Space's disk holds is refused."""
    model = _model(text, role, workspace)
    if model.startswith(HUB_PREFIX):
        return model
    if text.strip().startswith(DEMO_PREFIX):
        return text.strip()
    if not ON_SPACE:
        return model  # running locally: a folder of this machine, as the command line takes it
    raise gr.Error(
        f"The {role} is a result on this Space's disk, which a Job cannot read: push it first, "
        "or write it straight into your Hub repo."
    )


def _job_repo(repo_name: str, token: str) -> str:
    """The full id of the repo a job pushes to, checked before submission: a valid name in a namespace
    the visitor can write (a name like '--help' would only fail later, in their account)."""
    from huggingface_hub import HfApi

    return writable_repo_id(HfApi(token=token), _repo_name_given(repo_name))


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
    request: gr.Request | None = None,
):
    """Submit the one-pass merge as a Hugging Face Job under the visitor's account; the job id is kept in
    the browser (not the token), so the page can follow it after a reload, and in the session."""
    from residuals_core import jobs

    workspace = workspace if workspace is not None else new_workspace()
    _check_open(workspace, request)
    write_token = _write_token(token, oauth_token)  # refused here, before anything is submitted
    scale = _check_scale(scale)
    if flavor not in JOB_FLAVORS:
        raise gr.Error(f"Choose the job's hardware among {', '.join(JOB_FLAVORS)}.")
    if oauth_token is not None and "jobs" not in (oauth_token.scope or "jobs").split():
        raise gr.Error(
            "Your login did not grant this Space the right to run Jobs: log out and in again, "
            "allowing 'Run Jobs' when Hugging Face asks."
        )
    argv = ["merge", "--base", _job_model(base, "base model", workspace),
            "--instruct", _job_model(instruct, "instruct model", workspace),
            "--target", _job_model(target, "target model", workspace),
            "--scale", f"{scale:g}"]  # fmt: skip
    repo = _job_repo(repo_name, write_token)
    argv += ["--push-to", repo, "--quiet"]
    if dtype != "same as target":
        argv += ["--dtype", dtype]
    if private:
        argv.append("--private")
    info = jobs.run_job(
        argv,
        token=write_token,
        image=_job_image(),
        flavor=flavor,
        token_expires_at=getattr(oauth_token, "expires_at", None) or None,  # 0: a token given through the API
    )
    owner = jobs.parse_job_ref(info.url)[0] or repo.split("/")[0]
    submitted = {"id": info.id, "owner": owner, "repo": repo}
    workspace["job"] = submitted  # for this session (and API clients, which keep no browser state)
    return (
        f"Job {_job_link(owner, info.id)} submitted on your account: it {info.plan.describe()}. "
        f"It pushes to {_repo_link(repo)}. **Follow my job** shows its logs.",
        [*(jobs_seen or []), submitted],
        workspace,
    )


def _job_link(owner: str, job_id: str) -> str:
    return f"[{code_span(job_id)}]({hub_constants.ENDPOINT}/jobs/{owner}/{job_id})"


def _repo_link(repo: str) -> str:
    return f"[{code_span(repo)}]({hub_constants.ENDPOINT}/{repo})"


def _followed(jobs_seen: list | None, workspace: dict[str, Any]) -> tuple[str, str, str]:
    """(owner, job id, repo) of the latest job this session or browser submitted; the browser's copy
    is checked, since any client can send anything there."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    job = workspace.get("job") or (jobs_seen[-1] if isinstance(jobs_seen, list) and jobs_seen else None)
    if job is None:
        raise gr.Error("No job was submitted from this browser yet.")
    job = job if isinstance(job, dict) else {}
    owner, job_id, repo = (str(job.get(key, "")) for key in ("owner", "id", "repo"))
    try:
        validate_repo_id(repo)
        validate_repo_id(owner)
        valid = job_id.isalnum() and "/" in repo
    except HFValidationError:
        valid = False
    if not valid:
        raise gr.Error("This browser's record of its jobs is damaged: submit the job again.")
    return owner, job_id, repo


@ui_errors
def follow_job(
    jobs_seen: list | None = None,
    token: str | None = None,
    workspace: dict[str, Any] | None = None,
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request | None = None,
):
    """The latest job's stage and logs, live until it ends; then the pushed repo's link."""
    from residuals_core import jobs

    workspace = workspace if workspace is not None else new_workspace()
    _check_open(workspace, request)
    owner, job_id, repo = _followed(jobs_seen, workspace)
    write_token = _write_token(token, oauth_token)
    ref, link = f"{owner}/{job_id}", _job_link(owner, job_id)
    lines: list[str] = []
    yield f"Job {link}: starting…", ""
    for line in jobs.job_logs(ref, token=write_token):
        lines.append(line)
        yield f"Job {link}: running", "\n".join(lines[-40:])
    final = jobs.wait_for_job(ref, token=write_token)  # the log can end before the job does
    stage = final.status.stage
    message = f" ({markdown_text(final.status.message)})" if final.status.message else ""
    done = f"Job {link}: **{markdown_text(stage)}**{message}"
    if stage == "COMPLETED":
        done += f" — the result is at {_repo_link(repo)}"
    yield done, "\n".join(lines[-40:])


# ---- Export smaller (LoRA) -------------------------------------------------------------------------------
def _cut(mode: str, rank: Any, energy: Any) -> dict[str, Any]:
    """The rank or energy cut as the sliders allow it; other values (sent through the API) are refused."""
    try:
        if mode == "rank" and 1 <= float(rank) <= 64:
            return {"rank": int(rank), "energy": None}
        if mode == "energy" and 0.5 <= float(energy) <= 0.99:
            return {"rank": None, "energy": float(energy)}
    except (TypeError, ValueError):
        pass
    raise gr.Error("Cut by 'rank' (a whole number from 1 to 64) or by 'energy' (a share from 0.5 to 0.99).")


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
    progress: gr.Progress = gr.Progress(),  # noqa: B008
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request | None = None,
):
    """Per layer, the share of ‖R‖² the adapter would keep, and its size — before anything is written."""
    _check_open(workspace, request)
    target = _residuals_source(source, path, workspace)
    read_token = _token(token, oauth_token)
    cut = _cut(mode, rank, energy)
    estimate = preflight([(target, "residuals")], read_token, None, writes=False, svd_embeddings=embeddings)
    session = _session(workspace, request)
    with heavy_job(session, progress, "previewing", estimate) as (cache, report):
        checkpoint, _ = operations.open_residuals(target, options=_options(read_token, cache))
        with checkpoint:
            result = preview_lora(checkpoint, embeddings=embeddings, device=DEVICE, progress=report, **cut)
    text = (
        f"The adapter would keep **{100 * result['kept']:.1f}%** of ‖R‖² and weigh about "
        f"**{_size(result['adapter_bytes'])}** (the full residuals: {_size(result['residual_bytes'])}). "
        f"Nothing was written yet: **Export** writes it. (The preview {estimate.describe()}.)"
    )
    return text, pd.DataFrame(result["layers"], columns=["layer", "kept"])


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
    _check_open(workspace, request)
    target = _residuals_source(source, path, workspace)
    read_token = _token(token, oauth_token)
    cut = _cut(mode, rank, energy)
    estimate = preflight([(target, "residuals")], read_token, None, writes=False, svd_embeddings=embeddings)
    session = _session(workspace, request)
    with heavy_job(session, progress, "exporting", estimate) as (cache, report):
        result = export_lora(
            target,
            session.output("lora"),
            embeddings=embeddings,
            options=_options(read_token, cache, device=DEVICE, progress=report),
            **cut,
        )
        kept = _keep(workspace, session, "lora", result.path)
        archive, download = _zip(kept, session, "lora")
    summary = result.summary
    ranks = sorted({m["rank"] for m in summary["matrices"]})
    text = (
        f"### LoRA adapter ready\n{len(summary['matrices'])} matrices, ranks {ranks[0]}–{ranks[-1]}, "
        f"‖R − R̂‖/‖R‖ = {summary['relative_error']:.3f} over them; {_size(summary['adapter_bytes'])} "
        f"(the full residuals: {_size(summary['residual_bytes'])}; the export {estimate.describe()}). Load it "
        "with peft on your CPT'd base: `PeftModel.from_pretrained(model, ...)`." + download
    )
    return text, archive, workspace


# ---- Try ----------------------------------------------------------------------------------------------
_TRY_MODELS: collections.OrderedDict[str, dict[str, tuple]] = collections.OrderedDict()
_TRY_LOCK = threading.Lock()
SCORE_QUESTIONS = 30
TRY_LABELS = ("CPT'd base", "Merged", "Instruct")
CHARS_PER_TOKEN_AT_MOST = 8  # a prompt this many times longer than the token limit is refused untokenized


def _try_paths(cpt_base, merged, instruct, workspace, session: Session, token) -> list[str]:
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
            operations.open_model(model, role="model", options=_options(token, cache)) as checkpoint,
        ):
            needed += sum(t.numel for t in checkpoint.tensors.values()) * dtype.itemsize
    if needed > SETTINGS.try_memory_bytes:
        raise gr.Error(
            f"These models need {_size(needed)} of memory together in {str(dtype).removeprefix('torch.')}, more than "
            f"the {_size(SETTINGS.try_memory_bytes)} this Space gives the Try tab. Compare smaller models here, or run "
            "the app on your own machine (scripts/serve.sh)."
        )
    # downloads for generation go to the session's own cache, removed with the session
    options = _options(token, session.folder / "try-cache")
    return [operations.resolve_for_generation(m, options=options) for m in models]


def _session_models(session: Session, paths: list[str]) -> list[tuple]:
    """One set of models per session, loaded once; the oldest session's set goes when another needs room,
    and with it the files it was loaded from."""
    with _TRY_LOCK:
        loaded = _TRY_MODELS.pop(session.key, {})
        _TRY_MODELS[session.key] = loaded
        for path in [p for p in loaded if p not in paths]:
            del loaded[path]
        while len(_TRY_MODELS) > SETTINGS.try_sessions:
            evicted, _ = _TRY_MODELS.popitem(last=False)
            owner = SESSIONS.find(evicted)
            if owner is not None:
                shutil.rmtree(owner.folder / "try-cache", ignore_errors=True)
    for path in paths:
        if path not in loaded:
            loaded[path] = load_causal_lm(path, device=DEVICE)
    return [loaded[p] for p in paths]


def _free_session_models(key: str) -> None:
    with _TRY_LOCK:
        _TRY_MODELS.pop(key, None)


SESSIONS.on_close(_free_session_models)


def _check_prompt_length(text: str) -> None:
    """A prompt far beyond the token limit is refused before any tokenizer sees it."""
    limit = SETTINGS.try_max_prompt_tokens
    if len(text) > limit * CHARS_PER_TOKEN_AT_MOST:
        raise gr.Error(
            f"The prompt has {len(text):,} characters; this Space takes prompts of at most {limit} tokens "
            "(a few hundred words). Shorten it."
        )


def _check_prompt_tokens(models: list[tuple], text: str, raw: bool) -> None:
    """The prompt in each model's own tokens (chat template included) against the Space's limit."""
    limit = SETTINGS.try_max_prompt_tokens
    longest = max(prompt_length(tokenizer, text, use_chat_template=not raw) for _, tokenizer in models)
    if longest > limit:
        raise gr.Error(
            f"The prompt is {longest} tokens long for these models; this Space takes at most {limit}. Shorten it."
        )


@spaces.GPU(duration=60)
def _generate_side_by_side(models: list[tuple], prompt: str, raw: bool, deadline: float) -> list[str | None]:
    """The only GPU lease of the Try tab: generation alone, models already loaded, downloads done.

    Each model generates at most SETTINGS.try_max_new_tokens and stops at `deadline` (time.monotonic);
    a model whose turn comes after it gets None.
    """
    replies: list[str | None] = []
    for model, tokenizer in models:
        left = deadline - time.monotonic()
        if left <= 0:
            replies.append(None)
            continue
        if raw:  # the demo family's own question format, the end marker kept so that stopping can be scored
            new_tokens = min(24, SETTINGS.try_max_new_tokens)
            replies.append(demo_generate(model, tokenizer, [prompt], new_tokens, max_time=left)[0])
        else:
            reply = complete(
                model, tokenizer, prompt, max_new_tokens=SETTINGS.try_max_new_tokens, max_time=left
            )
            replies.append(reply.strip() or "(empty answer: the model stopped at once)")
    return replies


def _mark(formatted: bool, correct: bool) -> str:
    return f"format {'✓' if formatted else '✗'} · answer {'✓' if correct else '✗'}"


TRY_LIMITS = (
    f"Prompts of up to {SETTINGS.try_max_prompt_tokens} tokens; each model answers in at most "
    f"{SETTINGS.try_max_new_tokens} new tokens, and the three together get {SETTINGS.try_max_seconds:g} s per click."
)


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
    session = _session(workspace, request)
    text = text if isinstance(text, str) else ""
    if not text.strip():
        raise gr.Error("Type a prompt (or pick an example) first.")
    _check_prompt_length(text)
    read_token = _token(token, oauth_token)
    progress(0.05, desc="fetching the models")
    paths = _try_paths(cpt_base, merged, instruct, workspace, session, read_token)
    progress(0.3, desc="loading the models")
    models = _session_models(session, paths)
    world = World.load(DEMO_FAMILY) if (DEMO_FAMILY / "world.json").is_file() else None
    question = question_of(world, text) if world else None
    _check_prompt_tokens(models, text, raw=question is not None)
    progress(0.6, desc="generating")
    deadline = time.monotonic() + SETTINGS.try_max_seconds
    replies = _generate_side_by_side(models, text, question is not None, deadline)
    out_of_time = f"(not generated: the {SETTINGS.try_max_seconds:g} s this Space gives one click ran out)"
    if question is None:
        shown = [out_of_time if r is None else r for r in replies]
        return (*shown, "Not a demo-family question: no expected answer to compare with.", workspace)
    shown = [out_of_time if r is None else r.split(EOS)[0].strip() or "(empty answer)" for r in replies]
    marks = [_mark(*score_reply(r or "", world, *question)) for r in replies]
    verdict = f"**Expected:** {markdown_text(expected_reply(world, *question))}\n\n" + "\n".join(
        f"- {label}: {mark}" for label, mark in zip(TRY_LABELS, marks, strict=True)
    )
    return (*shown, verdict, workspace)


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
    """Ask the three models SCORE_QUESTIONS world-B questions; the table fills in as answers come.

    The whole scoring gets the budget of SCORE_QUESTIONS / 10 clicks of Try; it stops, saying so, when spent.
    """
    session = _session(workspace, request)
    if not (DEMO_FAMILY / "world.json").is_file():
        raise gr.Error("The demo family is not installed here, so there are no questions to score.")
    world = World.load(DEMO_FAMILY)
    paths = _try_paths(cpt_base, merged, instruct, workspace, session, _token(token, oauth_token))
    models = _session_models(session, paths)
    items = world.questions(world.world_b, SCORE_QUESTIONS, seed=0)
    budget = SETTINGS.try_max_seconds * SCORE_QUESTIONS / 10
    deadline = time.monotonic() + budget
    scores = [[0, 0] for _ in models]
    for done, (name, attribute, style) in enumerate(items, start=1):
        replies = _generate_side_by_side(models, demo_prompt(name, attribute, style), True, deadline)
        if None in replies:
            gr.Warning(
                f"Scoring stopped after {done - 1} questions: the {budget:g} s it may take here ran out."
            )
            return
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
def _push(
    kind: str, repo_name: str, private: bool, token_field: str | None, workspace, oauth_token, request
) -> str:
    _check_open(workspace, request)
    folder = workspace.get(kind)
    if not folder:
        raise gr.Error(f"Nothing to push yet: {NEXT_STEP[kind]} first.")
    if folder.startswith(HUB_PREFIX):
        return f"✅ Already on the Hub: it was written straight into {_repo_link(folder.removeprefix(HUB_PREFIX))}."
    token = _write_token(token_field, oauth_token)
    url = operations.push_to_hub(folder, _repo_name_given(repo_name), private=private, token=token)
    return f"✅ Pushed to {_repo_link(RepoUrl(url).repo_id)}" + (" (private)" if private else "")


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
    """The repository name typed (NAME or NAMESPACE/NAME), by the Hub's own rule for ids."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = repo_name.strip() if isinstance(repo_name, str) else ""
    if not name:
        raise gr.Error("Give the repository a name.")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise gr.Error(
            f"{html.escape(name[:100])!r} is not a repository name the Hub accepts: use letters, digits, '-', '_' "
            "and '.', not starting or ending with '-' or '.' (e.g. my-model-residuals, or you/my-model-residuals)."
        ) from None
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
    repo = RepoUrl(result.url).repo_id
    workspace[kind] = HUB_PREFIX + repo
    return f"\n\nStreamed straight into {_repo_link(repo)}: nothing of it was kept on this Space."


NEXT_STEP = {"residuals": "compute residuals", "merged": "apply or merge", "lora": "export an adapter"}


def _push_event(kind: str):
    """The Push button of one kind of result (its api_name is push_<kind>)."""

    @ui_errors
    def push(
        repo_name: str,
        private: bool,
        token_field: str | None,
        workspace: dict[str, Any],
        oauth_token: gr.OAuthToken | None,
        request: gr.Request | None = None,
    ) -> str:
        return _push(kind, repo_name, private, token_field, workspace, oauth_token, request)

    push.__name__ = push.__qualname__ = f"push_{kind}"
    return push


push_lora, push_residuals, push_merged = (_push_event(kind) for kind in ("lora", "residuals", "merged"))


# ---- layout -----------------------------------------------------------------------------------------------
def refusing_non_numbers(slider: gr.Slider) -> gr.Slider:
    """The slider, refusing in words a value that is not a number (anything can be sent through the API,
    and Gradio's own check fails without a message the visitor sees). Wrapped on the instance: a
    subclass of a Gradio component makes Gradio write a .pyi stub beside this file."""
    preprocess = slider.preprocess

    def checked(payload: Any) -> float:
        if isinstance(payload, bool) or not isinstance(payload, (int, float)):
            raise gr.Error(
                f"{slider.label} must be a number from {slider.minimum:g} to {slider.maximum:g}, "
                f"not {html.escape(repr(payload)[:40])}."
            )
        return preprocess(payload)

    slider.preprocess = checked
    return slider


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
    # Gradio's own temporary files (none are expected: uploads are refused) go after the session idle time
    age = int(SETTINGS.session_idle_seconds)
    with gr.Blocks(title="Residuals Studio", delete_cache=(max(60, age // 4), age)) as demo:
        # a plain value, copied per session: a callable here would be an API route that resets the state
        workspace = gr.State(new_workspace(), delete_callback=drop_workspace)
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
                scale = refusing_non_numbers(
                    gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Scale α", min_width=WIDE)
                )
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
                    x_rank = refusing_non_numbers(
                        gr.Slider(1, 64, value=8, step=1, label="Rank", min_width=WIDE)
                    )
                    x_energy = refusing_non_numbers(
                        gr.Slider(
                            0.5, 0.99, value=0.9, step=0.01, label="Energy kept per matrix", min_width=WIDE
                        )
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
            gr.Markdown(TRY_LIMITS)
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

        # every action that reads weights waits for one of the few heavy slots, across all sessions
        heavy = {"concurrency_limit": SETTINGS.heavy_jobs, "concurrency_id": "heavy"}
        # every action has a stable api_name: the README shows them with gradio_client
        check_button.click(
            check_models,
            [base, instruct, dtype, normalize, token, workspace],
            compute_status,
            api_name="check",
            concurrency_limit=SETTINGS.check_concurrency,
            concurrency_id="look",
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
            **heavy,
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
            [j_status, jobs_seen, workspace],
            api_name="run_job",
        )
        j_follow.click(
            follow_job,
            [jobs_seen, token, workspace],
            [j_status, j_logs],
            api_name="follow_job",
            concurrency_limit=SETTINGS.check_concurrency,  # a log can stream for hours: few at once
            concurrency_id="follow",
        )
        demo.unload(end_session)
    return demo


demo = build()

if __name__ == "__main__":
    from starlette.middleware import Middleware

    from studio.http import RefuseUploads

    SESSIONS.start_sweeping(SETTINGS.sweep_seconds)
    # a bounded queue: the position is shown to each waiting visitor, and a full queue says so
    demo.queue(default_concurrency_limit=4, max_size=SETTINGS.queue_size).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        run_history=False,  # the browser's run history would keep every input, tokens included
        max_file_size="1kb",  # no field takes a file; the routes are refused outright, this is the backstop
        app_kwargs={"middleware": [Middleware(RefuseUploads)]},
    )
