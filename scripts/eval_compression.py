"""What each smaller residual costs, on the demo family: size, ‖R − R̂‖/‖R‖, and the merged model's scores.

    python scripts/eval_compression.py            # markdown table
    python scripts/eval_compression.py --json     # the same rows as JSON

R = instruct-v1 − base-v1 (float32); every variant R̂ is added to base-v2 (the "CPT'd base") and the
result asked the demo family's questions (the evaluation of scripts/eval_demo_family.py: format on
world-B questions, exact world-B answers, the format-free cloze probe of world-B knowledge).
Variants: the full residual at α ∈ {0.5, 0.75, 1.0, 1.25}; LoRA (PEFT) at rank 2/4/8/16/32 and at
energy 0.9 (projections, embedding and output head), and at rank 8 / 32 on the projections only;
DARE 0.5 / 0.9; magnitude trimming to 50% / 20%; base-v2 alone.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from residuals_core import apply_residuals, compute_residuals, export_lora
from residuals_core.demo import DEMO_FAMILY, World, evaluate_model
from residuals_core.operations import sparsify_residuals


def state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def zipped_bytes(folder: Path) -> int:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(Path(folder).glob("*.safetensors")):
            archive.write(path, path.name)
    return buffer.getbuffer().nbytes


def relative_error(exact: dict[str, torch.Tensor], approx: dict[str, torch.Tensor]) -> float:
    """‖R − R̂‖/‖R‖ over all floating tensors of R (a tensor missing from R̂ counts as zero)."""
    error = norm = 0.0
    for name, value in exact.items():
        if not value.dtype.is_floating_point:
            continue
        other = approx.get(name)
        diff = value.double() - (other.double() if other is not None else 0.0)
        error += float((diff**2).sum())
        norm += float((value.double() ** 2).sum())
    return math.sqrt(error / norm)


def lora_delta(adapter: Path) -> dict[str, torch.Tensor]:
    """R̂ of an adapter: B·A per adapted weight, under the weight's own name."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
        out[name] = tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
    for key in [k for k in tensors if k.endswith("lora_embedding_A")]:  # PEFT's embedding LoRA: (B·A)ᵀ
        name = key.removeprefix("base_model.model.").removesuffix(".lora_embedding_A") + ".weight"
        out[name] = (tensors[key.replace("_A", "_B")] @ tensors[key]).t()
    return out


def scores(
    model_folder: Path | None, world: World, limit: int, *, adapter: Path | None = None, base: Path
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder or base
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    result = evaluate_model(model, tokenizer, world, limit=limit)
    return {k: result[k] for k in ("format", "world_b_exact", "cloze_b")}


HEADLINE = ("full R", "LoRA rank 8", "LoRA rank 16", "DARE 0.9", "trim to 50%", "base-v2 alone (no residual)")


def evaluate(family: Path, limit: int, only: tuple[str, ...] | None = None) -> dict:
    """Every variant's row on one family build (or only the named variants)."""

    def wanted(name: str) -> bool:
        return only is None or name in only

    world = World.load(family)
    target = family / "base-v2"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="eval-compression-") as tmp:
        tmp = Path(tmp)
        residuals = compute_residuals(family / "base-v1", family / "instruct-v1", tmp / "full").path
        exact = state(residuals)
        full_bytes = weight_bytes(residuals)

        def row(
            name: str, artifact: Path, approx: dict, merged: Path | None, adapter: Path | None = None
        ) -> None:
            size = weight_bytes(artifact)
            rows.append(
                {
                    "variant": name,
                    "artifact_mb": size / 1e6,
                    "zipped_mb": zipped_bytes(artifact) / 1e6,
                    "size_ratio": size / full_bytes,
                    "relative_error": relative_error(exact, approx),
                    **scores(merged, world, limit, adapter=adapter, base=target),
                }
            )
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)

        for alpha in (0.5, 0.75, 1.0, 1.25):
            if not wanted(f"full R, α = {alpha:g}" if alpha != 1.0 else "full R"):
                continue
            merged = apply_residuals(residuals, target, tmp / f"alpha-{alpha}", scale=alpha).path
            scaled = {k: v * alpha if v.dtype.is_floating_point else v for k, v in exact.items()}
            row(f"full R, α = {alpha:g}" if alpha != 1.0 else "full R", residuals, scaled, merged)
        for rank in (2, 4, 8, 16, 32):
            if not wanted(f"LoRA rank {rank}"):
                continue
            adapter = tmp / f"lora-{rank}"
            export_lora(residuals, adapter, rank=rank)
            row(f"LoRA rank {rank}", adapter, lora_delta(adapter), None, adapter)
        if wanted("LoRA energy 0.9"):
            adapter = tmp / "lora-energy"
            export_lora(residuals, adapter, energy=0.9)
            row("LoRA energy 0.9", adapter, lora_delta(adapter), None, adapter)
        for rank in (8, 32):  # the choice for embeddings: what leaving them out costs
            if not wanted(f"LoRA rank {rank}, projections only"):
                continue
            adapter = tmp / f"lora-{rank}-projections"
            export_lora(residuals, adapter, rank=rank, embeddings=False)
            row(f"LoRA rank {rank}, projections only", adapter, lora_delta(adapter), None, adapter)
        sparse_variants = [(f"DARE {p:g}", f"dare-{p}", {"dare": p}) for p in (0.5, 0.9)]
        sparse_variants += [(f"trim to {100 * k:g}%", f"trim-{k}", {"trim": k}) for k in (0.5, 0.2)]
        for name, folder, how in sparse_variants:
            if not wanted(name):
                continue
            sparse = sparsify_residuals(residuals, tmp / folder, **how).path
            merged = apply_residuals(sparse, target, tmp / f"{folder}-merged").path
            row(name, sparse, state(sparse), merged)
        if wanted("base-v2 alone (no residual)"):
            rows.append({"variant": "base-v2 alone (no residual)", "artifact_mb": 0.0, "zipped_mb": 0.0,
                         "size_ratio": 0.0, "relative_error": 1.0, **scores(None, world, limit, base=target)})  # fmt: skip
    return {"family": str(family.name), "limit": limit, "rows": rows}


def markdown(report: dict) -> str:
    lines = [
        "| variant | weights (MB) | zipped (MB) | × full size | ‖R − R̂‖/‖R‖ | format | world-B exact | cloze-B |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['variant']} | {r['artifact_mb']:.2f} | {r['zipped_mb']:.2f} | {r['size_ratio']:.3f} | "
            f"{r['relative_error']:.3f} | {100 * r['format']:.0f}% | {100 * r['world_b_exact']:.0f}% | "
            f"{100 * r['cloze_b']:.0f}% |"
        )
    return "\n".join(lines)


def headline(reports: list[dict]) -> list[dict]:
    """The headline rows as mean ± sd over family builds (sample sd, n = number of builds)."""
    rows = []
    for variant in HEADLINE:
        found = [next(r for r in report["rows"] if r["variant"] == variant) for report in reports]
        row = {"variant": variant, "builds": len(found)}
        for key in ("format", "world_b_exact", "cloze_b"):
            values = [r[key] for r in found]
            mean = sum(values) / len(values)
            sd = (
                math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                if len(values) > 1
                else 0.0
            )
            row[key] = {"mean": mean, "sd": sd, "values": values}
        rows.append(row)
    return rows


def headline_markdown(rows: list[dict]) -> str:
    lines = ["| variant | format | world-B exact | cloze-B |", "|---|---:|---:|---:|"]
    for r in rows:
        cells = [
            f"{100 * r[k]['mean']:.0f} ± {100 * r[k]['sd']:.0f}%"
            for k in ("format", "world_b_exact", "cloze_b")
        ]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", type=Path, default=DEMO_FAMILY, help="the demo family's folder")
    parser.add_argument("--limit", type=int, default=120, help="questions per split (default 120)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    parser.add_argument(
        "--seed-families", type=Path, nargs="*", default=[],
        help="other builds of the family (scripts/build_demo_family.py --seed N): headline rows as mean ± sd",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = evaluate(args.family, args.limit)
    if args.seed_families:
        others = [evaluate(family, args.limit, only=HEADLINE) for family in args.seed_families]
        report["headline"] = headline([report, *others])
        report["seed_families"] = [str(f) for f in args.seed_families]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report))
        if "headline" in report:
            print("\n" + headline_markdown(report["headline"]))


if __name__ == "__main__":
    main()
