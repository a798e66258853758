"""The Try tab: one prompt to three models, and the demo family's scored questions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import spaces

from .. import present
from ..context import StudioContext
from ..hosting import SESSION_MERGED
from ..services import tryout
from .common import WIDE, login_of, session_hash, ui_errors

ask_on_device = spaces.GPU(duration=60)(tryout.ask)  # the Try tab's only GPU lease: generation alone


@dataclass
class TryTab:
    base: gr.Textbox
    merged: gr.Textbox
    instruct: gr.Textbox
    prompt: gr.Textbox
    generate: gr.Button
    replies: tuple[gr.Textbox, gr.Textbox, gr.Textbox]
    verdict: gr.Markdown
    score: gr.Button
    scores: gr.Dataframe


def build(ctx: StudioContext) -> TryTab:
    policy = ctx.policy
    gr.Markdown(
        "One prompt, three models: the CPT'd base (new knowledge, no instruction following), the merged model "
        "(CPT'd base + residuals) and the old instruct model (follows instructions, lacks the new knowledge)."
    )
    with gr.Row():
        base = gr.Textbox(label="CPT'd base", value=policy.demo_name("base-v2"), min_width=WIDE)
        merged = gr.Textbox(label="Merged model", value=SESSION_MERGED, min_width=WIDE)
        instruct = gr.Textbox(label="Instruct model", value=policy.demo_name("instruct-v1"), min_width=WIDE)
    gr.Markdown(tryout.limits_text(ctx))
    examples = tryout.example_prompts()
    prompt = gr.Textbox(label="Prompt", value=examples[0] if examples else "", lines=2)
    if examples:
        gr.Examples(examples, inputs=prompt, label="Questions about the new domain (world B)")
    generate = gr.Button("Generate side by side", variant="primary")
    with gr.Row():
        replies = (
            gr.Textbox(label="CPT'd base", lines=4, placeholder="its answer will appear here"),
            gr.Textbox(
                label="Merged (CPT'd base + residuals)", lines=4, placeholder="its answer will appear here"
            ),
            gr.Textbox(label="Instruct model", lines=4, placeholder="its answer will appear here"),
        )
    verdict = gr.Markdown(
        "For a question about the demo family, the expected answer and a ✓/✗ per model will appear here.",
        elem_id="try-verdict",
    )
    score = gr.Button(f"Score {tryout.SCORE_QUESTIONS} questions")
    scores = gr.Dataframe(
        headers=["model", "questions", "format %", "exact %"],
        label=f"Format and exact answers on {tryout.SCORE_QUESTIONS} world-B questions (fills in live)",
        interactive=False,
        elem_id="score-table",
    )
    return TryTab(base, merged, instruct, prompt, generate, replies, verdict, score, scores)


def events(ctx: StudioContext) -> dict[str, Callable]:
    errors = ui_errors(ctx.settings.on_space)
    loaded = tryout.LoadedModels(ctx)
    ctx.sessions.on_close(loaded.free)

    @errors
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
        """The three models on one prompt; the merged one is this session's, or the one named — never a stand-in."""
        tried = tryout.try_models(
            ctx, loaded, workspace, session_hash(request), text, cpt_base, merged, instruct,
            ctx.credentials.read_token(login_of(oauth_token), token), progress, ask_on_device,
        )  # fmt: skip
        replies, verdict = present.tried_outputs(tried, ctx.settings)
        return (*replies, verdict, workspace)

    @errors
    def score_questions(
        cpt_base: str,
        instruct: str,
        workspace: dict[str, Any],
        merged: str = SESSION_MERGED,
        token: str | None = None,
        oauth_token: gr.OAuthToken | None = None,
        request: gr.Request | None = None,
    ):
        """The three models on the demo family's questions; the table fills in as answers come."""
        for scores in tryout.score(
            ctx, loaded, workspace, session_hash(request), cpt_base, merged, instruct,
            ctx.credentials.read_token(login_of(oauth_token), token), ask_on_device,
        ):  # fmt: skip
            if scores.stopped is not None:
                gr.Warning(
                    f"Scoring stopped after {scores.questions} questions: the {scores.stopped:g} s it may take here ran out."
                )
                return
            yield present.scores_frame(scores)

    return {"try_models": try_models, "score_questions": score_questions}


def wire(tab: TryTab, handlers: dict[str, Callable], token, workspace, heavy: dict) -> None:
    tab.generate.click(
        handlers["try_models"], [tab.prompt, tab.base, tab.instruct, workspace, tab.merged, token],
        [*tab.replies, tab.verdict, workspace], api_name="try_models", **heavy["slot"],
    )  # fmt: skip
    tab.score.click(
        handlers["score_questions"], [tab.base, tab.instruct, workspace, tab.merged, token], tab.scores,
        api_name="score_questions", **heavy["slot"],
    )  # fmt: skip
