"""Hub I/O through the real huggingface_hub client against the local test Hub."""

import pytest
import torch
from tiny_models import load_state

from residuals_core import Residuals


@pytest.fixture
def pushed_residuals(hub, families, tmp_path):
    fam = families("llama")
    res = Residuals.from_models(fam["base"], fam["instruct"])
    url = res.push_to_hub("alice/tiny-residuals", private=True, token="hf_alice_write")
    return fam, url


def test_push_pull_apply_round_trip(pushed_residuals, hub, tmp_path):
    fam, url = pushed_residuals
    assert url.endswith("alice/tiny-residuals")
    assert hub.repos["alice/tiny-residuals"].private
    res = Residuals.from_pretrained("alice/tiny-residuals", token="hf_alice_write")
    out = res.apply(str(fam["base"]), out_dir=tmp_path / "rebuilt")
    inst, rebuilt = load_state(fam["instruct"]), load_state(out)
    assert all(torch.equal(rebuilt[k], inst[k]) for k in inst)
