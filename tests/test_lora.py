"""LoRA export: PEFT loads the adapter, full rank gives back target + R, rank r keeps what the SVD keeps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import load_state

from residuals_core import ResidualsError, compute_residuals, export_lora
from residuals_core.cli import main
from residuals_core.demo import DEMO_FAMILY

peft = pytest.importorskip("peft")


def merged_with_peft(target, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


def test_full_rank_adapter_merges_to_target_plus_residual(llama_residuals, tmp_path):
    fam, folder = llama_residuals
    result = export_lora(folder, tmp_path / "adapter", rank=10_000)  # capped at each matrix's full rank
    assert result.summary["relative_error"] < 1e-5
    merged = merged_with_peft(fam["target"], tmp_path / "adapter")
    target, delta = load_state(fam["target"]), load_state(folder)
    adapted = [m["name"] for m in result.summary["matrices"]]
    assert len(adapted) == 2 * 7 + 2  # 2 layers × q, k, v, o, gate, up, down; the embedding and the head
    for name in adapted:
        assert torch.allclose(merged[name], target[name] + delta[name], atol=1e-5), name
    untouched = [n for n in target if n not in adapted and n in merged]
    assert untouched and all(torch.equal(merged[n], target[n]) for n in untouched)  # norms: left out


def test_without_embeddings_only_the_projections(llama_residuals, tmp_path):
    fam, folder = llama_residuals
    result = export_lora(folder, tmp_path / "proj", rank=4, embeddings=False)
    adapted = {m["name"] for m in result.summary["matrices"]}
    assert len(adapted) == 14 and "model.embed_tokens.weight" in result.summary["left_out"]
    merged = merged_with_peft(fam["target"], tmp_path / "proj")
    assert torch.equal(
        merged["model.embed_tokens.weight"], load_state(fam["target"])["model.embed_tokens.weight"]
    )


def test_rank_r_error_is_the_truncated_svds(llama_residuals, tmp_path):
    _, folder = llama_residuals
    result = export_lora(folder, tmp_path / "r2", rank=2)
    delta = load_state(folder)
    adapter = load_file(tmp_path / "r2" / "adapter_model.safetensors")
    for entry in result.summary["matrices"]:
        module = entry["name"].removesuffix(".weight")
        r = delta[entry["name"]].double()
        if module.endswith("embed_tokens"):  # PEFT's embedding LoRA: delta = (B·A)ᵀ
            a = adapter[f"base_model.model.{module}.lora_embedding_A"]
            b = adapter[f"base_model.model.{module}.lora_embedding_B"]
            r = r.t()
        else:
            a = adapter[f"base_model.model.{module}.lora_A.weight"]
            b = adapter[f"base_model.model.{module}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == 2
        s = torch.linalg.svdvals(r)
        optimum = float(torch.sqrt((s[2:] ** 2).sum()) / torch.sqrt((s**2).sum()))
        actual = float(torch.linalg.norm(r - (b @ a).double()) / torch.linalg.norm(r))
        assert actual == pytest.approx(optimum, rel=1e-4) and entry["relative_error"] == pytest.approx(
            optimum, rel=1e-4
        )
    config = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 2
    card = (tmp_path / "r2" / "README.md").read_text()
    assert "library_name: peft" in card and "Left out" in card


def test_energy_picks_the_smallest_rank_per_matrix(llama_residuals, tmp_path, families):
    fam, folder = llama_residuals
    result = export_lora(folder, tmp_path / "e", energy=0.5)
    assert all(m["energy_kept"] >= 0.5 for m in result.summary["matrices"])
    delta = load_state(folder)
    for entry in result.summary["matrices"]:
        s = torch.linalg.svdvals(delta[entry["name"]].double()) ** 2
        assert float(s[: entry["rank"] - 1].sum() / s.sum()) < 0.5  # one fewer would not do
    merged = merged_with_peft(fam["target"], tmp_path / "e")  # per-matrix ranks load through rank_pattern
    assert merged


def test_straight_from_two_models_equals_from_residuals(llama_residuals, tmp_path):
    fam, folder = llama_residuals
    code = main(["lora", "--base", str(fam["base"]), "--instruct", str(fam["instruct"]), "--rank", "3",
                 "--out", str(tmp_path / "direct"), "--quiet"])  # fmt: skip
    assert code == 0
    export_lora(folder, tmp_path / "saved", rank=3)
    direct = load_file(tmp_path / "direct" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert direct.keys() == saved.keys()
    for key in [k for k in direct if "_A" in k]:
        b_key = key.replace("_A", "_B")
        assert torch.allclose(direct[b_key] @ direct[key], saved[b_key] @ saved[key], atol=1e-6)


def test_bad_requests_refused(llama_residuals, tmp_path):
    _, folder = llama_residuals
    with pytest.raises(ResidualsError, match="either a rank or an energy"):
        export_lora(folder, tmp_path / "x")
    with pytest.raises(ResidualsError, match="not a share"):
        export_lora(folder, tmp_path / "x", energy=1.5)
    with pytest.raises(ResidualsError, match="not a positive whole number"):
        export_lora(folder, tmp_path / "x", rank=0)
    assert not (tmp_path / "x").exists()
    assert main(["lora", "--base", str(folder), "--rank", "2", "--out", str(tmp_path / "y"), "--quiet"]) == 2


def test_preview_says_what_the_export_keeps(llama_residuals, tmp_path):
    from residuals_core.lora import preview_lora
    from residuals_core.operations import open_residuals

    _, folder = llama_residuals
    with open_residuals(folder) as opened:
        preview = preview_lora(opened.checkpoint, rank=2)
    result = export_lora(folder, tmp_path / "r2", rank=2)
    summary = result.summary
    kept = sum(m["energy_kept"] * m["norm_sq"] for m in summary["matrices"])
    total = sum(m["norm_sq"] for m in summary["matrices"]) + sum(summary["left_out"].values())
    assert preview["kept"] == pytest.approx(kept / total, rel=1e-6)
    assert (
        0 < preview["adapter_bytes"] <= summary["adapter_bytes"] < preview["adapter_bytes"] + 20_000
    )  # + header
    assert {row["layer"] for row in preview["layers"]} >= {"embed", "0", "1"}
    assert all(0 <= row["kept"] <= 1 for row in preview["layers"])


@pytest.mark.skipif(not (DEMO_FAMILY / "world.json").is_file(), reason="demo family not built")
def test_peft_loads_the_adapter_on_the_demo_cpt_base(tmp_path):
    """The workflow of the README on the bundled family: residuals → adapter → PEFT on base-v2 → answers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from residuals_core.demo import World, prompt, question_of, score_reply
    from residuals_core.demo import generate as demo_generate

    residuals = compute_residuals(DEMO_FAMILY / "base-v1", DEMO_FAMILY / "instruct-v1", tmp_path / "res").path
    export_lora(residuals, tmp_path / "lora", rank=16)
    model = AutoModelForCausalLM.from_pretrained(str(DEMO_FAMILY / "base-v2"), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(tmp_path / "lora")).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_FAMILY / "base-v2"))
    world = World.load(DEMO_FAMILY)
    items = world.questions(world.world_b, 12, seed=0)
    prompts = [prompt(*item) for item in items]
    replies = demo_generate(model, tokenizer, prompts)
    formatted = sum(score_reply(r, world, *i)[0] for r, i in zip(replies, items, strict=True))
    assert formatted >= 10  # base-v2 alone follows the format on none of them
    assert question_of(world, prompts[0]) == items[0]
