"""Bad input fails early, from headers, with a message that says what to do — and writes nothing."""

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build_tokenizer, make_model, save

from residuals_core import (
    Residuals,
    ResidualsError,
    apply_residuals,
    compute_residuals,
    merge_models,
    sinks,
)


def test_unknown_local_path(tmp_path):
    with pytest.raises(ResidualsError, match=r"base model: No folder at .*Check the path"):
        compute_residuals(tmp_path / "nope", tmp_path / "nope2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_is_clear(tmp_path, monkeypatch):
    import socket

    with socket.socket() as sock:  # a local port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(ResidualsError, match=r"base model: Could not reach the Hub.*network connection"):
        compute_residuals("no-such-org/no-such-model", "no-such-org/other", tmp_path / "out")


def test_unknown_hub_id_is_clear(tmp_path, hub):
    with pytest.raises(ResidualsError, match=r"no-such-org/no-such-model was not found on the Hub.*spelling"):
        compute_residuals("no-such-org/no-such-model", "no-such-org/other", tmp_path / "out")


def test_folder_without_weights(tmp_path, families):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResidualsError, match="no model weights"):
        compute_residuals(tmp_path / "empty", families("llama")["instruct"], tmp_path / "out")


def test_pickle_refused_unless_opted_in(tmp_path, families):
    fam = families("llama")
    for role in ("base", "instruct"):
        folder = tmp_path / role
        shutil.copytree(fam[role], folder)
        from tiny_models import load_state

        torch.save(load_state(folder), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    with pytest.raises(ResidualsError, match=r"pickle.*arbitrary code.*allow_pickle=True"):
        compute_residuals(tmp_path / "base", tmp_path / "instruct", tmp_path / "out")
    result = compute_residuals(tmp_path / "base", tmp_path / "instruct", tmp_path / "out", allow_pickle=True)
    assert result.reconstruction["exact"]


def test_different_architectures_named(tmp_path, families):
    with pytest.raises(ResidualsError, match=r"not have the same tensors.*transformer\.h\.0"):
        compute_residuals(families("llama")["base"], families("gpt2")["instruct"], tmp_path / "out")


def test_different_sizes_name_the_tensors(tmp_path):
    tok = build_tokenizer()
    save(make_model("llama", len(tok), seed=1), tok, tmp_path / "a")
    from tiny_models import model_config
    from transformers import AutoModelForCausalLM

    cfg = model_config("llama", len(tok))
    cfg.intermediate_size = 96
    torch.manual_seed(0)
    save(AutoModelForCausalLM.from_config(cfg), tok, tmp_path / "b")
    with pytest.raises(
        ResidualsError,
        match=r"different shapes: model\.layers\.0\.mlp\.down_proj\.weight: base \[32, 64\] vs instruct \[32, 96\]",
    ):
        compute_residuals(tmp_path / "a", tmp_path / "b", tmp_path / "out")


def test_vocab_mismatch_says_normalize_would_fix(tmp_path, families):
    fam = families("llama", added_tokens=2)
    with pytest.raises(ResidualsError, match=r"vocabulary rows.*normalize_embeddings=True"):
        compute_residuals(fam["base"], fam["instruct"], tmp_path / "out", normalize_embeddings=False)


def test_residuals_on_another_architecture(tmp_path, families):
    compute_residuals(families("llama")["base"], families("llama")["instruct"], tmp_path / "res")
    with pytest.raises(ResidualsError, match=r"shapes_hash"):
        apply_residuals(tmp_path / "res", families("qwen2")["base"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_given_as_residuals(tmp_path, families):
    fam = families("llama")
    with pytest.raises(ResidualsError, match="looks like a model, not residuals"):
        apply_residuals(fam["instruct"], fam["base"], tmp_path / "out")


def test_nan_in_result_aborts_without_output(tmp_path, families):
    fam = families("llama")
    broken = tmp_path / "broken"
    shutil.copytree(fam["instruct"], broken)
    from tiny_models import load_state

    state = load_state(broken)
    state["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ResidualsError, match=r"up_proj.*NaN or Inf.*broken"):
        compute_residuals(fam["base"], broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_not_enough_disk(tmp_path, families, monkeypatch):
    fam = families("llama")
    real = shutil.disk_usage

    def tiny_disk(path):
        usage = real(path)
        return usage._replace(free=1000)

    monkeypatch.setattr(sinks.shutil, "disk_usage", tiny_disk)
    with pytest.raises(ResidualsError, match=r"Not enough free disk.*needs about"):
        compute_residuals(fam["base"], fam["instruct"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_not_overwritten_without_flag(tmp_path, families):
    fam = families("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ResidualsError, match=r"already exists.*overwrite=True"):
        compute_residuals(fam["base"], fam["instruct"], out)
    assert (out / "precious.txt").read_text() == "keep me"
    compute_residuals(fam["base"], fam["instruct"], out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()


def test_failed_overwrite_keeps_old_folder(tmp_path, families):
    fam = families("llama")
    out = tmp_path / "out"
    compute_residuals(fam["base"], fam["instruct"], out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ResidualsError):
        compute_residuals(fam["base"], families("gpt2")["instruct"], out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before


def _flip_a_byte(weights) -> bytearray:
    """Corrupt one byte near the end of a weight file (as a bad copy would); return the new bytes."""
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    return data


def test_tampered_or_truncated_files_refused(tmp_path, families):
    fam = families("llama")
    compute_residuals(fam["base"], fam["instruct"], tmp_path / "res")
    weights = tmp_path / "res" / "model.safetensors"
    data = _flip_a_byte(weights)
    with pytest.raises(ResidualsError, match=r"model\.safetensors does not match its recorded checksum"):
        Residuals.from_pretrained(tmp_path / "res")
    # apply hashes while it streams, and publishes nothing when the hash turns out wrong
    with pytest.raises(ResidualsError, match=r"model\.safetensors does not match its recorded checksum"):
        apply_residuals(tmp_path / "res", fam["base"], tmp_path / "applied")
    assert not (tmp_path / "applied").exists() and not list(tmp_path.glob(".applied.partial-*"))
    weights.write_bytes(bytes(data[: len(data) // 2]))
    # the header check (at open) or the manifest's size check names the truncated file
    with pytest.raises(
        ResidualsError, match=r"model\.safetensors (is truncated|has \d+ bytes, \d+ were written)"
    ):
        Residuals.from_pretrained(tmp_path / "res")
    # without a manifest (e.g. a truncated upstream folder) the header check still catches it
    (tmp_path / "res" / "residuals_manifest.json").unlink()
    with pytest.raises(ResidualsError, match=r"model\.safetensors is truncated"):
        apply_residuals(tmp_path / "res", fam["base"], tmp_path / "out")


def test_manifests_with_only_sha256_are_still_checked(tmp_path, families):
    """Folders written before the quick checksum existed are verified by their sha256."""
    fam = families("llama")
    compute_residuals(fam["base"], fam["instruct"], tmp_path / "res")
    manifest_path = tmp_path / "res" / "residuals_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"].values():
        assert entry.pop("xxh3_64")
    manifest_path.write_text(json.dumps(manifest))
    Residuals.from_pretrained(tmp_path / "res")  # intact: accepted
    _flip_a_byte(tmp_path / "res" / "model.safetensors")
    with pytest.raises(ResidualsError, match=r"model\.safetensors does not match its recorded checksum"):
        Residuals.from_pretrained(tmp_path / "res")


def test_a_check_started_early_stands_only_for_the_very_same_file(tmp_path, families, monkeypatch):
    """The command line starts hashing a residuals folder while torch loads; apply takes that result
    instead of reading the file again, but never for a file changed since."""
    from waits import wait_for

    from residuals_core import checksums
    from residuals_core.manifest import check_files_early

    fam = families("llama")
    compute_residuals(fam["base"], fam["instruct"], tmp_path / "res")
    weights = tmp_path / "res" / "model.safetensors"
    hashed: list[str] = []
    real = checksums.read_checksums

    def counted(path, sums):
        digests = real(path, sums)
        hashed.append(path.name)
        return digests

    monkeypatch.setattr(checksums, "read_checksums", counted)
    check_files_early(tmp_path / "res")
    apply_residuals(tmp_path / "res", fam["base"], tmp_path / "applied")
    assert hashed.count("model.safetensors") == 1  # the early check's, taken by apply's own
    check_files_early(tmp_path / "res")
    wait_for(lambda: hashed.count("model.safetensors") == 2, what="the early check of the intact file")
    time.sleep(0.05)  # a later tick of the file system's clock than the check's
    _flip_a_byte(weights)  # altered after it was found intact
    with pytest.raises(ResidualsError, match=r"model\.safetensors does not match its recorded checksum"):
        apply_residuals(tmp_path / "res", fam["base"], tmp_path / "applied-again")
    assert not (tmp_path / "applied-again").exists()


def test_missing_instruct_tokenizer_fails_before_work(tmp_path, families):
    fam = families("llama")
    inst = tmp_path / "inst"
    shutil.copytree(fam["instruct"], inst)
    for f in inst.glob("tokenizer*"):
        f.unlink()
    start = time.monotonic()
    with pytest.raises(ResidualsError, match=r"no tokenizer files.*instruct_tokenizer_name"):
        compute_residuals(fam["base"], inst, tmp_path / "out")
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


def test_bad_dtype_and_scale_messages(tmp_path, families):
    fam = families("llama")
    with pytest.raises(ResidualsError, match="Unknown dtype 'float8'"):
        compute_residuals(fam["base"], fam["instruct"], tmp_path / "out", dtype="float8")
    with pytest.raises(ResidualsError, match="not a floating-point"):
        merge_models(fam["base"], fam["instruct"], fam["target"], tmp_path / "out", dtype="int8")


def test_target_without_config(tmp_path, families):
    fam = families("llama")
    compute_residuals(fam["base"], fam["instruct"], tmp_path / "res")
    target = tmp_path / "target"
    shutil.copytree(fam["target"], target)
    (target / "config.json").unlink()
    with pytest.raises(ResidualsError, match=r"has no config.json"):
        apply_residuals(tmp_path / "res", target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_index_listing_missing_shard(tmp_path, families):
    fam = families("llama", max_shard_size="20KB")
    broken = tmp_path / "b"
    shutil.copytree(fam["base"], broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (broken / victim).unlink()
    with pytest.raises(ResidualsError, match=r"shard\(s\).*missing"):
        compute_residuals(broken, fam["instruct"], tmp_path / "out")


@pytest.mark.parametrize("device", ["tpu", "mps", "cuda"])
def test_unusable_device_refused_before_work(tmp_path, families, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    fam = families("llama")
    with pytest.raises(ResidualsError, match=r"device") as info:
        merge_models(fam["base"], fam["instruct"], fam["base"], tmp_path / "out", device=device)
    assert "'cpu'" in info.value.fix  # says what to use instead
    assert not (tmp_path / "out").exists()
