"""Hub-ready model cards for residuals and merged models, built on huggingface_hub's ModelCard."""

from __future__ import annotations

import re
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .config import ResidualsConfig
from .hub import valid_repo_id

_MARKDOWN_SPECIALS = re.compile(r"([\\`\[\]|!])")  # links, images, code, tables; < and > become entities


def _one_line(text: object) -> str:
    """Whitespace (newlines included) collapsed and control characters dropped: a name stays on its line."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())


def code_span(text: object) -> str:
    """Any text, e.g. a name a stranger's repo chose, as one inline code span: Markdown makes no link,
    image, heading or new line of it (a fence longer than any run of backticks inside)."""
    flat = _one_line(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", flat)), default=0) + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{fence}{pad}{flat}{pad}{fence}"


def markdown_text(text: object) -> str:
    """Text (which may quote foreign names) as Markdown that renders exactly that text on one line."""
    flat = _MARKDOWN_SPECIALS.sub(r"\\\1", _one_line(text))
    return flat.replace("<", "&lt;").replace(">", "&gt;")


def hub_id_or_none(name: str | None) -> str | None:
    """Only real Hub ids go into `base_model` metadata (the Hub rejects local paths there)."""
    if name and "/" in name and valid_repo_id(name):
        return name
    return None


def _files_table(manifest: dict[str, dict[str, Any]]) -> str:
    rows = ["| file | size (bytes) | sha256 |", "|---|---:|---|"]
    rows += [
        f"| `{name}` | {entry['size']} | `{entry['sha256']}` |" for name, entry in sorted(manifest.items())
    ]
    return "\n".join(rows)


def _notes(notes: list[str] | None) -> str:
    """What the run decided that a user of the result must know (e.g. how vocabulary rows were filled)."""
    if not notes:
        return ""
    return "## Notes\n\n" + "\n".join(f"- {markdown_text(note)}" for note in notes) + "\n\n"


def _layer_table(summary: dict[str, Any] | None, limit: int = 64) -> str:
    if not summary or not summary.get("layers"):
        return "_not recorded_"
    rows = ["| layer | ‖R‖ | ‖R‖/‖θ‖ |", "|---|---:|---:|"]
    for row in summary["layers"][:limit]:
        rel = f"{row['relative']:.4g}" if row.get("relative") is not None else "–"
        rows.append(f"| {row['layer']} | {row['norm']:.4g} | {rel} |")
    return "\n".join(rows)


def residuals_card_data(
    *,
    base: str | None,
    instruct: str | None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    pipeline_tag: str | None = None,
    relation: str | None = None,
) -> ModelCardData:
    return ModelCardData(
        base_model=hub_id_or_none(base),
        base_model_relation=relation or "adapter",
        library_name="residuals",
        pipeline_tag=pipeline_tag or "text-generation",
        license=license,
        language=language,
        tags=sorted(set((tags or []) + ["residuals", "task-arithmetic"])),
        instruct_model=instruct,
    )


def merged_card_data(
    *, target: str | None, instruct: str | None, license: str | None, language: str | list[str] | None
) -> ModelCardData:
    lineage = [m for m in (hub_id_or_none(target), hub_id_or_none(instruct)) if m]
    return ModelCardData(
        base_model=lineage or None,
        base_model_relation="merge" if lineage else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        language=language,
        tags=["residuals", "task-arithmetic", "merge"],
    )


def metadata_block(data: ModelCardData) -> str:
    """The part of a card the Hub validates (`validate-yaml`), known before any work is done."""
    return f"---\n{data.to_yaml()}\n---\n"


def residuals_card(
    config: ResidualsConfig,
    *,
    name: str,
    manifest: dict[str, dict[str, Any]],
    summary: dict[str, Any] | None = None,
    reconstruction: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> ModelCard:
    base = config.base_model_name
    instruct = config.instruct_model_name
    data = residuals_card_data(
        base=base,
        instruct=instruct,
        license=config.license,
        language=config.language,
        tags=config.tags,
        pipeline_tag=config.pipeline_tag,
        relation=config.base_model_relation,
    )
    lineage = (
        f"{code_span(instruct)} − {code_span(base)}"
        if base and instruct
        else "an instruction-tuned model minus its base model"
    )
    recon = ""
    if reconstruction:
        if reconstruction.get("exact"):
            recon = (
                "base + residual reproduces the instruct model bit for bit (float32 check at compute time)."
            )
        else:
            recon = (
                f"Stored in {config.dtype}: {reconstruction['mismatched_elements']} of "
                f"{reconstruction['elements']} elements differ from the instruct model after reconstruction "
                f"(max abs error {reconstruction['max_abs_error']:.3g})."
            )
    body = f"""
# Instruction residuals: {code_span(instruct or "instruct")} − {code_span(base or "base")}

Instruction residuals (a task vector, Ilharco et al. 2022; Jindal et al. 2024): the tensor-by-tensor
difference {lineage}. Add them to a continued-pre-trained (CPT) version of the base model to regain
instruction following without instruction tuning.

## Usage

```python
from residuals_core import Residuals

res = Residuals.from_pretrained("{name}")
# stream base + residuals into a new model folder, one tensor at a time
Residuals.apply_to_pretrained(model="{hub_id_or_none(base) or "path/to/your-cpt-base"}", residuals="{name}", out_dir="merged")

from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("merged")
```

The folder is also readable by the `residuals` package (`pip install residuals`):

```python
from residuals import Residuals
res = Residuals.from_pretrained("{name}")
```

## Lineage

- Base model: {code_span(base)}
- Instruction model: {code_span(instruct)}
- Storage dtype: {config.dtype}
- Tensors: {config.param_count}
- Shapes hash: `{config.shapes_hash}`
- {recon or "Reconstruction: not checked"}

{_notes(notes)}## Per-layer norms of the residual

{_layer_table(summary)}

## Files

{_files_table(manifest)}

## Provenance

- Created at: {config.created_at}
- Produced by: residuals_core {config.library.get("producer_version", "")} (Residuals Studio)
- Names hash: `{config.parameter_names_hash}`
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def merged_card(
    *,
    name: str,
    target: str,
    instruct: str | None,
    base: str | None,
    residuals: str | None,
    scale: float,
    dtype: str,
    manifest: dict[str, dict[str, Any]],
    summary: dict[str, Any] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    notes: list[str] | None = None,
) -> ModelCard:
    data = merged_card_data(target=target, instruct=instruct, license=license, language=language)
    body = f"""
# {markdown_text(name)}: {code_span(target)} + {scale:g} × instruction residuals

Made with task arithmetic: θ = θ_target + α·(θ_instruct − θ_base), tensor by tensor in float32,
following Jindal et al. 2024 (instruction residuals regain instruction following after continued
pre-training without instruction tuning).

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

## Lineage

- Target (e.g. continued-pre-trained base): {code_span(target)}
- Instruction model: {code_span(instruct)}
- Base model the residuals were taken from: {code_span(base)}
- Residuals: {code_span(residuals) if residuals else "computed on the fly (one-pass merge)"}
- α (scale): {scale:g}
- Storage dtype: {dtype}

{_notes(notes)}## Per-layer norms of the applied delta

{_layer_table(summary)}

## Files

{_files_table(manifest)}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
