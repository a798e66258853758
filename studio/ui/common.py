"""What every tab shares: errors as sentences, the visitor's login, sliders that refuse non-numbers,
the push box, and the ZeroGPU lease's length."""

from __future__ import annotations

import functools
import html
from collections.abc import Callable
from dataclasses import dataclass
from inspect import isgeneratorfunction
from typing import Any

import gradio as gr

from residuals_core import operations
from residuals_core.errors import ResidualsError

from ..auth import Login
from ..context import StudioContext, Workspace, scratch_cache
from ..hosting import visitor_fix

WIDE = 300  # min width of side-by-side fields: on a phone (390 px) they stack instead of clipping


def ui_errors(on_space: bool) -> Callable:
    """Show ResidualsError messages (what went wrong + what to do) as gr.Error popups, escaped; on a
    Space the fix is said the way a visitor can act on it."""

    def shown(exc: ResidualsError) -> gr.Error:  # a field's text reaches the message as text, never as HTML
        fix = visitor_fix(exc.fix) if on_space else exc.fix
        return gr.Error(html.escape(f"{exc.problem} — {fix}"), duration=None)

    def decorate(fn):
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

    return decorate


def login_of(oauth_token: gr.OAuthToken | None) -> Login | None:
    """The visitor's sign-in, without Gradio's types (the expiry is 0 for a token given through the API)."""
    if oauth_token is None:
        return None
    return Login(oauth_token.token, oauth_token.scope, getattr(oauth_token, "expires_at", None) or None)


def session_hash(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def refusing_non_numbers(slider: gr.Slider) -> gr.Slider:
    """The slider, refusing in words a value that is not a number (anything can be sent through the API,
    and Gradio's own check fails without a message the visitor sees). Wrapped on the instance: a
    subclass of a Gradio component makes Gradio write a .pyi stub beside its file."""
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


@dataclass
class PushBox:
    repo: gr.Textbox
    private: gr.Checkbox
    button: gr.Button
    status: gr.Markdown


def push_box(label: str) -> PushBox:
    with gr.Group():
        gr.Markdown(f"#### Push {label} to your Hub namespace")
        with gr.Row():
            repo = gr.Textbox(label="Repository name", value="", placeholder="my-model-residuals", scale=3)
            private = gr.Checkbox(label="Private", value=True, scale=1)
        button = gr.Button(f"Push {label}")
        status = gr.Markdown()
    return PushBox(repo, private, button, status)


def gpu_seconds(ctx: StudioContext) -> Callable[..., int]:
    """ZeroGPU lease from the inputs' size on disk (headers only; ≈0.5 GB/s plus start-up), 60–900 s,
    the fields read by the same rules and with the same token as the job itself."""

    def seconds(*args, **kwargs) -> int:
        values = [*args, *kwargs.values()]
        workspace: Workspace = next((v for v in values if isinstance(v, dict) and "session" in v), {})
        oauth = next((v for v in values if isinstance(v, gr.OAuthToken)), None)
        token = ctx.credentials.read_token(login_of(oauth))
        size = 0
        for value in values:
            if not isinstance(value, str) or ("/" not in value and ":" not in value) or "\n" in value:
                continue  # only model ids (org/name), demo names and folders count
            try:
                with (
                    scratch_cache() as cache,
                    operations.open_model(
                        ctx.model(value, "input", workspace), role="input", options=ctx.options(token, cache)
                    ) as checkpoint,
                ):
                    size += checkpoint.total_bytes
            except Exception:  # not a model (a dtype, a radio choice…), refused or unreachable: count nothing
                continue
        return int(min(900, 60 + 2 * size / 1e9))

    return seconds
