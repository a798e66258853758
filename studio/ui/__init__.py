"""The Space's page: one file per tab (layout, event functions, wiring), put together here.

`build(settings)` makes the page and its context; `launch(app)` serves it with the host's rules
(a bounded queue, no uploads, the session sweep). Nothing is built at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from huggingface_hub import get_token

from ..context import StudioContext, new_workspace
from ..settings import Settings
from . import apply_tab, compute_tab, inspect_tab, try_tab

INTRO = """# Residuals Studio
**Instruction residuals** R = θ_instruct − θ_base (Jindal et al. 2024; task arithmetic, Ilharco et al. 2022).
Continue pre-training a *base* model on your domain, then add R to get instruction following back — no
instruction tuning. Everything streams one tensor at a time, so 8B models fit in a few hundred MB of RAM.

**1. Compute** residuals of an instruct model over its base → **2. Apply** them to your continued-pre-trained
base (or merge three models in one pass) → **3. Inspect** per-layer norms → **4. Try** the models side by side →
push the result to your own Hub account. The fields start with a tiny bundled demo family: just click.
"""
# What signing in lets the Space do, feature by feature (the scopes in README.md's hf_oauth_scopes).
PERMISSIONS = (
    "Signing in asks for: **read your repos** and **gated repos** (to read your private models and the "
    "gated ones you accepted, such as Llama), **write** and **manage repos** (to create your result's repo "
    "and push to it), and **run Jobs** (for *Run as a Job*, billed to your account). A login lasts 8 hours: "
    "a Job that would outlast it is refused until you sign in again."
)


@dataclass
class StudioApp:
    demo: gr.Blocks
    ctx: StudioContext
    handlers: dict  # api_name -> the event function


def build(settings: Settings, *, device: str | None = None) -> StudioApp:
    """The page for these settings, with the context its events run in."""
    import torch

    ctx = StudioContext.create(
        settings,
        downloads_root=Path(gr.utils.get_upload_folder())
        / "studio-downloads",  # served by Gradio without a copy
        machine_token=None if settings.on_space else get_token(),
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    handlers = {
        **compute_tab.events(ctx),
        **apply_tab.events(ctx),
        **inspect_tab.events(ctx),
        **try_tab.events(ctx),
    }
    hint = "Hub id or demo model" if settings.on_space else "Hub id, local folder or demo model"
    heavy = {
        # every action that reads weights waits for one of the few heavy slots, across all sessions
        "slot": {"concurrency_limit": settings.heavy_jobs, "concurrency_id": "heavy"},
        "check_concurrency": settings.check_concurrency,
    }

    def end_session(request: gr.Request) -> None:
        """The tab closed: its running job is cancelled, its queued calls refused, its files removed."""
        ctx.sessions.close(request.session_hash)

    def forget_state(workspace: dict | None) -> None:
        """Gradio forgets a session's state (an hour after its tab closed): the session ends if it has not."""
        if workspace and workspace.get("session"):
            ctx.sessions.close(workspace["session"])

    # Gradio's own temporary files (none are expected: uploads are refused) go after the session idle time
    age = int(settings.session_idle_seconds)
    with gr.Blocks(title="Residuals Studio", delete_cache=(max(60, age // 4), age)) as demo:
        # a plain value, copied per session: a callable here would be an API route that resets the state
        workspace = gr.State(new_workspace(), delete_callback=forget_state)
        jobs_seen = gr.BrowserState([], storage_key="residuals-studio-jobs")  # job ids only, never a token
        gr.Markdown(INTRO)
        with gr.Row():
            if settings.on_space or ctx.credentials.machine_token:
                gr.LoginButton()
                gr.Markdown(PERMISSIONS)
            else:
                gr.Markdown(
                    "Running locally without a Hub token: everything works offline; to push, paste a write "
                    "token in the field below or start the app with `HF_TOKEN` set."
                )
            if (
                settings.on_space
            ):  # a visitor's reads and pushes use their own login; nothing typed, nothing stored
                token = gr.State(None)
            else:
                token = gr.Textbox(
                    label="Access token (optional: gated/private models, or pushing when running locally)",
                    type="password",
                    placeholder="hf_…",
                )
        with gr.Tab("Compute"):
            compute = compute_tab.build(ctx, hint)
        with gr.Tab("Apply"):
            apply = apply_tab.build(ctx, hint)
        with gr.Tab("Inspect"):
            inspect = inspect_tab.build(hint)
        with gr.Tab("Try"):
            tried = try_tab.build(ctx)
        # every action has a stable api_name: the README shows them with gradio_client
        compute_tab.wire(compute, handlers, token, workspace, heavy)
        apply_tab.wire(apply, handlers, handlers["cancel"], token, workspace, jobs_seen, heavy)
        inspect_tab.wire(inspect, handlers, token, workspace, heavy)
        try_tab.wire(tried, handlers, token, workspace, heavy)
        demo.unload(end_session)
    return StudioApp(demo, ctx, handlers)


def launch(app: StudioApp, *, server_name: str, server_port: int) -> None:
    """Serve the page as a shared host must: a bounded queue, no uploads, sessions swept."""
    from starlette.middleware import Middleware

    from ..http import RefuseUploads

    settings = app.ctx.settings
    app.ctx.sessions.start_sweeping(settings.sweep_seconds)
    # a bounded queue: the position is shown to each waiting visitor, and a full queue says so
    app.demo.queue(default_concurrency_limit=4, max_size=settings.queue_size).launch(
        server_name=server_name,
        server_port=server_port,
        run_history=False,  # the browser's run history would keep every input, tokens included
        max_file_size="1kb",  # no field takes a file; the routes are refused outright, this is the backstop
        app_kwargs={"middleware": [Middleware(RefuseUploads)]},
    )
