"""The public API, mirroring the `residuals` package: instances in memory, paths streamed."""

import json
from pathlib import Path

import pytest
import torch
from tiny_models import load_state
from transformers import AutoModelForCausalLM, AutoTokenizer

from residuals_core import Residuals, ResidualsConfig, ResidualsError


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def assert_models_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_instances_exact_and_in_place(families, arch):
    fam = families(arch)
    base, inst = load(fam["base"]), load(fam["instruct"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    res = Residuals.from_models(base, inst)
    assert isinstance(res.config, ResidualsConfig) and res.config.dtype == "float32"
    assert res.instruct_tokenizer is not None  # inferred from the instance's name_or_path
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # inputs untouched
    returned = res.apply(base)
    assert returned is base  # updated in place, as the residuals package does
    assert_models_equal(base, inst)


def test_tied_instance_not_double_added(families):
    fam = families("gpt2")
    base, inst = load(fam["base"]), load(fam["instruct"])
    res = Residuals.from_models(base, inst)
    assert "lm_head.weight" not in res.state_dict
    res.apply(base)
    assert torch.equal(base.lm_head.weight, inst.lm_head.weight)


def test_paths_are_lazy_and_stream_into_save(families, tmp_path):
    fam = families("llama")
    res = Residuals.from_models(str(fam["base"]), str(fam["instruct"]))
    assert res._pending is not None and res._folder is None  # nothing computed yet
    res.config.license = "apache-2.0"
    res.config.language = "en"
    res.config.tags = ["residuals", "llama", "finetune"]
    out = res.save_pretrained(tmp_path / "res")
    assert res._folder == out
    config = json.loads((out / "config.json").read_text())
    assert config["license"] == "apache-2.0" and config["tags"] == ["residuals", "llama", "finetune"]
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "language:" in card
    loaded = Residuals.from_pretrained(out)
    assert loaded.config.license == "apache-2.0"
    assert loaded.config.shapes_hash == res.config.shapes_hash
    base = load(fam["base"])
    loaded.apply(base)
    assert_models_equal(base, load(fam["instruct"]))


def test_from_pretrained_reads_tensors_on_demand(families, tmp_path):
    fam = families("qwen2")
    Residuals.from_models(fam["base"], fam["instruct"]).save_pretrained(tmp_path / "res")
    res = Residuals.from_pretrained(tmp_path / "res")
    assert res._memory is None
    name = "model.layers.0.self_attn.q_proj.bias"
    base, inst = load_state(fam["base"]), load_state(fam["instruct"])
    assert torch.equal(res.state_dict[name], inst[name] - base[name])
    assert len(res.state_dict) == len(inst)


def test_apply_to_pretrained_streams_to_folder(families, tmp_path):
    fam = families("qwen2")
    Residuals.from_models(fam["base"], fam["instruct"]).save_pretrained(tmp_path / "res")
    out = Residuals.apply_to_pretrained(
        model=str(fam["base"]), residuals=str(tmp_path / "res"), out_dir=tmp_path / "m"
    )
    assert out == (tmp_path / "m").absolute()
    assert_models_equal(load(out), load(fam["instruct"]))
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(fam["instruct"]))


def test_apply_by_name_loads_and_returns_model(families, tmp_path):
    fam = families("llama")
    res = Residuals.from_models(fam["base"], fam["instruct"])
    model = res.apply(base_model=str(fam["base"]), model_dtype=torch.float32)
    assert_models_equal(model, load(fam["instruct"]))


def test_lazy_apply_with_out_dir_is_one_pass_merge(families, tmp_path):
    fam = families("llama")
    res = Residuals.from_models(fam["base"], fam["instruct"])
    out = res.apply(str(fam["base"]), out_dir=tmp_path / "m")
    assert res._folder is None  # no residuals were written anywhere
    assert_models_equal(load(out), load(fam["instruct"]))


def test_to_keeps_every_piece_of_metadata(families, tmp_path):
    fam = families("llama")
    res = Residuals.from_models(load(fam["base"]), load(fam["instruct"]))
    res.config.license = "mit"
    half = res.to(dtype=torch.bfloat16)
    assert half.config.dtype == "bfloat16" and res.config.dtype == "float32"
    for field in (
        "base_model_name",
        "instruct_model_name",
        "tokenizer_name",
        "license",
        "shapes_hash",
        "tags",
    ):
        assert getattr(half.config, field) == getattr(res.config, field), field
    assert all(t.dtype == torch.bfloat16 for t in half.state_dict.values())
    assert all(t.dtype == torch.float32 for t in res.state_dict.values())
    saved = Residuals.from_pretrained(half.save_pretrained(tmp_path / "half"))
    assert saved.config.dtype == "bfloat16"
    # what travels with a result names a local input by its folder name, never by its path
    assert saved.config.base_model_name == Path(res.config.base_model_name).name
    # a file-backed object casts on read and on save
    lazy_half = Residuals.from_pretrained(res.save_pretrained(tmp_path / "full")).to(dtype="float16")
    assert next(iter(lazy_half.state_dict.values())).dtype == torch.float16
    lazy_half.save_pretrained(tmp_path / "f16")
    assert all(t.dtype == torch.float16 for t in load_state(tmp_path / "f16").values())


def test_scale_is_applied(families):
    fam = families("llama")
    base, inst = load(fam["base"]), load(fam["instruct"])
    expected = base.model.norm.weight + 0.5 * (inst.model.norm.weight - base.model.norm.weight)
    Residuals.from_models(base, inst).apply(base, scale=0.5)
    assert torch.allclose(base.model.norm.weight, expected, atol=0, rtol=1e-6)


def test_shape_mismatch_error_with_hint(families):
    fam = families("llama", added_tokens=2)
    res = Residuals.from_models(fam["base"], fam["instruct"])
    base = load(fam["base"])
    with pytest.raises(ValueError, match=r"Shape mismatch for .*set normalize_embeddings=True"):
        res.apply(base, normalize_embeddings=False)
    with pytest.raises(ResidualsError, match="normalize_embeddings=True"):
        Residuals.from_models(fam["base"], fam["instruct"], normalize_embeddings=False)


def test_normalize_grows_instance_with_zero_rows(families):
    fam = families("llama", added_tokens=2)
    res = Residuals.from_models(load(fam["base"]), load(fam["instruct"]))
    base = load(fam["base"])
    res.apply(base)
    assert_models_equal(base, load(fam["instruct"]))


def test_save_without_tokenizer_is_refused(families, tmp_path):
    fam = families("llama")
    base, inst = load(fam["base"]), load(fam["instruct"])
    inst.config.name_or_path = ""
    inst.config._name_or_path = ""
    res = Residuals.from_models(base, inst)
    with pytest.raises(ResidualsError, match="instruct_tokenizer"):
        res.save_pretrained(tmp_path / "res")
    assert not (tmp_path / "res").exists()


def test_pad_alignment_when_not_normalizing(tmp_path):
    """The residuals package's path: base tokenizer lacks PAD, instruct has it -> PAD added, rows zeroed."""
    from tiny_models import build_tokenizer, make_model, perturbed, save

    base_tok, inst_tok = build_tokenizer(), build_tokenizer()
    inst_tok.add_special_tokens({"pad_token": "[PAD]"})
    base = make_model("llama", len(base_tok), seed=1)
    inst = perturbed(base, seed=2)
    inst.resize_token_embeddings(len(inst_tok), mean_resizing=False)
    save(base, base_tok, tmp_path / "base")
    save(inst, inst_tok, tmp_path / "inst")
    res = Residuals.from_models(tmp_path / "base", tmp_path / "inst")
    target, target_tok = load(tmp_path / "base"), build_tokenizer()
    assert target_tok.pad_token is None
    res.apply(target, base_tokenizer=target_tok, normalize_embeddings=False)
    assert target_tok.pad_token == "[PAD]" and len(target_tok) == len(inst_tok)
    assert_models_equal(target, load(tmp_path / "inst"))
