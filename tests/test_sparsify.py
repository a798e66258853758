"""DARE and magnitude trimming: exact, reproducible, streamed, and read by `residuals` 0.3.2."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import load_state

from residuals_core import ResidualsError
from residuals_core.cli import main
from residuals_core.operations import sparsify_residuals


def floats(state: dict) -> dict:
    return {k: v for k, v in state.items() if v.dtype.is_floating_point}


def test_dare_zero_is_the_identity(llama_residuals, tmp_path):
    _, folder = llama_residuals
    sparsify_residuals(folder, tmp_path / "same", dare=0.0)
    full, same = load_state(folder), load_state(tmp_path / "same")
    assert all(torch.equal(full[k], same[k]) for k in full)


def test_dare_drops_p_and_rescales_and_is_reproducible(llama_residuals, tmp_path):
    _, folder = llama_residuals
    sparsify_residuals(folder, tmp_path / "a", dare=0.9, seed=7)
    sparsify_residuals(folder, tmp_path / "b", dare=0.9, seed=7, piece_bytes=4096)  # other pieces, same draw
    sparsify_residuals(folder, tmp_path / "c", dare=0.9, seed=8)
    full, a, b, c = (floats(load_state(p)) for p in (folder, tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    kept = sum(int(torch.count_nonzero(v)) for v in a.values())
    total = sum(v.numel() for v in full.values())
    assert abs(kept / total - 0.1) < 0.01  # about 10% survive
    for name, value in a.items():
        survivors = value != 0
        assert torch.allclose(value[survivors], full[name][survivors] / (1 - 0.9), rtol=1e-6)


def test_trim_keeps_exactly_the_largest_magnitudes(llama_residuals, tmp_path):
    _, folder = llama_residuals
    sparsify_residuals(folder, tmp_path / "t", trim=0.2)
    full, trimmed = floats(load_state(folder)), floats(load_state(tmp_path / "t"))
    for name, value in full.items():
        magnitudes = value.abs().reshape(-1)
        k = math.ceil(0.2 * magnitudes.numel())
        kth_largest = torch.topk(magnitudes, k).values[-1]
        expected = torch.where(value.abs() >= kth_largest, value, torch.zeros_like(value))
        assert torch.equal(trimmed[name], expected), name
    card = (tmp_path / "t" / "README.md").read_text()
    assert "20% largest magnitudes" in card


def test_trimmed_folder_loads_in_residuals_032(llama_residuals, tmp_path, monkeypatch):
    import tempfile

    import residuals as upstream

    fam, _ = llama_residuals
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the exact residuals wait
    assert main(["compute", "--base", str(fam["base"]), "--instruct", str(fam["instruct"]), "--trim", "0.5",
                 "--dare", "0.5", "--out", str(tmp_path / "cli"), "--quiet"]) == 0  # fmt: skip
    theirs = upstream.Residuals.from_pretrained(str(tmp_path / "cli"))
    ours = floats(load_state(tmp_path / "cli"))
    assert all(torch.equal(theirs.state_dict[k].float(), ours[k].float()) for k in ours)
    assert not list(scratch.iterdir())  # the exact residuals' temporary folder is gone


def test_bad_values_refused(llama_residuals, tmp_path):
    _, folder = llama_residuals
    with pytest.raises(ResidualsError, match=r"not in \[0, 1\)"):
        sparsify_residuals(folder, tmp_path / "x", dare=1.0)
    with pytest.raises(ResidualsError, match=r"not in \(0, 1\]"):
        sparsify_residuals(folder, tmp_path / "x", trim=0)
    with pytest.raises(ResidualsError, match="Nothing to do"):
        sparsify_residuals(folder, tmp_path / "x")
    assert not (tmp_path / "x").exists()
