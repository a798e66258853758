"""The Inspect tab: norms per layer and module, a comparison, and Export smaller (a LoRA adapter)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd
import spaces

from .. import present
from ..context import StudioContext
from ..services import FROM_SESSION, lora
from ..services import inspect as inspection
from .common import (
    WIDE,
    PushBox,
    gpu_seconds,
    login_of,
    push_box,
    refusing_non_numbers,
    session_hash,
    ui_errors,
)
from .compute_tab import push_event


@dataclass
class InspectTab:
    source: gr.Radio
    path: gr.Textbox
    compare: gr.Textbox
    inspect: gr.Button
    status: gr.Markdown
    bars: gr.BarPlot
    relative: gr.BarPlot
    heatmap: gr.Plot
    largest: gr.Dataframe
    cosine: gr.BarPlot
    mode: gr.Radio
    rank: gr.Slider
    energy: gr.Slider
    embeddings: gr.Checkbox
    preview: gr.Button
    export: gr.Button
    export_status: gr.Markdown
    kept: gr.BarPlot
    download: gr.File
    push: PushBox


def build(field_hint: str) -> InspectTab:
    source = gr.Radio([FROM_SESSION, f"named ({field_hint})"], value=FROM_SESSION, label="Residuals")
    path = gr.Textbox(label=f"Residuals ({field_hint})")
    compare = gr.Textbox(
        label="Compare with another residual set (optional: e.g. another version of the family)"
    )
    run = gr.Button("Inspect", variant="primary")
    status = gr.Markdown(
        "The residuals' lineage and norms will appear here; the plots below fill in.",
        elem_id="inspect-status",
    )
    with gr.Row():
        bars = gr.BarPlot(x="layer", y="norm", title="‖R‖ per layer", x_title="layer", y_title="‖R‖")
        relative = gr.BarPlot(
            x="layer", y="relative", title="‖R‖ / ‖θ_base‖ per layer", x_title="layer", y_title="relative"
        )
    heatmap = gr.Plot(label="module × layer")
    largest = gr.Dataframe(label="Largest tensors", interactive=False)
    cosine = gr.BarPlot(
        x="layer", y="cosine", title="Per-layer cosine similarity of the two residual sets", y_lim=[-1, 1]
    )
    with gr.Accordion("Export smaller: a LoRA adapter of these residuals", open=False):
        gr.Markdown(
            "The truncated SVD of each projection's residual (and of the embedding and output head), "
            "in PEFT's format. **Preview** shows what a rank keeps, per layer, before anything is written."
        )
        with gr.Row():
            mode = gr.Radio(["rank", "energy"], value="rank", label="Cut by", min_width=WIDE)
            rank = refusing_non_numbers(
                gr.Slider(1, lora.MAX_RANK, value=8, step=1, label="Rank", min_width=WIDE)
            )
            energy = refusing_non_numbers(
                gr.Slider(
                    *lora.ENERGY_RANGE, value=0.9, step=0.01, label="Energy kept per matrix", min_width=WIDE
                )
            )
        embeddings = gr.Checkbox(value=True, label="Adapt the embedding and output head too")
        with gr.Row():
            preview = gr.Button("Preview")
            export = gr.Button("Export", variant="primary")
        export_status = gr.Markdown("What the adapter keeps and weighs will appear here.")
        kept = gr.BarPlot(
            x="layer",
            y="kept",
            title="Share of ‖R‖² kept per layer",
            x_title="layer",
            y_title="kept",
            y_lim=[0, 1],
        )
        download = gr.File(label="Download the adapter (zip)")
        push = push_box("LoRA adapter")
    return InspectTab(
        source, path, compare, run, status, bars, relative, heatmap, largest, cosine, mode, rank, energy, embeddings,
        preview, export, export_status, kept, download, push,
    )  # fmt: skip


def events(ctx: StudioContext) -> dict[str, Callable]:
    errors = ui_errors(ctx.settings.on_space)

    @errors
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
        """Norms computed from the residuals' weights; what the repo only states is said to be its claim."""
        read_token = ctx.credentials.read_token(login_of(oauth_token), token)
        done = inspection.inspect(
            ctx, workspace, session_hash(request), source, path, compare, read_token, progress
        )
        layers = present.layer_frame(done.report)
        return (
            present.inspected_text(done, compare),
            layers,
            layers,
            present.module_heatmap(done.report),
            present.largest_frame(done.report["largest"]),
            present.cosine_frame(done.cosine),
        )

    @errors
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
        read_token = ctx.credentials.read_token(login_of(oauth_token), token)
        asked = lora.LoraRequest(source, path, mode, rank, energy, embeddings)
        done = lora.preview(ctx, workspace, session_hash(request), asked, read_token, progress)
        return present.previewed_text(done), pd.DataFrame(done.report["layers"], columns=["layer", "kept"])

    @spaces.GPU(duration=gpu_seconds(ctx))
    @errors
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
        read_token = ctx.credentials.read_token(login_of(oauth_token), token)
        asked = lora.LoraRequest(source, path, mode, rank, energy, embeddings)
        done = lora.export(ctx, workspace, session_hash(request), asked, read_token, progress)
        archive = str(done.delivery.archive) if done.delivery.archive else None
        return present.exported_text(done, ctx.settings), archive, workspace

    return {
        "inspect": inspect,
        "preview_export": preview_export,
        "export_lora": export_smaller,
        "push_lora": push_event(ctx, "lora"),
    }


def wire(tab: InspectTab, handlers: dict[str, Callable], token, workspace, heavy: dict) -> None:
    tab.inspect.click(
        handlers["inspect"], [tab.source, tab.path, tab.compare, token, workspace],
        [tab.status, tab.bars, tab.relative, tab.heatmap, tab.largest, tab.cosine], api_name="inspect", **heavy["slot"],
    )  # fmt: skip
    inputs = [tab.source, tab.path, tab.mode, tab.rank, tab.energy, tab.embeddings, token, workspace]
    tab.preview.click(
        handlers["preview_export"],
        inputs,
        [tab.export_status, tab.kept],
        api_name="preview_export",
        **heavy["slot"],
    )
    tab.export.click(
        handlers["export_lora"], inputs, [tab.export_status, tab.download, workspace], api_name="export_lora",
        **heavy["slot"],
    )  # fmt: skip
    tab.push.button.click(
        handlers["push_lora"], [tab.push.repo, tab.push.private, token, workspace], tab.push.status,
        api_name="push_lora",
    )  # fmt: skip
