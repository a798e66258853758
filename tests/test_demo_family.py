"""The bundled demo family shows the paper's effect, and the build script works end to end."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from residuals_core import merge_models
from residuals_core.demo import DEMO_FAMILY, ROWS, World, evaluate_model

pytestmark = pytest.mark.slow  # Jobs, the demo family's build, a browser: seconds each

needs_family = pytest.mark.skipif(not (DEMO_FAMILY / "world.json").is_file(), reason="demo family not built")


def load(path):
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(path)


@needs_family
def test_shipped_family_is_complete_and_small():
    for name in ROWS:
        if name == "merged":
            continue
        folder = DEMO_FAMILY / name
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
            p.name for p in folder.iterdir()
        }
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer("Question:").input_ids[0] == tokenizer.bos_token_id  # as in training
    total = sum(p.stat().st_size for p in DEMO_FAMILY.rglob("*") if p.is_file())
    assert total <= 15 * 1024 * 1024


@needs_family
def test_merge_regains_instruction_following_and_keeps_new_knowledge(tmp_path):
    """The paper's effect on a fixed sample of world-B questions (greedy, deterministic)."""
    world = World.load()
    merged = merge_models(
        DEMO_FAMILY / "base-v1", DEMO_FAMILY / "instruct-v1", DEMO_FAMILY / "base-v2", tmp_path / "merged"
    ).path
    sample = 24
    merged_scores = evaluate_model(*load(merged), world, limit=sample)
    cpt_base = evaluate_model(*load(DEMO_FAMILY / "base-v2"), world, limit=sample)
    old_base = evaluate_model(*load(DEMO_FAMILY / "base-v1"), world, limit=sample)
    old_instruct = evaluate_model(*load(DEMO_FAMILY / "instruct-v1"), world, limit=sample)
    cpt_instruct = evaluate_model(*load(DEMO_FAMILY / "instruct-v1-cpt"), world, limit=sample)
    assert merged_scores["format"] >= 0.8  # the residual carries instruction following over
    assert cpt_base["format"] <= 0.1 and cpt_instruct["format"] <= 0.1  # CPT alone: no / forgotten format
    assert cpt_base["cloze_b"] >= 0.8  # CPT taught world B
    assert old_instruct["world_b_exact"] <= 0.15  # the old instruct model cannot answer about world B
    assert merged_scores["world_b_exact"] >= 0.5  # the merged model can: format and new facts together
    assert merged_scores["cloze_b"] >= old_base["cloze_b"] + 0.4  # and its knowledge is not a fluke


def test_build_script_runs_end_to_end_at_tiny_scale(tmp_path):
    out = tmp_path / "family"
    subprocess.run(
        [
            sys.executable,
            "scripts/build_demo_family.py",
            "--out",
            str(out),
            "--pretrain-steps",
            "3",
            "--sft-steps",
            "2",
            "--cpt-steps",
            "2",
            "--batch",
            "4",
        ],
        check=True,
        capture_output=True,
    )
    world = World.load(out)
    assert world.world_a and world.world_b and set(world.held_out_a) <= set(world.world_a)
    for name in ("base-v1", "instruct-v1", "base-v2", "instruct-v1-cpt", "instruct-v2"):
        model, tokenizer = load(out / name)
        assert model.config.model_type == "llama" and len(tokenizer) <= model.config.vocab_size
        ids = tokenizer("Question: Where does", return_tensors="pt").input_ids
        assert ids[0, 0] == tokenizer.bos_token_id  # prompts start like every training sequence
        assert model(ids).logits.shape[-1] == model.config.vocab_size
