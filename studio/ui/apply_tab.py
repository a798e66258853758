"""The Apply tab: residuals onto a target, the one-pass merge, a merge as a Job on the visitor's account."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
import spaces

from residuals_core.card import code_span

from .. import present
from ..context import StudioContext
from ..services import FROM_SESSION, jobs, merge, residuals_source
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
from .compute_tab import STRAIGHT_TO_HUB, direct_push, push_event

# (base, instruct, target): one version's instruction residuals onto another version's base, same shapes
CROSS_VERSION_EXAMPLES = (
    ("Qwen/Qwen2-0.5B", "Qwen/Qwen2-0.5B-Instruct", "Qwen/Qwen2.5-0.5B"),
    ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2-0.5B"),
    ("Qwen/Qwen2-1.5B", "Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2.5-1.5B"),
    ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Llama-3.1-8B"),
)


@dataclass
class ApplyTab:
    source: gr.Radio
    residuals: gr.Textbox
    target: gr.Textbox
    scale: gr.Slider
    dtype: gr.Dropdown
    apply: gr.Button
    base: gr.Textbox
    instruct: gr.Textbox
    merge_target: gr.Textbox
    flavor: gr.Dropdown
    job_count: gr.Dropdown
    plan_job: gr.Button
    run_job: gr.Button
    follow: gr.Button
    cancel_job: gr.Button
    job_status: gr.Markdown
    job_logs: gr.Textbox
    merge: gr.Button
    direct: gr.Checkbox
    cancel: gr.Button
    status: gr.Markdown
    download: gr.File
    push: PushBox


def build(ctx: StudioContext, field_hint: str) -> ApplyTab:
    policy = ctx.policy
    gr.Markdown("Add α·R to a target model — typically your continued-pre-trained base.")
    source = gr.Radio([FROM_SESSION, f"named ({field_hint})"], value=FROM_SESSION, label="Residuals")
    residuals = gr.Textbox(label=f"Residuals ({field_hint})", placeholder="org/residuals")
    target = gr.Textbox(label="Target model (your CPT'd base)", value=policy.demo_name("base-v2"))
    with gr.Row():
        scale = refusing_non_numbers(
            gr.Slider(0.0, merge.MAX_SCALE, value=1.0, step=0.05, label="Scale α", min_width=WIDE)
        )
        dtype = gr.Dropdown(
            [merge.SAME_AS_TARGET, "float32", "bfloat16", "float16"],
            value=merge.SAME_AS_TARGET,
            label="Output dtype",
            min_width=WIDE,
        )
    apply = gr.Button("Apply residuals", variant="primary")
    with gr.Accordion("…or merge three models in one pass (no residuals written)", open=False):
        with gr.Row():
            base = gr.Textbox(label="Base", value=policy.demo_name("base-v1"), min_width=WIDE)
            instruct = gr.Textbox(label="Instruct", value=policy.demo_name("instruct-v1"), min_width=WIDE)
            merge_target = gr.Textbox(
                label="Target (CPT'd base)", value=policy.demo_name("base-v2"), min_width=WIDE
            )
        with gr.Accordion("Too big for this Space? Run the merge as a Job on your account", open=False):
            gr.Markdown(
                "The same merge on Hugging Face hardware billed to your account; the result is pushed to "
                "the repo named under *Push merged model* below. Your login travels as the job's secret. "
                f"A merge one job would take more than {ctx.settings.job_split_seconds / 60:.0f} min over is "
                "split by output shard over jobs that run side by side (*Jobs: auto*); *Plan* shows the "
                "time and cost of each before anything is submitted."
            )
            with gr.Row():
                flavor = gr.Dropdown(jobs.FLAVORS, value="cpu-upgrade", label="Hardware", min_width=WIDE)
                job_count = gr.Dropdown(jobs.JOB_COUNTS, value=jobs.AUTO, label="Jobs", min_width=WIDE)
            with gr.Row():
                plan_job = gr.Button("Plan (time and cost)")
                run_job = gr.Button("Run as a Job on my account")
                follow = gr.Button("Follow my job")
                cancel_job = gr.Button("Cancel my job", variant="stop")
            job_status = gr.Markdown("The job's link and stage will appear here.")
            job_logs = gr.Textbox(label="Job logs", lines=8, max_lines=20)
        gr.Examples(
            [list(example) for example in CROSS_VERSION_EXAMPLES],
            inputs=[base, instruct, merge_target],
            label="Real cross-version pairs (residuals of one version onto the other's base; "
            "Llama needs a login with access to the gated models)",
        )
        merge_button = gr.Button("One-pass merge")
    direct = gr.Checkbox(value=False, label=STRAIGHT_TO_HUB)
    cancel = gr.Button("Cancel", variant="stop", size="sm")
    status = gr.Markdown("The summary of the merged model will appear here.")
    download = gr.File(label="Download the merged model (zip)")
    return ApplyTab(
        source, residuals, target, scale, dtype, apply, base, instruct, merge_target, flavor, job_count, plan_job,
        run_job, follow, cancel_job, job_status, job_logs, merge_button, direct, cancel, status, download,
        push_box("merged model"),
    )  # fmt: skip


def job_image(ctx: StudioContext) -> str | None:
    """The image a job runs in: this Space's own (it holds this project), or STUDIO_JOB_IMAGE."""
    return os.environ.get("STUDIO_JOB_IMAGE") or (
        f"hf.co/spaces/{os.environ['SPACE_ID']}" if ctx.settings.on_space else None
    )


def events(ctx: StudioContext) -> dict[str, Callable]:
    errors = ui_errors(ctx.settings.on_space)

    def merged_outputs(done: merge.Merged, what: str, workspace):
        archive = str(done.delivery.archive) if done.delivery.archive else None
        return present.merged_text(done, what, ctx.settings), archive, workspace, done.repo_name

    @spaces.GPU(duration=gpu_seconds(ctx))
    @errors
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
        push_to, read_token = direct_push(ctx, direct, repo_name, private, token, oauth_token)
        residuals = residuals_source(ctx, source, residuals_path, workspace)
        done = merge.merge(
            ctx, workspace, session_hash(request), target=target, scale=scale, dtype=dtype, token=read_token,
            progress=progress, residuals=residuals, push=push_to,
        )  # fmt: skip
        return merged_outputs(done, f"{code_span(target.strip())} + {done.scale:g}·R", workspace)

    @spaces.GPU(duration=gpu_seconds(ctx))
    @errors
    def merge_three(
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
        push_to, read_token = direct_push(ctx, direct, repo_name, private, token, oauth_token)
        done = merge.merge(
            ctx, workspace, session_hash(request), target=target, scale=scale, dtype=dtype, token=read_token,
            progress=progress, base=base, instruct=instruct, push=push_to,
        )  # fmt: skip
        return merged_outputs(done, "one pass", workspace)

    @errors
    def plan_as_jobs(
        base: str,
        instruct: str,
        target: str,
        scale: float,
        dtype: str,
        repo_name: str,
        private: bool,
        flavor: str,
        job_count: str = jobs.AUTO,
        token: str | None = None,
        workspace: dict[str, Any] | None = None,
        oauth_token: gr.OAuthToken | None = None,
        request: gr.Request | None = None,
    ) -> str:
        """Time and cost of the merge as one job and split over jobs, from the inputs' headers: nothing is
        submitted."""
        job = jobs.MergeJob(base, instruct, target, scale, dtype, repo_name, private, flavor, job_count)
        offer = jobs.plan(
            ctx, workspace if workspace is not None else {}, session_hash(request), job,
            login=login_of(oauth_token), pasted_token=token,
        )  # fmt: skip
        return present.offer_text(offer)

    @errors
    def run_as_job(
        base: str,
        instruct: str,
        target: str,
        scale: float,
        dtype: str,
        repo_name: str,
        private: bool,
        flavor: str,
        job_count: str = jobs.AUTO,
        jobs_seen: list | None = None,
        token: str | None = None,
        workspace: dict[str, Any] | None = None,
        oauth_token: gr.OAuthToken | None = None,
        request: gr.Request | None = None,
    ):
        """Submit the one-pass merge as Jobs under the visitor's account (split over several past the Space's
        bound with `auto`); the job is kept in the session and in the browser (its id, never the token),
        so the page can follow it after a reload."""
        workspace = workspace if workspace is not None else {}
        job = jobs.MergeJob(base, instruct, target, scale, dtype, repo_name, private, flavor, job_count)
        submitted = jobs.submit(
            ctx, workspace, session_hash(request), job, login=login_of(oauth_token), pasted_token=token,
            image=job_image(ctx),
        )  # fmt: skip
        return present.submitted_text(submitted), [*(jobs_seen or []), submitted.record()], workspace

    @errors
    def cancel_my_job(
        jobs_seen: list | None = None,
        token: str | None = None,
        workspace: dict[str, Any] | None = None,
        oauth_token: gr.OAuthToken | None = None,
        request: gr.Request | None = None,
    ) -> str:
        """Cancel the latest job this session or browser submitted (every job of a split run)."""
        job, cancelled = jobs.cancel(
            ctx, workspace if workspace is not None else {}, session_hash(request), jobs_seen,
            login_of(oauth_token), token,
        )  # fmt: skip
        return present.cancelled_text(job, cancelled)

    @errors
    def follow_job(
        jobs_seen: list | None = None,
        token: str | None = None,
        workspace: dict[str, Any] | None = None,
        oauth_token: gr.OAuthToken | None = None,
        request: gr.Request | None = None,
    ) -> Iterator[tuple[str, str]]:
        """The latest job's stage and logs, live until it ends; then the pushed repo's link."""
        workspace = workspace if workspace is not None else {}
        for update in jobs.follow(
            ctx, workspace, session_hash(request), jobs_seen, login_of(oauth_token), token
        ):
            yield present.job_update_text(update), "\n".join(update.lines)

    return {
        "apply": apply,
        "merge": merge_three,
        "plan_job": plan_as_jobs,
        "run_job": run_as_job,
        "follow_job": follow_job,
        "cancel_my_job": cancel_my_job,
        "push_merged": push_event(ctx, "merged"),
    }


def wire(
    tab: ApplyTab, handlers: dict[str, Callable], cancel_job, token, workspace, jobs_seen, heavy: dict
) -> None:
    outputs = [tab.status, tab.download, workspace, tab.push.repo]
    direct = [tab.direct, tab.push.repo, tab.push.private]
    applying = tab.apply.click(
        handlers["apply"], [tab.source, tab.residuals, tab.target, tab.scale, tab.dtype, token, workspace, *direct],
        outputs, api_name="apply", **heavy["slot"],
    )  # fmt: skip
    merging = tab.merge.click(
        handlers["merge"], [tab.base, tab.instruct, tab.merge_target, tab.scale, tab.dtype, token, workspace, *direct],
        outputs, api_name="merge", **heavy["slot"],
    )  # fmt: skip
    tab.cancel.click(cancel_job, [workspace], tab.status, cancels=[applying, merging], api_name=False)
    tab.push.button.click(
        handlers["push_merged"], [tab.push.repo, tab.push.private, token, workspace], tab.push.status,
        api_name="push_merged",
    )  # fmt: skip
    job_fields = [tab.base, tab.instruct, tab.merge_target, tab.scale, tab.dtype, tab.push.repo, tab.push.private,
                  tab.flavor]  # fmt: skip
    tab.plan_job.click(
        handlers["plan_job"], [*job_fields, tab.job_count, token, workspace], tab.job_status, api_name="plan_job",
        concurrency_limit=heavy["check_concurrency"], concurrency_id="check",  # header reads, like Check
    )  # fmt: skip
    tab.run_job.click(
        handlers["run_job"],
        [*job_fields, tab.job_count, jobs_seen, token, workspace],
        [tab.job_status, jobs_seen, workspace],
        api_name="run_job",
    )  # fmt: skip
    tab.cancel_job.click(
        handlers["cancel_my_job"], [jobs_seen, token, workspace], tab.job_status, api_name="cancel_job"
    )  # fmt: skip
    tab.follow.click(
        handlers["follow_job"], [jobs_seen, token, workspace], [tab.job_status, tab.job_logs], api_name="follow_job",
        concurrency_limit=heavy["check_concurrency"], concurrency_id="follow",  # a log can stream for hours
    )  # fmt: skip
