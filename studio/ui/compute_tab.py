"""The Compute tab: check two models from their headers, compute their residuals, push them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import spaces

from .. import present
from ..context import StudioContext
from ..services import Push, compute, push, repo_name_given
from .common import WIDE, PushBox, gpu_seconds, login_of, push_box, session_hash, ui_errors

STRAIGHT_TO_HUB = (
    "Write the result straight into my Hub repo (named below) instead of this Space's disk — for large results: "
    "nothing is kept here"
)


@dataclass
class ComputeTab:
    base: gr.Textbox
    instruct: gr.Textbox
    dtype: gr.Dropdown
    normalize: gr.Checkbox
    check: gr.Button
    compute: gr.Button
    direct: gr.Checkbox
    cancel: gr.Button
    status: gr.Markdown
    bars: gr.BarPlot
    heatmap: gr.Plot
    download: gr.File
    push: PushBox


def build(ctx: StudioContext, field_hint: str) -> ComputeTab:
    policy = ctx.policy
    with gr.Row():
        base = gr.Textbox(
            label=f"Base model ({field_hint})", value=policy.demo_name("base-v1"), min_width=WIDE
        )
        instruct = gr.Textbox(
            label=f"Instruct model ({field_hint})", value=policy.demo_name("instruct-v1"), min_width=WIDE
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
        check = gr.Button("Check compatibility")
        run = gr.Button("Compute residuals", variant="primary")
    direct = gr.Checkbox(value=False, label=STRAIGHT_TO_HUB)
    cancel = gr.Button("Cancel", variant="stop", size="sm")
    status = gr.Markdown("The summary of the residuals will appear here.")
    with gr.Row():
        bars = gr.BarPlot(x="layer", y="norm", title="‖R‖ per layer", x_title="layer", y_title="‖R‖")
        heatmap = gr.Plot(label="module × layer")
    download = gr.File(label="Download the residuals folder (zip)")
    return ComputeTab(
        base, instruct, dtype, normalize, check, run, direct, cancel, status, bars, heatmap, download,
        push_box("residuals"),
    )  # fmt: skip


def direct_push(ctx: StudioContext, direct: bool, repo_name: str, private: bool, token, oauth_token):
    """(Push or None, token) for a job: written straight into the visitor's repo with their write login,
    or into the session's folder with the read token."""
    login = login_of(oauth_token)
    if direct:
        return Push(repo_name_given(repo_name), private), ctx.credentials.write_token(login, token)
    return None, ctx.credentials.read_token(login, token)


def push_event(ctx: StudioContext, kind: str) -> Callable:
    """The Push button of one kind of result (its api_name is push_<kind>)."""

    @ui_errors(ctx.settings.on_space)
    def pushed(
        repo_name: str,
        private: bool,
        token_field: str | None,
        workspace: dict[str, Any],
        oauth_token: gr.OAuthToken | None,
        request: gr.Request | None = None,
    ) -> str:
        done = push.push(
            ctx,
            workspace,
            session_hash(request),
            kind,
            repo_name,
            private,
            login_of(oauth_token),
            token_field,
        )
        return present.pushed_text(done)

    pushed.__name__ = pushed.__qualname__ = f"push_{kind}"
    return pushed


def events(ctx: StudioContext) -> dict[str, Callable]:
    """The tab's event functions by api_name (also what the tests call)."""
    errors = ui_errors(ctx.settings.on_space)

    @errors
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
        workspace = workspace if workspace is not None else {}
        read_token = ctx.credentials.read_token(login_of(oauth_token), token)
        checked = compute.check(
            ctx, workspace, session_hash(request), base, instruct, dtype, normalize, read_token
        )
        return present.checked_text(checked, dtype, ctx.settings)

    @spaces.GPU(duration=gpu_seconds(ctx))
    @errors
    def compute_residuals(
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
        compute.require_pair(base, instruct)
        push_to, read_token = direct_push(ctx, direct, repo_name, private, token, oauth_token)
        done = compute.compute(
            ctx,
            workspace,
            session_hash(request),
            base,
            instruct,
            dtype,
            normalize,
            read_token,
            progress,
            push_to,
        )
        archive = str(done.delivery.archive) if done.delivery.archive else None
        summary = done.result.summary
        return (
            present.computed_text(done, dtype, ctx.settings),
            present.layer_frame(summary),
            present.module_heatmap(summary),
            archive,
            workspace,
            done.repo_name,
        )

    @errors
    def cancel_job(workspace: dict[str, Any], request: gr.Request | None = None) -> str:
        """Ask the session's running job to stop: it does so at its next tensor and removes what it wrote."""
        if not ctx.session(workspace, session_hash(request)).cancel():
            return "No job is running in this session."
        return "Cancelling: the job stops at its next tensor and removes what it wrote."

    return {
        "check": check_models,
        "compute": compute_residuals,
        "cancel": cancel_job,
        "push_residuals": push_event(ctx, "residuals"),
    }


def wire(tab: ComputeTab, handlers: dict[str, Callable], token, workspace, heavy: dict) -> None:
    check_limits = {"concurrency_limit": heavy["check_concurrency"], "concurrency_id": "look"}
    tab.check.click(
        handlers["check"], [tab.base, tab.instruct, tab.dtype, tab.normalize, token, workspace], tab.status,
        api_name="check", **check_limits,
    )  # fmt: skip
    computing = tab.compute.click(
        handlers["compute"],
        [
            tab.base,
            tab.instruct,
            tab.dtype,
            tab.normalize,
            token,
            workspace,
            tab.direct,
            tab.push.repo,
            tab.push.private,
        ],
        [tab.status, tab.bars, tab.heatmap, tab.download, workspace, tab.push.repo],
        api_name="compute",
        **heavy["slot"],
    )
    tab.cancel.click(handlers["cancel"], [workspace], tab.status, cancels=[computing], api_name="cancel")
    tab.push.button.click(
        handlers["push_residuals"], [tab.push.repo, tab.push.private, token, workspace], tab.push.status,
        api_name="push_residuals",
    )  # fmt: skip
