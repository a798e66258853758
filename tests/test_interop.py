"""Both directions with the real `residuals` 0.3.2 package."""

import json

import pytest
import residuals as upstream
import torch
from tiny_models import load_state
from transformers import AutoModelForCausalLM

from residuals_core import Residuals, apply_residuals, compute_residuals


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_upstream_version():
    assert upstream.__version__ == "0.3.2"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_folder_saved_by_upstream_loads_and_applies_here(families, tmp_path, arch):
    fam = families(arch)
    theirs = upstream.Residuals.from_models(str(fam["base"]), str(fam["instruct"]))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    if arch == "gpt2":  # upstream stores the tied lm_head too
        assert "lm_head.weight" in load_state(tmp_path / "theirs")
    ours = Residuals.from_pretrained(tmp_path / "theirs")
    assert ours.config.shapes_hash == theirs.config.shapes_hash
    # streamed, file to file
    apply_residuals(tmp_path / "theirs", fam["base"], tmp_path / "streamed")
    inst = load_state(fam["instruct"])
    out = load_state(tmp_path / "streamed")
    assert sorted(out) == sorted(inst) and all(torch.equal(out[k], inst[k]) for k in inst)
    # in memory, on an instance
    base = load(fam["base"])
    ours.apply(base)
    reference = load(fam["instruct"])
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_folder_saved_here_loads_and_applies_upstream(families, tmp_path, arch):
    fam = families(arch)
    compute_residuals(fam["base"], fam["instruct"], tmp_path / "ours", max_shard_size="40KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    raw = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs = upstream.Residuals.from_pretrained(str(tmp_path / "ours"))
    assert theirs.config.shapes_hash == raw["shapes_hash"]
    base = load(fam["base"])
    merged = theirs.apply(base)
    reference = load(fam["instruct"])
    for name, value in merged.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name


def test_upstream_to_loses_metadata_ours_keeps_it(families):
    """The reason `to()` is reimplemented: upstream drops the lineage fields."""
    fam = families("llama")
    base, inst = load(fam["base"]), load(fam["instruct"])
    theirs = upstream.Residuals.from_models(base, inst).to(dtype=torch.float16)
    ours = Residuals.from_models(base, inst).to(dtype=torch.float16)
    assert theirs.config.base_model_name is None
    assert ours.config.base_model_name == inst.config.name_or_path.replace("instruct", "base")
