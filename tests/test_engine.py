"""The streaming engine through folders: exactness, shards, tied and padded vocabularies, dtypes."""

import json

import pytest
import torch
from tiny_models import load_state
from transformers import AutoModelForCausalLM

from residuals_core import apply_residuals, compute_residuals, merge_models


def assert_same_state(a_folder, b_folder):
    a, b = load_state(a_folder), load_state(b_folder)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_compute_then_apply_reproduces_instruct_bit_for_bit(families, tmp_path, arch):
    fam = families(arch)
    result = compute_residuals(fam["base"], fam["instruct"], tmp_path / "res")
    assert result.reconstruction["exact"] and result.reconstruction["mismatched_elements"] == 0
    residual = load_state(tmp_path / "res")
    base, inst = load_state(fam["base"]), load_state(fam["instruct"])
    assert all(r.dtype == torch.float32 for r in residual.values())
    for name in inst:
        assert torch.equal(residual[name], inst[name] - base[name]), name
    apply_residuals(tmp_path / "res", fam["base"], tmp_path / "rebuilt")
    assert_same_state(tmp_path / "rebuilt", fam["instruct"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt")
    reference = AutoModelForCausalLM.from_pretrained(fam["instruct"])
    ids = torch.tensor([[1, 5, 9, 20, 7]])
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_bf16_checkpoints_sharded_round_trip_exact(families, tmp_path):
    fam = families("llama", dtype=torch.bfloat16, max_shard_size="20KB")
    assert (fam["base"] / "model.safetensors.index.json").is_file()
    compute_residuals(fam["base"], fam["instruct"], tmp_path / "res", max_shard_size="30KB")
    index = json.loads((tmp_path / "res" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    apply_residuals(tmp_path / "res", fam["base"], tmp_path / "rebuilt", max_shard_size="25KB")
    assert_same_state(tmp_path / "rebuilt", fam["instruct"])  # bf16 output, as the target
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt")
    assert model.dtype == torch.bfloat16


def test_one_pass_merge_equals_compute_then_apply(families, tmp_path):
    fam = families("qwen2")
    compute_residuals(fam["base"], fam["instruct"], tmp_path / "res")
    apply_residuals(tmp_path / "res", fam["target"], tmp_path / "applied", scale=0.7)
    merge_models(fam["base"], fam["instruct"], fam["target"], tmp_path / "merged", scale=0.7)
    assert_same_state(tmp_path / "applied", tmp_path / "merged")
    target, base, inst = (load_state(fam[k]) for k in ("target", "base", "instruct"))
    merged = load_state(tmp_path / "merged")
    name = "model.layers.0.self_attn.q_proj.bias"
    assert torch.equal(merged[name], target[name] + 0.7 * (inst[name] - base[name]))


def test_merged_folder_is_complete_and_loads(families, tmp_path):
    fam = families("llama")
    result = merge_models(fam["base"], fam["instruct"], fam["target"], tmp_path / "merged", dtype="bfloat16")
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
    } <= files
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_state(tmp_path / "merged").values())
    assert result.summary["layers"][0]["layer"] == "embed"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.dtype == torch.bfloat16


def test_tied_embeddings_added_once(families, tmp_path):
    fam = families("gpt2")
    assert "lm_head.weight" not in load_state(fam["base"])  # tied: stored once
    compute_residuals(fam["base"], fam["instruct"], tmp_path / "res")
    assert "lm_head.weight" not in load_state(tmp_path / "res")
    apply_residuals(tmp_path / "res", fam["target"], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    target, base, inst = (load_state(fam[k]) for k in ("target", "base", "instruct"))
    expected = target["transformer.wte.weight"] + (
        inst["transformer.wte.weight"] - base["transformer.wte.weight"]
    )
    assert torch.equal(model.lm_head.weight.detach(), expected)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_added_tokens_are_captured_and_base_is_grown(families, tmp_path):
    fam = families("llama", added_tokens=2)
    base_rows = load_state(fam["base"])["model.embed_tokens.weight"].shape[0]
    result = compute_residuals(fam["base"], fam["instruct"], tmp_path / "res")
    residual = load_state(tmp_path / "res")
    inst = load_state(fam["instruct"])
    assert residual["model.embed_tokens.weight"].shape[0] == base_rows + 2
    # the new rows' residual is the instruct rows themselves (base rows are zero there)
    assert torch.equal(residual["lm_head.weight"][base_rows:], inst["lm_head.weight"][base_rows:])
    assert any("vocabulary rows aligned" in n for n in result.notes)
    apply_residuals(tmp_path / "res", fam["base"], tmp_path / "rebuilt")
    assert_same_state(tmp_path / "rebuilt", fam["instruct"])
    config = json.loads((tmp_path / "rebuilt" / "config.json").read_text())
    assert config["vocab_size"] == base_rows + 2
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "rebuilt")) == base_rows + 2


def test_padded_embeddings_are_never_shrunk(tmp_path):
    """Qwen2.5-style: embedding rows beyond the tokenizer's length stay."""
    from tiny_models import build_tokenizer, make_model, perturbed, save

    tok = build_tokenizer()
    rows = len(tok) + 37
    base = make_model("qwen2", rows, seed=1)
    save(base, tok, tmp_path / "base")
    save(perturbed(base, seed=2), tok, tmp_path / "inst")
    compute_residuals(tmp_path / "base", tmp_path / "inst", tmp_path / "res")
    assert load_state(tmp_path / "res")["model.embed_tokens.weight"].shape[0] == rows
    apply_residuals(tmp_path / "res", tmp_path / "base", tmp_path / "out")
    assert_same_state(tmp_path / "out", tmp_path / "inst")


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_half_storage_halves_size_and_reports_error(families, tmp_path, storage):
    fam = families("llama")
    full = compute_residuals(fam["base"], fam["instruct"], tmp_path / "full")
    half = compute_residuals(fam["base"], fam["instruct"], tmp_path / "half", dtype=storage)
    size = lambda folder: (folder / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "half") < 0.55 * size(tmp_path / "full")
    assert full.reconstruction["exact"]
    assert not half.reconstruction["exact"] and half.reconstruction["mismatched_elements"] > 0
    assert 0 < half.reconstruction["max_abs_error"] < 1e-3
    manifest = json.loads((tmp_path / "half" / "residuals_manifest.json").read_text())
    assert manifest["reconstruction"]["mismatched_elements"] == half.reconstruction["mismatched_elements"]
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == storage


def test_buffers_and_integer_tensors_in_checkpoints(tmp_path):
    """Any tensor in the file is handled by name and shape — float buffers and integer ones too."""
    from safetensors.torch import save_file
    from tiny_models import build_tokenizer

    for name, shift in (("base", 0), ("inst", 1), ("target", 2)):
        folder = tmp_path / name
        folder.mkdir()
        save_file(
            {
                "w": torch.full((4, 3), float(shift)),
                "rotary.inv_freq": torch.linspace(0, 1, 8) * (1 + shift),
                "position_ids": torch.arange(6) + shift,
                "scalar": torch.tensor(1.5 + shift),
            },
            folder / "model.safetensors",
            metadata={"format": "pt"},
        )
        (folder / "config.json").write_text(json.dumps({"model_type": "custom"}))
        build_tokenizer().save_pretrained(folder)
    merge_models(tmp_path / "base", tmp_path / "inst", tmp_path / "target", tmp_path / "out")
    out = load_state(tmp_path / "out")
    assert torch.equal(out["position_ids"], torch.arange(6) + 3)
    assert out["position_ids"].dtype == torch.int64
    assert torch.equal(out["scalar"], torch.tensor(4.5))
    assert torch.allclose(out["rotary.inv_freq"], torch.linspace(0, 1, 8) * 4)


def test_tensors_larger_than_the_buffer_are_read_in_pieces(families, tmp_path, monkeypatch):
    """Stream, don't load: no read is larger than the piece size, and the result is still exact."""
    from residuals_core import arithmetic
    from residuals_core.checkpoint import Checkpoint

    piece_bytes = 4096
    monkeypatch.setattr(arithmetic, "DEFAULT_PIECE_BYTES", piece_bytes)
    largest = {"elements": 0}
    real_read = Checkpoint.read_elements

    def spy(self, name, start, stop, out=None):
        largest["elements"] = max(largest["elements"], stop - start)
        return real_read(self, name, start, stop, out)

    monkeypatch.setattr(Checkpoint, "read_elements", spy)
    fam = families("llama")
    embed_bytes = load_state(fam["base"])["model.embed_tokens.weight"].numel() * 4
    assert embed_bytes > 8 * piece_bytes
    compute_residuals(fam["base"], fam["instruct"], tmp_path / "res")
    apply_residuals(tmp_path / "res", fam["base"], tmp_path / "rebuilt")
    assert 0 < largest["elements"] * 4 <= piece_bytes
    assert_same_state(tmp_path / "rebuilt", fam["instruct"])
