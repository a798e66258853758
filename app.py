"""Residuals Studio — the Gradio Space. Wires UI events to residuals_core and formats the results."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import spaces
import torch
from huggingface_hub import get_token

from residuals_core import ResidualsError, apply_residuals, compute_residuals, merge_models, operations
from residuals_core.demo import DEMO_FAMILY, QUESTIONS, World
from residuals_core.demo import prompt as demo_prompt
from residuals_core.generation import complete, load_causal_lm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEMO = {name: str(DEMO_FAMILY / name) for name in ("base-v1", "instruct-v1", "base-v2")}
ON_SPACE = bool(os.environ.get("SPACE_ID"))
HEAVY_JOBS = int(os.environ.get("STUDIO_CONCURRENCY", "1"))

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
    """Each browser session works in its own temporary folder, removed when the session ends."""
    return {"dir": tempfile.mkdtemp(prefix="studio-"), "residuals": None, "merged": None}


def drop_workspace(workspace: dict[str, Any] | None) -> None:
    if workspace:
        shutil.rmtree(workspace["dir"], ignore_errors=True)


def _fresh_dir(workspace: dict[str, Any], name: str) -> Path:
    path = Path(workspace["dir"]) / name
    shutil.rmtree(path, ignore_errors=True)
    return path


def _zip(folder: Path) -> str:
    archive = shutil.make_archive(str(folder), "zip", root_dir=folder)
    return archive


def ui_errors(fn):
    """Show ResidualsError messages (what went wrong + what to do) as gr.Error popups."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ResidualsError as exc:
            raise gr.Error(f"{exc.problem} — {exc.fix}", duration=None) from exc

    return wrapper


def _token(field: str | None) -> str | None:
    return (field or "").strip() or None


def _progress(progress: gr.Progress, label: str):
    def report(done: int, total: int, name: str) -> None:
        progress((done, max(total, 1)), desc=f"{label}: {name}", unit="tensors")

    return report


def _gpu_seconds(*args, **kwargs) -> int:
    """ZeroGPU duration from the inputs' size on disk (headers only; ≈0.5 GB/s plus start-up), 60–900 s."""
    size = 0
    for value in args:
        if not isinstance(value, str) or "/" not in value or "\n" in value:
            continue  # only model ids (org/name) and folders count
        try:
            size += operations.open_model(value.strip(), role="input").total_bytes
        except Exception:  # not a model (a dtype, a radio choice…) or unreachable: count nothing
            continue
    return int(min(900, 60 + 2 * size / 1e9))


@contextlib.contextmanager
def job_cache(workspace: dict[str, Any]):
    """A job's Hub small files (configs, tokenizers; weights stream) go inside the session folder, deleted after."""
    cache = Path(workspace["dir"]) / "hub-cache"
    try:
        yield cache
    finally:
        shutil.rmtree(cache, ignore_errors=True)


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
def check_models(base: str, instruct: str, dtype: str, normalize: bool, token: str | None) -> str:
    _require_pair(base, instruct)
    report = operations.check_compatibility(
        base.strip(), instruct.strip(), normalize_embeddings=normalize, dtype=dtype, token=_token(token)
    )
    sizes = ", ".join(f"`{k}` {_size(v)}" for k, v in report["size_on_disk"].items())
    notes = "".join(f"\n- note: {n}" for n in report["notes"])
    return (
        f"✅ **Compatible** (checked from headers, no weights downloaded)\n\n"
        f"- architecture: **{report['architecture']}**, {report['layers']} layers, "
        f"{report['parameters'] / 1e6:.2f} M parameters in {report['tensors']} tensors\n"
        f"- vocabulary: base {report['vocab_size']['base']}, instruct {report['vocab_size']['instruct']}, "
        f"tokenizer {report['tokenizer_length']}; tied embeddings: {report['tie_word_embeddings']}\n"
        f"- size on disk: {sizes}\n- residuals will take **{_size(report['expected_output_bytes'])}** ({dtype})"
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
):
    _require_pair(base, instruct)  # compute itself rejects incompatible models from headers, before work
    out = _fresh_dir(workspace, "residuals")
    with job_cache(workspace) as cache:
        result = compute_residuals(
            base.strip(),
            instruct.strip(),
            out,
            dtype=dtype,
            normalize_embeddings=normalize,
            token=_token(token),
            cache_dir=cache,
            device=DEVICE,
            progress=_progress(progress, "computing"),
        )
    workspace["residuals"] = str(result.path)
    recon = result.reconstruction or {}
    exact = (
        "base + R reproduces the instruct model **bit for bit**"
        if recon.get("exact")
        else f"{recon.get('mismatched_elements')} of {recon.get('elements')} elements differ after reconstruction "
        f"(max error {recon.get('max_abs_error', 0):.2g}) — the price of {dtype} storage"
    )
    summary = (
        f"### Residuals ready\n{len(result.tensors)} tensors, total ‖R‖ = {result.summary['total_norm']:.4g}, "
        f"‖R‖/‖θ_base‖ = {result.summary['relative'] or 0:.3g}. {exact}.\n\n"
        "Next: **Apply** them to your continued-pre-trained base, **Inspect** them, or push them to the Hub below."
    )
    name = Path(instruct.strip().rstrip("/")).name + "-residuals"
    return (
        summary,
        layer_frame(result.summary),
        module_heatmap(result.summary),
        _zip(result.path),
        workspace,
        name,
    )


# ---- Apply / merge ----------------------------------------------------------------------------------
def _residuals_source(source: str, path: str, workspace: dict[str, Any]) -> str:
    if source == "this session's Compute result":
        if not workspace.get("residuals"):
            raise gr.Error(
                "No residuals in this session yet: run the Compute tab first, or choose a Hub id / path."
            )
        return workspace["residuals"]
    if not path.strip():
        raise gr.Error("Give the residuals' Hub id or local folder.")
    return path.strip()


def _merged_summary(result, what: str) -> str:
    return (
        f"### Merged model ready\n{what}: {len(result.tensors)} tensors, ‖α·R‖ = {result.summary['total_norm']:.4g}. "
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
):
    residuals = _residuals_source(source, residuals_path, workspace)
    if not target.strip():
        raise gr.Error("Give the target model (your continued-pre-trained base): a Hub id or a local folder.")
    return _into_merged(
        workspace,
        apply_residuals,
        (residuals,),
        target,
        scale,
        dtype,
        token,
        progress,
        "applying",
        f"`{target.strip()}` + {scale:g}·R",
    )


def _into_merged(
    workspace, operation, inputs: tuple, target: str, scale, dtype, token, progress, label: str, what: str
):
    """Run apply or merge into the session's `merged` folder with a per-job Hub cache."""
    out = _fresh_dir(workspace, "merged")
    with job_cache(workspace) as cache:
        result = operation(
            *inputs,
            target.strip(),
            out,
            scale=scale,
            dtype=None if dtype == "same as target" else dtype,
            token=_token(token),
            cache_dir=cache,
            device=DEVICE,
            progress=_progress(progress, label),
        )
    workspace["merged"] = str(result.path)
    name = Path(target.strip().rstrip("/")).name + "-plus-residuals"
    return _merged_summary(result, what), _zip(result.path), workspace, name


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
):
    if not (base.strip() and instruct.strip() and target.strip()):
        raise gr.Error("Fill in base, instruct and target models for a one-pass merge.")
    return _into_merged(
        workspace,
        merge_models,
        (base.strip(), instruct.strip()),
        target,
        scale,
        dtype,
        token,
        progress,
        "merging",
        "one pass",
    )


# ---- Inspect ----------------------------------------------------------------------------------------
@ui_errors
def inspect(source: str, path: str, compare: str, token: str | None, workspace: dict[str, Any]):
    target = _residuals_source(source, path, workspace)
    report = operations.inspect_residuals(target, token=_token(token))
    relative = f", ‖R‖/‖θ_base‖ = {report['relative']:.3g}" if report.get("relative") else ""
    summary = (
        f"**{report['instruct_model']} − {report['base_model']}** ({report['dtype']}, {report['tensors']} tensors): "
        f"total ‖R‖ = {report['total_norm']:.4g}{relative}."
    )
    cosine = pd.DataFrame(columns=["layer", "cosine"])
    if compare.strip():
        rows = operations.compare_residuals(target, compare.strip(), token=_token(token))
        cosine = pd.DataFrame(rows, columns=["layer", "cosine"]).fillna(0.0)
        mean = cosine["cosine"].mean() if len(cosine) else 0.0
        summary += f"\n\nCompared with `{compare.strip()}`: mean per-layer cosine similarity **{mean:.3f}**."
    layers = layer_frame(report)
    return (
        summary,
        layers,
        layers,
        module_heatmap(report),
        largest_frame(report["largest"]),
        cosine,
    )


# ---- Try ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=6)
def _cached_model(path: str, mtime: float):
    return load_causal_lm(path, device=DEVICE)


def _generate(path: str, text: str) -> str:
    model, tokenizer = _cached_model(
        path, Path(path, "config.json").stat().st_mtime if Path(path).is_dir() else 0.0
    )
    return (
        complete(model, tokenizer, text, max_new_tokens=40).strip()
        or "(empty answer: the model stopped at once)"
    )


@spaces.GPU(duration=60)
@ui_errors
def try_models(text: str, cpt_base: str, instruct: str, workspace: dict[str, Any], progress=gr.Progress()):  # noqa: B008
    if not text.strip():
        raise gr.Error("Type a prompt (or pick an example) first.")
    merged = workspace.get("merged")
    if not merged:
        progress(0.1, desc="no merged model yet: merging the demo family")
        merged = str(
            merge_models(
                DEMO["base-v1"], DEMO["instruct-v1"], DEMO["base-v2"], _fresh_dir(workspace, "merged")
            ).path
        )
        workspace["merged"] = merged
    outputs = []
    for index, path in enumerate((cpt_base.strip(), merged, instruct.strip())):
        progress((index, 3), desc="generating")
        outputs.append(_generate(operations.resolve_for_generation(path), text))
    return (*outputs, workspace)


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
        raise gr.Error(
            f"Nothing to push yet: {'compute residuals' if kind == 'residuals' else 'apply or merge'} first."
        )
    token = None
    if oauth_token is not None and oauth_token.token != "mock-oauth-token-for-local-dev":
        token = oauth_token.token  # the logged-in user's token on the Space
    elif oauth_token is not None:
        token = get_token()  # locally, gradio mocks the login with this machine's token
    token = _token(token_field) or token
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
    name = repo_name.strip()
    if not name:
        raise gr.Error("Give the repository a name.")
    url = operations.push_to_hub(folder, name, private=private, token=token)
    return f"✅ Pushed to [{url}]({url})" + (" (private)" if private else "")


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
            repo = gr.Textbox(label="Repository name", placeholder="my-model-residuals", scale=3)
            private = gr.Checkbox(label="Private", value=True, scale=1)
        button = gr.Button(f"Push {label}")
        status = gr.Markdown()
    return repo, private, button, status


def build() -> gr.Blocks:
    with gr.Blocks(title="Residuals Studio") as demo:
        workspace = gr.State(new_workspace, delete_callback=drop_workspace)
        gr.Markdown(INTRO)
        with gr.Row():
            if ON_SPACE or get_token():
                gr.LoginButton()
            else:
                gr.Markdown(
                    "Running locally without a Hub token: everything works offline; to push, paste a write "
                    "token in the field below or start the app with `HF_TOKEN` set."
                )
            token = gr.Textbox(
                label="Access token (optional: gated/private models, or pushing when running locally)",
                type="password",
                placeholder="hf_…",
            )

        with gr.Tab("Compute"):
            with gr.Row():
                base = gr.Textbox(label="Base model (Hub id or local folder)", value=DEMO["base-v1"])
                instruct = gr.Textbox(
                    label="Instruct model (Hub id or local folder)", value=DEMO["instruct-v1"]
                )
            with gr.Row():
                dtype = gr.Dropdown(
                    ["float32", "bfloat16", "float16"],
                    value="float32",
                    label="Storage dtype",
                    info="float32 reconstructs exactly; bf16/fp16 halve the size",
                )
                normalize = gr.Checkbox(
                    value=True, label="normalize_embeddings (zero-pad differing vocabularies)"
                )
            with gr.Row():
                check_button = gr.Button("Check compatibility")
                compute_button = gr.Button("Compute residuals", variant="primary")
            compute_status = gr.Markdown()
            with gr.Row():
                compute_bar = gr.BarPlot(
                    x="layer", y="norm", title="‖R‖ per layer", x_title="layer", y_title="‖R‖"
                )
                compute_heat = gr.Plot(label="module × layer")
            compute_zip = gr.File(label="Download the residuals folder (zip)")
            res_repo, res_private, res_push, res_status = push_box("residuals")

        with gr.Tab("Apply"):
            gr.Markdown("Add α·R to a target model — typically your continued-pre-trained base.")
            source = gr.Radio(
                ["this session's Compute result", "Hub id or local folder"],
                value="this session's Compute result",
                label="Residuals",
            )
            residuals_path = gr.Textbox(
                label="Residuals (Hub id or local folder)", placeholder="org/residuals"
            )
            target = gr.Textbox(label="Target model (your CPT'd base)", value=DEMO["base-v2"])
            with gr.Row():
                scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Scale α")
                out_dtype = gr.Dropdown(
                    ["same as target", "float32", "bfloat16", "float16"],
                    value="same as target",
                    label="Output dtype",
                )
            apply_button = gr.Button("Apply residuals", variant="primary")
            with gr.Accordion("…or merge three models in one pass (no residuals written)", open=False):
                with gr.Row():
                    m_base = gr.Textbox(label="Base", value=DEMO["base-v1"])
                    m_inst = gr.Textbox(label="Instruct", value=DEMO["instruct-v1"])
                    m_target = gr.Textbox(label="Target (CPT'd base)", value=DEMO["base-v2"])
                merge_button = gr.Button("One-pass merge")
            apply_status = gr.Markdown()
            apply_zip = gr.File(label="Download the merged model (zip)")
            m_repo, m_private, m_push, m_status = push_box("merged model")

        with gr.Tab("Inspect"):
            i_source = gr.Radio(
                ["this session's Compute result", "Hub id or local folder"],
                value="this session's Compute result",
                label="Residuals",
            )
            i_path = gr.Textbox(label="Residuals (Hub id or local folder)")
            i_compare = gr.Textbox(
                label="Compare with another residual set (optional: e.g. another version of the family)"
            )
            inspect_button = gr.Button("Inspect", variant="primary")
            inspect_status = gr.Markdown(elem_id="inspect-status")
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

        with gr.Tab("Try"):
            gr.Markdown(
                "One prompt, three models: the CPT'd base (new knowledge, no instruction following), the merged model "
                "(CPT'd base + residuals) and the old instruct model (follows instructions, lacks the new knowledge)."
            )
            with gr.Row():
                t_base = gr.Textbox(label="CPT'd base", value=DEMO["base-v2"])
                t_inst = gr.Textbox(label="Instruct model", value=DEMO["instruct-v1"])
            examples = example_prompts()
            t_prompt = gr.Textbox(label="Prompt", value=examples[0] if examples else "", lines=2)
            if examples:
                gr.Examples(examples, inputs=t_prompt, label="Questions about the new domain (world B)")
            try_button = gr.Button("Generate side by side", variant="primary")
            with gr.Row():
                out_base = gr.Textbox(label="CPT'd base", lines=4)
                out_merged = gr.Textbox(label="Merged (CPT'd base + residuals)", lines=4)
                out_inst = gr.Textbox(label="Instruct model", lines=4)

        heavy = {"concurrency_limit": HEAVY_JOBS, "concurrency_id": "heavy"}
        check_button.click(check_models, [base, instruct, dtype, normalize, token], compute_status)
        compute_button.click(
            compute,
            [base, instruct, dtype, normalize, token, workspace],
            [compute_status, compute_bar, compute_heat, compute_zip, workspace, res_repo],
            **heavy,
        )
        apply_button.click(
            apply,
            [source, residuals_path, target, scale, out_dtype, token, workspace],
            [apply_status, apply_zip, workspace, m_repo],
            **heavy,
        )
        merge_button.click(
            merge,
            [m_base, m_inst, m_target, scale, out_dtype, token, workspace],
            [apply_status, apply_zip, workspace, m_repo],
            **heavy,
        )
        inspect_button.click(
            inspect,
            [i_source, i_path, i_compare, token, workspace],
            [inspect_status, inspect_bar, inspect_rel, inspect_heat, inspect_table, inspect_cos],
        )
        try_button.click(
            try_models,
            [t_prompt, t_base, t_inst, workspace],
            [out_base, out_merged, out_inst, workspace],
            **heavy,
        )
        res_push.click(push_residuals, [res_repo, res_private, token, workspace], res_status)
        m_push.click(push_merged, [m_repo, m_private, token, workspace], m_status)
    return demo


demo = build()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=4).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
