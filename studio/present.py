"""How results are shown: Markdown summaries, tables and plots, made from the services' dataclasses.

Every string that came from a model repo (names, architectures, notes, job messages) is shown as a
code span or as escaped text, never as markup: a stranger's repo must not put links or images on
this page.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from huggingface_hub import constants as hub_constants

from residuals_core.card import code_span, markdown_text
from residuals_core.units import format_duration, format_size

from .hosting import JobEstimate
from .services import Delivery
from .services.compute import Checked, Computed
from .services.inspect import Inspected
from .services.jobs import JobOffer, JobUpdate, SubmittedJob
from .services.lora import Exported, Previewed
from .services.merge import Merged
from .services.push import Pushed
from .services.tryout import LABELS, Scores, Tried
from .settings import Settings


# ---- plots and tables --------------------------------------------------------------------------------
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


def cosine_frame(rows: list[dict] | None) -> pd.DataFrame:
    return pd.DataFrame(rows or [], columns=["layer", "cosine"]).fillna(0.0)


def scores_frame(scores: Scores) -> pd.DataFrame:
    done = max(scores.questions, 1)
    return pd.DataFrame(
        [
            {
                "model": label,
                "questions": scores.questions,
                "format %": 100 * f / done,
                "exact %": 100 * c / done,
            }
            for label, (f, c) in zip(LABELS, scores.tallies, strict=True)
        ]
    ).round(1)


# ---- links ----------------------------------------------------------------------------------------------
def repo_link(repo: str) -> str:
    return f"[{code_span(repo)}]({hub_constants.ENDPOINT}/{repo})"


def job_link(job: dict[str, str]) -> str:
    return f"[{code_span(job['id'])}]({hub_constants.ENDPOINT}/jobs/{job['owner']}/{job['id']})"


# ---- summaries ---------------------------------------------------------------------------------------
def delivery_text(delivery: Delivery, settings: Settings) -> str:
    if delivery.repo is not None:
        return f"\n\nStreamed straight into {repo_link(delivery.repo)}: nothing of it was kept on this Space."
    if delivery.archive is None:
        return (
            f"\n\nThe result is {format_size(delivery.unzipped_bytes or 0)}, more than this Space zips "
            f"({format_size(settings.max_zip_bytes)}): push it to your Hub account below to get it out."
        )
    return f"\n\nDownload: a {format_size(delivery.archive.stat().st_size)} zip below."


def job_hint(estimate: JobEstimate, settings: Settings) -> str:
    """Beyond what this Space should take on (STUDIO_JOB_OFFER_MINUTES), the way out for a merge: a Job."""
    if estimate.seconds <= settings.job_offer_seconds:
        return ""
    return (
        f"\n- ⏱ that is more than {settings.job_offer_seconds / 60:.0f} min: the **one-pass merge** of these "
        "residuals onto your CPT'd base can run as a Job on your account (Apply tab, *Run as a Job on my "
        "account*), which needs no residuals written here."
    )


def checked_text(checked: Checked, dtype: str, settings: Settings) -> str:
    report = checked.report
    sizes = ", ".join(
        f"{role} {code_span(checked.fields[role])} {format_size(checked.sizes[role])}"
        for role in checked.fields
    )
    small = (
        f" (plus {format_size(checked.small_bytes)} of config and tokenizer files)"
        if checked.small_bytes
        else ""
    )
    notes = "".join(f"\n- note: {markdown_text(n)}" for n in report["notes"])
    return (
        f"✅ **Compatible** (checked from headers, no weights downloaded)\n\n"
        f"- architecture: {code_span(report['architecture'])}, {report['layers']} layers, "
        f"{report['parameters'] / 1e6:.2f} M parameters in {report['tensors']} tensors\n"
        f"- vocabulary: base {report['vocab_size']['base']}, instruct {report['vocab_size']['instruct']}, "
        f"tokenizer {report['tokenizer_length']}; tied embeddings: {report['tie_word_embeddings']}\n"
        f"- size on disk: {sizes}{small}\n"
        f"- residuals will take **{format_size(report['expected_output_bytes'])}** ({markdown_text(dtype)})\n"
        f"- the job {checked.estimate.describe()} (limit here: {settings.limits.max_seconds / 60:.0f} min)"
        f"{job_hint(checked.estimate, settings)}"
        f"{notes}\n\nNext: **Compute residuals**."
    )


def computed_text(computed: Computed, dtype: str, settings: Settings) -> str:
    result = computed.result
    recon = result.reconstruction or {}
    exact = (
        "base + R reproduces the instruct model **bit for bit**"
        if recon.get("exact")
        else f"{recon.get('mismatched_elements')} of {recon.get('elements')} elements differ after reconstruction "
        f"(max error {recon.get('max_abs_error', 0):.2g}) — the price of {markdown_text(dtype)} storage"
    )
    return (
        f"### Residuals ready\n{len(result.tensors)} tensors, total ‖R‖ = {result.summary['total_norm']:.4g}, "
        f"‖R‖/‖θ_base‖ = {result.summary['relative'] or 0:.3g}. {exact}. (The job {computed.estimate.describe()}.)\n\n"
        "Next: **Apply** them to your continued-pre-trained base, **Inspect** them, or push them to the Hub below."
        + delivery_text(computed.delivery, settings)
    )


def merged_text(merged: Merged, what: str, settings: Settings) -> str:
    result = merged.result
    return (
        f"### Merged model ready\n{what}: {len(result.tensors)} tensors, ‖α·R‖ = {result.summary['total_norm']:.4g} "
        f"(the job {merged.estimate.describe()}). "
        "The folder holds weights, config, generation config, tokenizer and a model card "
        "(`base_model`: the target and the instruct model, `base_model_relation: merge`).\n\n"
        "Next: compare generations in **Try**, download the zip, or push it below."
        + delivery_text(merged.delivery, settings)
    )


def claims_text(claims: dict[str, int], tensors: int) -> str:
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


def inspected_text(inspected: Inspected, compare: str) -> str:
    report = inspected.report
    relative = f", ‖R‖/‖θ_base‖ = {report['relative']:.3g}" if report.get("relative") else ""
    text = (
        f"**{report['tensors']} tensors** ({code_span(report['dtype'])}): total ‖R‖ = "
        f"{report['total_norm']:.4g}{relative}, computed from the weights (the job {inspected.estimate.describe()}).\n\n"
        f"Lineage as the repo's config states it: {code_span(report['instruct_model'])} − "
        f"{code_span(report['base_model'])}.\n\n{claims_text(report['claims'], report['tensors'])}"
    )
    if inspected.cosine is not None:
        cosine = cosine_frame(inspected.cosine)
        mean = cosine["cosine"].mean() if len(cosine) else 0.0
        text += f"\n\nCompared with {code_span(compare.strip())}: mean per-layer cosine similarity **{mean:.3f}**."
    return text


def previewed_text(previewed: Previewed) -> str:
    report = previewed.report
    return (
        f"The adapter would keep **{100 * report['kept']:.1f}%** of ‖R‖² and weigh about "
        f"**{format_size(report['adapter_bytes'])}** (the full residuals: {format_size(report['residual_bytes'])}). "
        f"Nothing was written yet: **Export** writes it. (The preview {previewed.estimate.describe()}.)"
    )


def exported_text(exported: Exported, settings: Settings) -> str:
    summary = exported.result.summary
    ranks = sorted({m["rank"] for m in summary["matrices"]})
    return (
        f"### LoRA adapter ready\n{len(summary['matrices'])} matrices, ranks {ranks[0]}–{ranks[-1]}, "
        f"‖R − R̂‖/‖R‖ = {summary['relative_error']:.3f} over them; {format_size(summary['adapter_bytes'])} "
        f"(the full residuals: {format_size(summary['residual_bytes'])}; the export {exported.estimate.describe()}). "
        "Load it with peft on your CPT'd base: `PeftModel.from_pretrained(model, ...)`."
        + delivery_text(exported.delivery, settings)
    )


def tried_outputs(tried: Tried, settings: Settings) -> tuple[list[str], str]:
    """The three replies as shown, and the verdict below them."""
    out_of_time = f"(not generated: the {settings.try_max_seconds:g} s this Space gives one click ran out)"
    replies = [out_of_time if r is None else r for r in tried.replies]
    if tried.expected is None:
        return replies, "Not a demo-family question: no expected answer to compare with."
    marks = [f"format {'✓' if f else '✗'} · answer {'✓' if c else '✗'}" for f, c in tried.marks]
    verdict = f"**Expected:** {markdown_text(tried.expected)}\n\n" + "\n".join(
        f"- {label}: {mark}" for label, mark in zip(LABELS, marks, strict=True)
    )
    return replies, verdict


def _split_lines(plan: Any) -> list[str]:
    """Each job of a split run: its shards and estimate."""
    return [
        f"  - job {k}: shards {', '.join(map(str, part))} — about {format_duration(job.estimate_s)} "
        f"(timeout {format_duration(job.timeout_s)})"
        for k, (part, job) in enumerate(zip(plan.parts, plan.jobs, strict=True), start=1)
    ]


def offer_text(offer: JobOffer) -> str:
    """One job against the split the Space offers (or the visitor chose), with time and cost of each."""
    chosen, one = offer.chosen, offer.one_job
    lines = [
        f"**{len(one.shards)} output shards, {format_size(sum(s['bytes'] for s in one.shards))}** "
        f"pushed to {repo_link(chosen.repo_id)}."
    ]
    if chosen.published:
        return lines[0] + " This merge was already published there by an earlier run."
    if chosen.done or chosen.busy:
        lines.append(
            f"- {len(chosen.done)} shards are on its run branch already"
            + (f", {len(chosen.busy)} being written by running jobs" if chosen.busy else "")
            + ": only the rest is submitted."
        )
    if one.jobs:
        lines.append(f"- **one job**: {one.cost_text()}")
    if len(chosen.parts) > 1:
        lines.append(f"- **split over {len(chosen.parts)} jobs** running side by side: {chosen.cost_text()}")
        lines += _split_lines(chosen)
    if one.wall_s > offer.split_after_s and len(chosen.parts) <= 1:
        lines.append(
            f"- ⏱ one job takes more than {format_duration(offer.split_after_s)}: choose *Jobs: auto* (or a "
            "number) to split it by output shard; the jobs publish one commit when the last shard is in."
        )
    lines.append("The estimates count 3 min of start-up per job and 100 MB/s each way.")
    return "\n".join(lines)


def submitted_text(job: SubmittedJob) -> str:
    if job.offer is not None:
        links = ", ".join(job_link({"id": i, "owner": job.owner}) for i in job.ids)
        return (
            f"{len(job.ids)} jobs submitted on your account ({links}), each writing its share of the "
            f"shards: {job.offer.chosen.cost_text()}. They push to {repo_link(job.repo)} in one commit "
            "once every shard is in. **Follow my job** shows them all; **Cancel my job** stops them all."
        )
    return (
        f"Job {job_link(job.record())} submitted on your account: it {job.plan.describe()}. "
        f"It pushes to {repo_link(job.repo)}. **Follow my job** shows its logs."
    )


def job_update_text(update: JobUpdate) -> str:
    link = job_link(update.job)
    what = (
        f"Split run ({code_span(update.job['run'])}, jobs from {link})"
        if "run" in update.job
        else f"Job {link}"
    )
    if update.stage is None:
        return f"{what}: {'running' if update.lines else 'starting…'}"
    message = f" ({markdown_text(update.message)})" if update.message else ""
    done = f"{what}: **{markdown_text(update.stage)}**{message}"
    if update.stage == "COMPLETED":
        done += f" — the result is at {repo_link(update.job['repo'])}"
    return done


def cancelled_text(job: dict[str, str], cancelled: list[str]) -> str:
    if not cancelled:
        return f"Nothing to cancel: no job of {job_link(job)}{' (split run)' if 'run' in job else ''} is running."
    what = f"{len(cancelled)} job(s) of the split run" if "run" in job else f"Job {job_link(job)}"
    kept = (
        " Shards already on its run branch are kept: Run as a Job again with the same settings to finish it."
        if "run" in job
        else ""
    )
    return f"🛑 {what} cancelled; nothing was published to {repo_link(job['repo'])}.{kept}"


def pushed_text(pushed: Pushed) -> str:
    if pushed.already:
        return f"✅ Already on the Hub: it was written straight into {repo_link(pushed.repo)}."
    return f"✅ Pushed to {repo_link(pushed.repo)}" + (" (private)" if pushed.private else "")
