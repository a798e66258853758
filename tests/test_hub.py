"""Hub I/O through the real huggingface_hub client against the local test Hub (tests/hub_server.py)."""

import shutil

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from tiny_models import load_state
from transformers import AutoModelForCausalLM

from residuals_core import Residuals, ResidualsError, compute_residuals, merge_models
from residuals_core.operations import push_to_hub

ALICE, BOB = "hf_alice_write", "hf_bob_write"


def upload(folder, repo_id, token=ALICE, private=False):
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder))
    return repo_id


@pytest.fixture
def hub_family(hub, families):
    """The llama family and a gpt2 instruct model, published on the test Hub."""
    fam = families("llama")
    return {
        "fam": fam,
        "base": upload(fam["base"], "alice/llama-base"),
        "instruct": upload(fam["instruct"], "alice/llama-instruct"),
        "target": upload(fam["target"], "alice/llama-cpt"),
        "gpt2": upload(families("gpt2")["instruct"], "alice/gpt2-instruct"),
    }


def same_as(folder, reference):
    out, ref = load_state(folder), load_state(reference)
    return sorted(out) == sorted(ref) and all(torch.equal(out[k], ref[k]) for k in ref)


def test_push_residuals_pull_by_id_apply_identical(hub, families, tmp_path):
    fam = families("llama")
    res = Residuals.from_models(fam["base"], fam["instruct"])
    url = res.push_to_hub("alice/tiny-residuals", private=True, token=ALICE)
    assert url.endswith("/alice/tiny-residuals")
    pulled = Residuals.from_pretrained("alice/tiny-residuals", token=ALICE)
    out = pulled.apply(str(fam["base"]), out_dir=tmp_path / "rebuilt")
    assert same_as(out, fam["instruct"])
    card = ModelCard.load("alice/tiny-residuals", token=ALICE)  # (reading residuals never fetches the card)
    assert 'Residuals.from_pretrained("alice/tiny-residuals")' in card.text


def test_compute_apply_merge_on_hub_ids(hub_family, tmp_path):
    h = hub_family
    compute_residuals(h["base"], h["instruct"], tmp_path / "res")
    res_cfg = Residuals.from_pretrained(tmp_path / "res").config
    assert res_cfg.base_model_name == "alice/llama-base"
    Residuals.apply_to_pretrained(model=h["base"], residuals=str(tmp_path / "res"), out_dir=tmp_path / "a")
    assert same_as(tmp_path / "a", h["fam"]["instruct"])
    result = merge_models(h["base"], h["instruct"], h["target"], tmp_path / "m")
    card = ModelCard.load(result.path / "README.md")
    assert card.data.base_model == ["alice/llama-cpt", "alice/llama-instruct"]
    assert card.data.base_model_relation == "merge"


def test_push_merged_model_loads_from_hub_by_id(hub_family, tmp_path):
    h = hub_family
    merged = merge_models(h["base"], h["instruct"], h["target"], tmp_path / "merged").path
    url = push_to_hub(merged, "residuals-lab/llama-cpt-instruct", token=ALICE)
    assert url.endswith("residuals-lab/llama-cpt-instruct")
    model = AutoModelForCausalLM.from_pretrained("residuals-lab/llama-cpt-instruct", dtype=torch.float32)
    local = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert all(torch.equal(v, local.state_dict()[k]) for k, v in model.state_dict().items())
    card = ModelCard.load("residuals-lab/llama-cpt-instruct")
    assert 'from_pretrained("residuals-lab/llama-cpt-instruct")' in card.text


def test_request_log_shows_only_ranged_header_reads(hub, hub_family, tmp_path):
    h = hub_family
    hub.log.clear()
    with pytest.raises(ResidualsError, match="not have the same tensors"):
        compute_residuals(h["base"], h["gpt2"], tmp_path / "out")
    weight_reads = [r for r in hub.log if r["path"].endswith(".safetensors") and r["method"] == "GET"]
    assert weight_reads, "the headers must have been read remotely"
    assert all(r["range"] and r["range"].startswith("bytes=0-") for r in weight_reads)
    print("\nrequest log of a header-only rejection:")
    for r in hub.log:
        print(f"  {r['method']:4} {r['path']}" + (f"  Range: {r['range']}" if r["range"] else ""))


def test_private_repo_invisible_to_others(hub, families, tmp_path):
    upload(families("llama")["instruct"], "alice/secret", private=True)
    with pytest.raises(ResidualsError, match=r"not found on the Hub.*private"):
        Residuals.from_pretrained("alice/secret", token=BOB)
    with pytest.raises(ResidualsError, match="not found on the Hub"):
        compute_residuals("alice/secret", "alice/secret", tmp_path / "o")  # anonymous


def test_wrong_token_clear_error_nothing_created(hub, families):
    fam = families("llama")
    res = Residuals.from_models(fam["base"], fam["instruct"])
    with pytest.raises(ResidualsError, match="did not accept the token"):
        res.push_to_hub("alice/never", token="hf_wrong")
    assert "alice/never" not in hub.repos


def test_foreign_namespace_refused(hub, families):
    fam = families("llama")
    res = Residuals.from_models(fam["base"], fam["instruct"])
    with pytest.raises(ResidualsError, match=r"cannot write to the namespace 'alice'.*bob"):
        res.push_to_hub("alice/not-yours", token=BOB)
    assert "alice/not-yours" not in hub.repos


def test_failed_commit_keeps_the_uploads_and_a_rerun_finishes_it(hub, families):
    fam = families("llama")
    res = Residuals.from_models(fam["base"], fam["instruct"])
    hub.fail_next_commit = True
    with pytest.raises(
        ResidualsError, match="alice/broken-push, created by this run, was kept without a commit"
    ):
        res.push_to_hub("alice/broken-push", token=ALICE)
    assert set(hub.repos["alice/broken-push"].head[1]) == {".gitattributes"}  # nothing half-published
    res.push_to_hub("alice/broken-push", token=ALICE)
    assert "model.safetensors" in hub.repos["alice/broken-push"].head[1]


def test_bin_only_repo_refused_before_download(hub, families, tmp_path):
    fam = families("llama")
    folder = tmp_path / "pickled"
    shutil.copytree(fam["base"], folder)
    torch.save(load_state(folder), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    upload(folder, "alice/pickled")
    hub.log.clear()
    with pytest.raises(ResidualsError, match=r"only pickle checkpoints.*arbitrary code"):
        compute_residuals("alice/pickled", fam["instruct"], tmp_path / "out")
    assert not [r for r in hub.log if r["path"].endswith(".bin")]
