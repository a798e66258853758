"""Residuals Studio — the Gradio Space. The full UI arrives with its own issue; this page already
lets a visitor compute residuals of two local/Hub models with the core library."""

from __future__ import annotations

import os
import tempfile

import gradio as gr

from residuals_core import ResidualsError, compute_residuals


def compute(base: str, instruct: str, dtype: str, progress=gr.Progress()) -> str:  # noqa: B008 (gradio injects it)
    out = tempfile.mkdtemp(prefix="residuals-") + "/residuals"

    def report(done: int, total: int, name: str) -> None:
        progress(done / max(total, 1), desc=name)

    try:
        result = compute_residuals(base.strip(), instruct.strip(), out, dtype=dtype, progress=report)
    except ResidualsError as exc:
        raise gr.Error(str(exc)) from exc
    recon = result.reconstruction or {}
    return (
        f"Residuals written to `{result.path}` — total ‖R‖ = {result.summary['total_norm']:.4g}; "
        f"reconstruction {'exact' if recon.get('exact') else 'not exact'}."
    )


with gr.Blocks(title="Residuals Studio") as demo:
    gr.Markdown("# Residuals Studio\nInstruction residuals R = θ_instruct − θ_base, one tensor at a time.")
    base = gr.Textbox(label="Base model (Hub id or local folder)")
    instruct = gr.Textbox(label="Instruct model (Hub id or local folder)")
    dtype = gr.Dropdown(["float32", "bfloat16", "float16"], value="float32", label="Storage dtype")
    button = gr.Button("Compute residuals", variant="primary")
    output = gr.Markdown()
    button.click(compute, [base, instruct, dtype], output)

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
