"""Atomic outputs under a kill, the command line, and the model cards."""

import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import load_state
from transformers import AutoModelForCausalLM

from residuals_core import Residuals, ResidualsError, compute_residuals
from residuals_core.card import merged_card
from residuals_core.writer import file_digest

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def run_cli(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "residuals_core", *map(str, args)], capture_output=True, text=True, env=ENV
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_kill_mid_write_leaves_nothing_that_looks_complete(tmp_path, families):
    fam = families("llama", dtype=torch.bfloat16)
    script = textwrap.dedent(
        f"""
        import os, signal
        from residuals_core import compute_residuals
        def progress(done, total, name):
            if done == total // 2:
                os.kill(os.getpid(), signal.SIGKILL)
        compute_residuals({str(fam["base"])!r}, {str(fam["instruct"])!r}, {str(tmp_path / "out")!r},
                          max_shard_size="30KB", progress=progress)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=ENV)
    assert proc.returncode == -9
    assert not (tmp_path / "out").exists()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    assert len(leftovers) == 1 and list(leftovers[0].glob("*.safetensors"))  # it really was mid-write
    compute_residuals(fam["base"], fam["instruct"], tmp_path / "out")  # a rerun works and tidies up
    assert not list(tmp_path.glob(".out.partial-*"))
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_shard_writer_fills_pieces_in_place_through_a_few_blocks(tmp_path):
    """Pieces from buffer() sit where the file needs them (no copy), a bounded pool of blocks is reused."""
    from safetensors.torch import load_file

    from residuals_core.checkpoint import TensorInfo
    from residuals_core.dtypes import FLOAT32
    from residuals_core.writer import BLOCKS_IN_FLIGHT, ShardWriter

    expected = torch.arange(200 * 64 * 64, dtype=torch.float32).reshape(200 * 64, 64)
    writer = ShardWriter(tmp_path, [TensorInfo("w", FLOAT32, (200 * 64, 64))])
    appended = []
    real_append = writer._append
    writer._append = lambda data: (appended.append(len(memoryview(data))), real_append(data))
    for rows in expected.split(256):  # 64 KB pieces, 3.2 MB in all
        piece = writer.buffer(FLOAT32, rows.numel())
        piece[:] = rows.reshape(-1).numpy()
        writer.write("w", piece)
    manifest = writer.close()
    assert writer._blocks_made <= BLOCKS_IN_FLIGHT
    assert len(appended) == 1 and appended[0] < 1024  # only the header was copied: every piece was in place
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], expected)
    assert manifest["model.safetensors"] == file_digest(tmp_path / "model.safetensors")


@pytest.mark.parametrize("direct", [True, False])
def test_shard_writer_odd_sizes_and_shards_match_save_file(tmp_path, direct):
    """Unaligned sizes, a misaligned float32 after an odd bf16, pieces copied in and big ones: same bytes as safetensors."""
    from safetensors.torch import load_file

    from residuals_core.checkpoint import TensorInfo
    from residuals_core.dtypes import dtype_from_name, from_torch
    from residuals_core.writer import BLOCK_CAPACITY, ShardWriter

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.odd_bf16": torch.randn(3, 7, generator=gen).bfloat16(),  # 42 bytes: the next float32 is misaligned
        "b.f32": torch.randn(1001, 3, generator=gen),
        "c.big": torch.randn(BLOCK_CAPACITY // 4 + 999, generator=gen),  # larger than a block
        "d.empty": torch.zeros(0, 5),
        "e.i64": torch.arange(17),
    }
    writer = ShardWriter(
        tmp_path,
        [TensorInfo(n, dtype_from_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()],
        max_shard_size="4MB",
        direct_io=direct,
    )
    for name in writer.order:
        flat = tensors[name].reshape(-1)
        for start in range(0, max(flat.numel(), 1), 700_000):
            chunk = from_torch(flat[start : start + 700_000])
            if name == "e.i64":
                writer.write(name, chunk)  # a caller's own array: copied in
            else:
                piece = writer.buffer(dtype_from_name(tensors[name].dtype), chunk.size)
                piece[:] = chunk
                writer.write(name, piece)
    manifest = writer.close()
    assert writer.split.is_sharded
    loaded = {}
    for shard in sorted(tmp_path.glob("model-*.safetensors")):
        loaded.update(load_file(shard))
        assert manifest[shard.name] == file_digest(shard)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_shard_writer_falls_back_when_direct_writes_are_refused(tmp_path, monkeypatch):
    """A file system that accepts O_DIRECT at open but refuses the write still gets a correct file."""
    from safetensors.torch import load_file

    from residuals_core import writer as writer_module
    from residuals_core.checkpoint import TensorInfo

    real_write = os.write
    refused = []

    def picky_write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(writer_module.os, "write", picky_write)
    from residuals_core.dtypes import FLOAT32

    tensor = torch.randn(5000, 3)
    writer = writer_module.ShardWriter(tmp_path, [TensorInfo("w", FLOAT32, (5000, 3))])
    piece = writer.buffer(FLOAT32, tensor.numel())
    piece[:] = tensor.reshape(-1).numpy()
    writer.write("w", piece)
    writer.close()
    assert refused  # O_DIRECT was really tried first
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], tensor)


def test_write_error_surfaces_and_leaves_nothing(tmp_path, families, monkeypatch):
    """A full disk in the writing thread reaches the caller as an error, and no output folder appears."""
    from residuals_core import merge_models
    from residuals_core import writer as writer_module

    fam = families("llama")

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module.os, "write", full_disk)
    with pytest.raises(
        ResidualsError, match=r"Writing the output folder .*out failed: there is no space left"
    ):
        merge_models(fam["base"], fam["instruct"], fam["base"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_fsync_only_when_asked(tmp_path, families, monkeypatch):
    """Default like save_pretrained (atomic rename, no fsync); fsync=True / --fsync flushes everything."""
    from residuals_core import merge_models

    fam = families("llama")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    merge_models(fam["base"], fam["instruct"], fam["base"], tmp_path / "fast")
    assert synced == []
    merge_models(fam["base"], fam["instruct"], fam["base"], tmp_path / "durable", fsync=True)
    files = [p for p in (tmp_path / "durable").iterdir()]
    assert len(synced) >= len(files) + 2  # every file, the folder, and its parent after the rename
    assert "--fsync" in run_cli("merge", "--help").stdout


@pytest.mark.slow
def test_cli_compute_apply_merge_inspect(tmp_path, families):
    fam = families("qwen2")
    proc = run_cli("compute", "--base", fam["base"], "--instruct", fam["instruct"], "--out", tmp_path / "res")
    assert "reconstruction check: exact" in proc.stdout
    assert "compute" in proc.stderr and "tensor" in proc.stderr  # the tqdm bar over tensors
    run_cli(
        "apply",
        "--residuals",
        tmp_path / "res",
        "--model",
        fam["base"],
        "--out",
        tmp_path / "rebuilt",
        "--quiet",
    )
    inst = load_state(fam["instruct"])
    rebuilt = load_state(tmp_path / "rebuilt")
    assert all(torch.equal(rebuilt[k], inst[k]) for k in inst)
    run_cli(
        "merge",
        "--base",
        fam["base"],
        "--instruct",
        fam["instruct"],
        "--target",
        fam["target"],
        "--out",
        tmp_path / "merged",
        "--scale",
        "0.5",
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "30KB",
        "--quiet",
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.dtype == torch.bfloat16
    report = json.loads(run_cli("inspect", tmp_path / "res", "--json").stdout)
    assert [row["layer"] for row in report["layers"]] == ["embed", "0", "1", "final_norm", "head"]
    assert report["reconstruction"]["exact"] is True
    assert all(row["norm"] > 0 and 0 < row["relative"] < 10 for row in report["layers"])
    table = run_cli("inspect", tmp_path / "res").stdout
    assert "‖R‖/‖θ‖" in table and "final_norm" in table


def test_cli_errors_are_actionable(tmp_path, families):
    proc = run_cli(
        "compute",
        "--base",
        tmp_path / "missing",
        "--instruct",
        families("llama")["instruct"],
        "--out",
        tmp_path / "o",
        check=False,
    )
    assert proc.returncode == 2
    assert "error: base model: No folder at" in proc.stderr and "what to do:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_explains_commands():
    text = run_cli("--help").stdout
    for word in ("compute", "apply", "merge", "inspect", "examples:"):
        assert word in text
    assert "--scale" in run_cli("apply", "--help").stdout


def test_residuals_card_metadata_and_sections(tmp_path, families):
    fam = families("llama")
    base = AutoModelForCausalLM.from_pretrained(fam["base"])
    inst = AutoModelForCausalLM.from_pretrained(fam["instruct"])
    base.config.name_or_path = "acme/tiny-base"
    inst.config.name_or_path = "acme/tiny-instruct"
    from transformers import AutoTokenizer

    res = Residuals.from_models(base, inst, instruct_tokenizer=AutoTokenizer.from_pretrained(fam["instruct"]))
    res.config.license = "apache-2.0"
    res.config.language = "en"
    out = res.save_pretrained(tmp_path / "res")
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "acme/tiny-base"
    assert data["base_model_relation"] == "adapter"
    assert data["instruct_model"] == "acme/tiny-instruct"
    assert data["pipeline_tag"] == "text-generation" and data["library_name"] == "residuals"
    assert data["license"] == "apache-2.0" and data["language"] == "en"
    assert {"residuals", "task-arithmetic"} <= set(data["tags"])
    manifest = json.loads((out / "residuals_manifest.json").read_text())
    for section in ("## Usage", "## Files", "## Provenance", "## Per-layer norms"):
        assert section in card.text
    for name, entry in manifest["files"].items():
        assert f"`{name}`" in card.text and entry["sha256"] in card.text
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]


def test_usage_code_in_card_runs(tmp_path, families, monkeypatch):
    fam = families("llama")
    compute_residuals(fam["base"], fam["instruct"], tmp_path / "res")
    text = (tmp_path / "res" / "README.md").read_text()
    code = text.split("```python", 1)[1].split("```", 1)[0]
    code = code.replace('"res"', repr(str(tmp_path / "res")))
    code = code.replace('"path/to/your-cpt-base"', repr(str(fam["base"])))  # a local base: a placeholder
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "card-usage", "exec"), {})
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_merged_card_lineage():
    card = merged_card(
        name="me/merged",
        target="me/cpt-base",
        instruct="org/instruct",
        base="org/base",
        residuals=None,
        scale=1.0,
        dtype="bfloat16",
        manifest={"model.safetensors": {"sha256": "ab" * 32, "size": 10}},
    )
    data = card.data.to_dict()
    assert data["base_model"] == ["me/cpt-base", "org/instruct"]
    assert data["base_model_relation"] == "merge"
    assert "ab" * 32 in card.text


def test_every_run_flag_is_an_options_field_and_reaches_it():
    """The command line passes options one way: each run flag is the Options field of the same name."""
    from residuals_core import cli
    from residuals_core.options import OPTION_NAMES

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("compute", "apply", "merge", "sparsify", "lora"):
        dests = {a.dest for a in commands[name]._actions}
        assert dests & OPTION_NAMES == set(cli.CLI_OPTIONS), name
        args = parser.parse_args(
            [name, *REQUIRED[name], "--push-to", "me/out", "--max-shard-size", "2GB", "--fsync"]
        )
        options = cli._options(args, None)
        assert (options.push_to, options.max_shard_bytes, options.fsync) == ("me/out", 2 * 10**9, True)


REQUIRED = {
    "compute": ["--base", "a/b", "--instruct", "a/c"],
    "apply": ["--residuals", "a/r", "--model", "a/m"],
    "merge": ["--base", "a/b", "--instruct", "a/c", "--target", "a/t"],
    "sparsify": ["--residuals", "a/r", "--dare", "0.5"],
    "lora": ["--residuals", "a/r", "--rank", "4"],
}
