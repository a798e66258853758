"""Hostile inputs, dangerous outputs and faults, as one table: every case must end the same way.

Each case builds its inputs in a fresh folder (copies of the tiny family, then damaged, pointed
at each other, or put on a full or read-only disk) and runs the command line in-process twice:
`main()` must print `error: … what to do: …` naming the culprit and exit 2, and `run()` (what
`main` wraps) must raise ResidualsError with the same message. Around both, every file of the
folder is hashed: the inputs are byte-identical afterwards, and nothing is left at or beside
`--out` (no output, no partial folder, no lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build_tokenizer, load_state, make_model, save

from residuals_core import Residuals, ResidualsError, cli, compute_residuals, operations
from residuals_core.card import markdown_text
from residuals_core.options import Options

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


# ---- the world a case damages -------------------------------------------------------------------------
class World:
    """Fresh copies of the tiny family (and its residuals) in one folder, plus helpers to damage them."""

    def __init__(self, root: Path, sources: dict[str, Path], monkeypatch):
        self.root = root
        self.monkeypatch = monkeypatch
        self.mounts: list[Path] = []
        models = root / "models"
        models.mkdir(parents=True)
        for name, folder in sources.items():
            shutil.copytree(folder, models / name)
        self.models = models
        self.out = root / "out"

    def __getitem__(self, name: str) -> Path:
        return self.models / name

    def mount(self, folder: Path, size: str, *, read_only: bool = False) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
        self.mounts.append(folder)
        return folder

    def close(self) -> None:
        for folder in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(folder)], check=False)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry below `root`: files by sha256, links by target, folders by name (test fillers left out)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if name.startswith("filler"):
                continue
            if path.is_symlink():
                seen[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                seen[rel] = "dir"
            else:
                seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


# ---- damaging files ------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(path: Path, header, data: bytes, *, raw_header: bytes | None = None) -> None:
    encoded = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_header(folder: Path, change: Callable[[dict], object], data: Callable[[bytes], bytes] = lambda d: d):
    """Change the header in place (`change`'s return value is ignored) and rewrite the file."""
    path = folder / "model.safetensors"
    header, body = read_safetensors(path)
    change(header)
    write_safetensors(path, header, data(body))


def first_tensor(header: dict) -> str:
    """The tensor whose data starts the data section."""
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def second_tensor(header: dict) -> str:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[1]


def set_entry(header: dict, name: str, **fields) -> None:
    header[name].update(fields)


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    """Change a JSON file's object in place (`change`'s return value is ignored)."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_index(folder: Path, change: Callable[[dict], None]) -> None:
    edit_json(folder / "model.safetensors.index.json", change)


def map_one(value) -> Callable[[dict], None]:
    def change(index: dict) -> None:
        first = sorted(index["weight_map"])[0]
        index["weight_map"][first] = value

    return change


def shrink_vocab_then(folder: Path) -> None:
    """A tokenizer whose added token has a huge id (a corrupt tokenizer_config.json)."""
    edit_json(
        folder / "tokenizer_config.json",
        lambda cfg: cfg.setdefault("added_tokens_decoder", {}).update(
            {"40000000": {"content": "<huge>", "special": True}}
        ),
    )


def fp16_folder(src: Path, dst: Path) -> Path:
    """A copy of a model folder stored in float16."""
    shutil.copytree(src, dst)
    state = {k: v.half() for k, v in load_state(src).items()}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    edit_json(dst / "config.json", lambda c: c.update(torch_dtype="float16", dtype="float16"))
    return dst


def fill_disk_after_check(world: World, folder: Path) -> None:
    """Another process fills the disk just after the free-space check passed."""
    real = operations.check_disk

    def check_then_fill(sink, sizes, small=0):
        (folder / "filler").unlink(missing_ok=True)  # an earlier run's
        real(sink, sizes, small)
        free = shutil.disk_usage(folder).free
        with open(folder / "filler", "wb") as f, contextlib.suppress(OSError):
            f.write(b"\0" * max(0, free - 64 * 1024))

    world.monkeypatch.setattr(operations, "check_disk", check_then_fill)


@contextlib.contextmanager
def lock_held(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


# ---- the table ---------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    kind: str  # the class of hostility
    setup: Callable[[World], list]  # damages the world, returns the CLI arguments
    match: str  # regex the error message must match (it names the culprit)
    needs_root: bool = False
    lock: bool = False  # the test holds the output's lock, as a second run would find it


def compute(w: World, out=None, *extra) -> list:
    return ["compute", "--base", w["base"], "--instruct", w["instruct"], "--out", out or w.out, *extra]


def apply(w: World, out=None, model=None, *extra) -> list:
    return [
        "apply",
        "--residuals",
        w["residuals"],
        "--model",
        model or w["target"],
        "--out",
        out or w.out,
        *extra,
    ]


def merge(w: World, out=None, *extra, target=None) -> list:
    return [
        "merge", "--base", w["base"], "--instruct", w["instruct"], "--target", target or w["target"],
        "--out", out or w.out, *extra,
    ]  # fmt: skip


def compute_sharded(w: World) -> list:
    return ["compute", "--base", w["base"], "--instruct", w["sharded"], "--out", w.out]


def damaged(step: Callable[[World], object], then: Callable[[World], list]) -> Callable[[World], list]:
    def setup(w: World) -> list:
        step(w)
        return then(w)

    return setup


def header_case(case_id: str, change, match: str, data=lambda d: d) -> Case:
    return Case(
        case_id,
        "corrupt header",
        damaged(lambda w: edit_header(w["instruct"], change, data), compute),
        match,
    )


def index_case(case_id: str, change, match: str) -> Case:
    return Case(
        case_id,
        "index trusted",
        damaged(lambda w: edit_index(w["sharded"], change), compute_sharded),
        match,
    )


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


def copied(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def remove_tokenizer(folder: Path) -> None:
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            path.unlink()


def _with_project_files(out: Path) -> Path:
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print('my project')\n")
    (out / "notes.md").write_text("mine")
    return out


# fmt: off
CASES = [
    # -- outputs never touch inputs (with or without --overwrite) --
    Case("out-is-base", "data loss", lambda w: compute(w, w["base"], "--overwrite"), r"is the input .*base"),
    Case("out-is-instruct", "data loss", lambda w: compute(w, w["instruct"], "--overwrite"), r"is the input .*instruct"),
    Case("out-is-parent-of-inputs", "data loss", lambda w: compute(w, w.models, "--overwrite"), r"holds the input"),
    Case("out-is-world-root", "data loss", lambda w: merge(w, w.root, "--overwrite"), r"holds the input"),
    Case("out-inside-base", "data loss", lambda w: compute(w, w["base"] / "sub"), r"lies inside the input .*base"),
    Case("out-is-base-no-flag", "data loss", lambda w: compute(w, w["base"]), r"is the input .*base"),
    Case("apply-out-is-model", "data loss", lambda w: apply(w, w["target"], None, "--overwrite"), r"is the input .*target"),
    Case("apply-out-is-residuals", "data loss", lambda w: apply(w, w["residuals"], None, "--overwrite"), r"is the input .*residuals"),
    Case("merge-out-is-target", "data loss", lambda w: merge(w, w["target"], "--overwrite"), r"is the input .*target"),
    Case("merge-out-is-base", "data loss", lambda w: merge(w, w["base"], "--overwrite"), r"is the input .*base"),
    Case(
        "out-symlink-to-target", "data loss",
        lambda w: merge(w, _symlink(w.root / "link", w["target"]), "--overwrite"), r"is the input",
    ),
    Case(
        "input-symlink-to-out", "data loss",
        lambda w: merge(w, w.out, "--overwrite", target=_symlink(w.root / "t-link", copied(w["target"], w.out))),
        r"is the input .*t-link",
    ),
    Case(
        "overwrite-project-folder", "dangerous output",
        lambda w: compute(w, _with_project_files(w.root / "project"), "--overwrite"), r"holds more than a model.*src",
    ),
    Case(
        "out-exists-no-flag", "dangerous output",
        lambda w: compute(w, _with_project_files(w.root / "project")), r"already exists and is not empty",
    ),
    Case(
        "out-is-a-file", "dangerous output",
        damaged(lambda w: w.out.write_text("x"), compute), r"exists and is a file",
    ),
    Case(
        "out-parent-is-a-file", "dangerous output",
        damaged(lambda w: (w.root / "file").write_text("x"), lambda w: compute(w, w.root / "file" / "out")),
        r"a part of the path is a file|file\b",
    ),
    Case(
        "out-is-mount-point", "dangerous output",
        lambda w: compute(w, w.mount(w.root / "mnt", "8m"), "--overwrite"), r"is a mount point.*inside it",
        needs_root=True,
    ),
    Case(
        "read-only-output-disk", "fault",
        lambda w: compute(w, w.mount(w.root / "ro", "8m", read_only=True) / "out"), r"read-only",
        needs_root=True,
    ),
    Case(
        "disk-full-during-write", "fault",
        damaged(lambda w: fill_disk_after_check(w, w.mount(w.root / "small", "3m")), lambda w: compute(w, w.root / "small" / "out")),
        r"no space left.*Free some space", needs_root=True,
    ),
    Case(
        "disk-too-small-up-front", "fault",
        lambda w: compute(w, w.mount(w.root / "tiny", "256k") / "out"), r"Not enough free disk.*\d+\.\d [KMG]B.*\d+\.\d [KMG]B are free",
        needs_root=True,
    ),
    # -- the index is data, not instructions --
    index_case("index-absolute-path", map_one("/etc/passwd"), r"maps tensor .* to '/etc/passwd'.*not a file name"),
    index_case("index-parent-path", map_one("../../etc/passwd"), r"maps tensor .* to '\.\./\.\./etc/passwd'"),
    index_case("index-subfolder", map_one("sub/model.safetensors"), r"to 'sub/model\.safetensors'"),
    index_case("index-names-pickle", map_one("pytorch_model.bin"), r"names 'pytorch_model\.bin'.*not a \.safetensors.*allow-pickle"),
    index_case("index-value-not-string", map_one(7), r"maps tensor .* to 7"),
    index_case("index-weight-map-list", lambda i: i.update(weight_map=["a"]), r"has no weight_map object"),
    index_case("index-weight-map-empty", lambda i: i.update(weight_map={}), r"has no weight_map object"),
    Case(
        "index-is-a-list", "index trusted",
        damaged(lambda w: (w["sharded"] / "model.safetensors.index.json").write_text("[1, 2]"), compute_sharded),
        r"index\.json holds a JSON list",
    ),
    index_case("index-missing-shard", map_one("model-00009-of-00009.safetensors"), r"model-00009-of-00009\.safetensors.*missing"),
    index_case(
        "index-wrong-shard-for-tensor",
        lambda i: i["weight_map"].update({k: sorted(set(i["weight_map"].values()))[0] for k in list(i["weight_map"])[-1:]}),
        r"lists tensors that their shard does not contain",
    ),
    index_case(
        "index-stale-stray-shard",
        lambda i: i.update(weight_map={k: v for k, v in i["weight_map"].items() if not v.startswith("model-00002")}),
        r"weight files its index does not list \(model-00002",
    ),
    Case(
        "index-not-json", "index trusted",
        damaged(lambda w: (w["sharded"] / "model.safetensors.index.json").write_text("{not json"),
                compute_sharded),
        r"index\.json is not valid JSON",
    ),
    Case(
        "pickle-only-no-flag", "index trusted",
        damaged(lambda w: (torch.save(load_state(w["instruct"]), w["instruct"] / "pytorch_model.bin"),
                           (w["instruct"] / "model.safetensors").unlink()), compute),
        r"only pickle checkpoints.*allow-pickle",
    ),
    # -- headers validated completely --
    header_case("header-negative-offset", lambda h: set_entry(h, first_tensor(h), data_offsets=[-64, h[first_tensor(h)]["data_offsets"][1] - 64]), r"data_offsets \[-64"),
    header_case(
        "header-overlapping-offsets",
        lambda h: set_entry(h, second_tensor(h), data_offsets=[0, h[second_tensor(h)]["data_offsets"][1] - h[second_tensor(h)]["data_offsets"][0]]),
        r"overlap",
    ),
    header_case("header-gap", lambda h: [set_entry(h, k, data_offsets=[v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]) for k, v in list(h.items()) if k != "__metadata__"], r"gap", data=lambda d: b"\0" * 4 + d),
    Case(
        "header-is-list", "corrupt header",
        damaged(lambda w: write_safetensors(w["instruct"] / "model.safetensors", [1, 2, 3], b""), compute),
        r"is a JSON list, not an object",
    ),
    header_case("header-entry-no-offsets", lambda h: h[first_tensor(h)].pop("data_offsets"), r"data_offsets None"),
    header_case("header-negative-dimension", lambda h: set_entry(h, first_tensor(h), shape=[-1, 32]), r"shape \[-1, 32\]"),
    header_case("header-float-dimension", lambda h: set_entry(h, first_tensor(h), shape=[1.5, 32]), r"shape \[1\.5, 32\]"),
    header_case("header-unknown-dtype", lambda h: set_entry(h, first_tensor(h), dtype="Q9"), r"dtype 'Q9'.*Convert"),
    header_case("header-entry-not-object", lambda h: h.update({first_tensor(h): "x"}), r"is not an object"),
    header_case("header-wrong-byte-count", lambda h: set_entry(h, first_tensor(h), shape=[1]), r"spans bytes .* need 4"),
    header_case("header-trailing-bytes", lambda h: None, r"cover \d+ data bytes but the file holds \d+", data=lambda d: d + b"\0" * 16),
    header_case("header-truncated-data", lambda h: None, r"truncated", data=lambda d: d[:-100]),
    header_case("header-metadata-not-strings", lambda h: h.update(__metadata__={"format": 1}), r"__metadata__ is not an object of strings"),
    header_case("header-huge-shape", lambda h: set_entry(h, first_tensor(h), shape=[2**40, 2**40]), r"spans bytes"),
    Case(
        "header-duplicate-key", "corrupt header",
        damaged(lambda w: (lambda p, h, d: write_safetensors(p, None, d, raw_header=json.dumps(h).encode()[:-1] + b', "' + first_tensor(h).encode() + b'": ' + json.dumps(h[first_tensor(h)]).encode() + b"}"))(
            w["instruct"] / "model.safetensors", *read_safetensors(w["instruct"] / "model.safetensors")), compute),
        r"appears twice",
    ),
    Case(
        "header-not-utf8", "corrupt header",
        damaged(lambda w: write_safetensors(w["instruct"] / "model.safetensors", None, b"", raw_header=b"\xff\xfe{}"), compute),
        r"unreadable safetensors header",
    ),
    Case(
        "header-length-beyond-file", "corrupt header",
        damaged(lambda w: (w["instruct"] / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}"), compute),
        r"header length 1000000000 does not fit",
    ),
    Case(
        "file-of-three-bytes", "corrupt header",
        damaged(lambda w: (w["instruct"] / "model.safetensors").write_bytes(b"abc"), compute), r"only 3 bytes",
    ),
    Case(
        "empty-checkpoint", "corrupt header",
        damaged(lambda w: write_safetensors(w["instruct"] / "model.safetensors", {}, b""), compute),
        r"instruct.*holds no tensors",
    ),
    Case(
        "tensor-in-two-files", "corrupt header",
        damaged(lambda w: shutil.copy(w["sharded"] / "model-00001-of-00007.safetensors", w["sharded"] / "model-00002-of-00007.safetensors"),
                compute_sharded),
        r"appears in both",
    ),
    # -- finite after rounding --
    Case(
        "fp16-overflow-at-large-scale", "overflow",
        damaged(lambda w: fp16_folder(w["target"], w.root / "t16"), lambda w: apply(w, None, w.root / "t16", "--scale", "1e7")),
        r"overflows float16 at scale α = 1e\+07.*smaller scale",
    ),
    Case(
        "merge-dtype-fp16-overflow", "overflow",
        lambda w: merge(w, None, "--scale", "1e7", "--dtype", "float16"), r"overflows float16 at scale α = 1e\+07",
    ),
    Case(
        "nan-in-instruct", "overflow",
        damaged(lambda w: save_file({**(s := load_state(w["instruct"])), "model.norm.weight": s["model.norm.weight"] * float("nan")},
                                    w["instruct"] / "model.safetensors", metadata={"format": "pt"}), compute),
        r"model\.norm\.weight.*NaN or Inf.*instruct",
    ),
    Case("scale-nan", "bad option", lambda w: apply(w, None, None, "--scale", "nan"), r"scale nan is not a finite number"),
    Case("scale-inf", "bad option", lambda w: merge(w, None, "--scale", "inf"), r"scale inf is not a finite number"),
    # -- vocabulary --
    Case(
        "vocab-mismatch-no-normalize", "vocabulary",
        lambda w: ["compute", "--base", w["base"], "--instruct", w["instruct-added"], "--out", w.out, "--no-normalize-embeddings"],
        r"Shape mismatch in the vocabulary rows.*normalize_embeddings",
    ),
    Case(
        "tokenizer-huge-added-id", "vocabulary",
        damaged(lambda w: shrink_vocab_then(w["instruct"]), compute), r"tokenizer of .*instruct has 40000001 tokens.*corrupt tokenizer",
    ),
    # -- corrupt small files and bad options: one error path --
    Case(
        "tokenizer-json-corrupt", "corrupt file",
        damaged(lambda w: (w["instruct"] / "tokenizer.json").write_text("{\"model\": 3}"), compute), r"instruct/tokenizer\.json is not a readable tokenizer",
    ),
    Case(
        "tokenizer-config-bad-ids", "corrupt file",
        damaged(lambda w: edit_json(w["instruct"] / "tokenizer_config.json", lambda c: c.update(added_tokens_decoder={"x": {}})), compute),
        r"added_tokens_decoder has keys that are not token ids",
    ),
    Case(
        "tokenizer-config-not-json", "corrupt file",
        damaged(lambda w: (w["instruct"] / "tokenizer_config.json").write_text("[1,"), compute), r"tokenizer_config\.json is not valid JSON",
    ),
    Case(
        "config-not-object", "corrupt file",
        damaged(lambda w: (w["base"] / "config.json").write_text("[1, 2]"), compute), r"base/config\.json holds a JSON list",
    ),
    Case(
        "config-not-json", "corrupt file",
        damaged(lambda w: (w["target"] / "config.json").write_text("{"), merge), r"target/config\.json is not valid JSON",
    ),
    Case(
        "manifest-malformed", "corrupt file",
        damaged(lambda w: edit_json(w["residuals"] / "residuals_manifest.json", lambda m: m.update(files=[1])), apply),
        r"residuals_manifest\.json is malformed",
    ),
    Case(
        "manifest-entry-without-size", "corrupt file",
        damaged(lambda w: edit_json(w["residuals"] / "residuals_manifest.json", lambda m: m["files"]["model.safetensors"].pop("size")), apply),
        r"residuals_manifest\.json is malformed",
    ),
    Case(
        "residuals-tampered", "corrupt file",
        damaged(lambda w: (lambda p: p.write_bytes(p.read_bytes()[:-8] + b"\x01" * 8))(w["residuals"] / "model.safetensors"), apply),
        r"model\.safetensors does not match its recorded checksum",
    ),
    Case(
        "residuals-truncated", "corrupt file",
        damaged(lambda w: (lambda p: p.write_bytes(p.read_bytes()[:-8]))(w["residuals"] / "model.safetensors"), apply),
        r"truncated",
    ),
    Case(
        "residuals-config-not-residuals", "corrupt file",
        lambda w: ["apply", "--residuals", w["instruct"], "--model", w["target"], "--out", w.out],
        r"looks like a model, not residuals",
    ),
    Case("max-shard-size-unit", "bad option", lambda w: compute(w, None, "--max-shard-size", "5XB"), r"'5XB' is not a size"),
    Case("max-shard-size-zero", "bad option", lambda w: compute(w, None, "--max-shard-size", "0"), r"'0' is not a positive size"),
    Case("max-shard-size-negative", "bad option", lambda w: compute(w, None, "--max-shard-size=-5GB"), r"'-5GB' is not a positive size"),
    Case("dtype-unknown", "bad option", lambda w: compute(w, None, "--dtype", "float8"), r"Unknown dtype 'float8'"),
    Case("dtype-not-float", "bad option", lambda w: merge(w, None, "--dtype", "int8"), r"'int8' is not a floating-point type"),
    Case("device-unknown", "bad option", lambda w: compute(w, None, "--device", "tpu"), r"'tpu' is not a device name|not supported"),
    Case("device-cuda-absent", "bad option", lambda w: compute(w, None, "--device", "cuda"), r"no usable CUDA GPU"),
    # -- missing or wrong inputs --
    Case("base-path-missing", "wrong input", lambda w: ["compute", "--base", w.root / "nope", "--instruct", w["instruct"], "--out", w.out], r"base model: No folder at"),
    Case(
        "folder-without-weights", "wrong input",
        damaged(lambda w: (w["instruct"] / "model.safetensors").unlink(), compute), r"instruct model: .*no model weights",
    ),
    Case("different-architectures", "wrong input", lambda w: ["compute", "--base", w["base"], "--instruct", w["gpt2"], "--out", w.out], r"not have the same tensors"),
    Case(
        "instruct-without-tokenizer", "wrong input",
        damaged(lambda w: remove_tokenizer(w["instruct"]), compute),
        r"no tokenizer files.*--instruct-tokenizer",
    ),
    Case(
        "second-writer-refused", "concurrent writers",
        lambda w: compute(w), r"Another run is writing .*out right now", lock=True,
    ),
]
# fmt: on


@pytest.fixture(scope="module")
def sources(families, tmp_path_factory):
    """The family the cases copy: llama base/instruct/target, a sharded instruct, residuals, and more."""
    fam = families("llama")
    root = tmp_path_factory.mktemp("hostile-sources")
    residuals = compute_residuals(fam["base"], fam["instruct"], root / "residuals").path
    tok = build_tokenizer()
    sharded = make_model("llama", len(tok), seed=1)
    save(sharded, tok, root / "sharded", max_shard_size="20KB")
    assert len(list((root / "sharded").glob("model-*.safetensors"))) >= 3
    return {
        "base": fam["base"],
        "instruct": fam["instruct"],
        "target": fam["target"],
        "residuals": residuals,
        "sharded": root / "sharded",
        "instruct-added": families("llama", added_tokens=2)["instruct"],
        "gpt2": families("gpt2")["instruct"],
    }


@pytest.fixture
def world(tmp_path, sources, monkeypatch):
    w = World(tmp_path / "world", sources, monkeypatch)
    yield w
    w.close()


def test_the_table_covers_every_class_with_sixty_cases():
    kinds = {c.kind for c in CASES}
    assert len(CASES) >= 60, len(CASES)
    assert {"data loss", "dangerous output", "index trusted", "corrupt header", "overflow", "vocabulary",
            "corrupt file", "bad option", "fault", "concurrent writers"} <= kinds  # fmt: skip
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(case: Case, world: World, capsys):
    if case.needs_root and not IS_ROOT:
        pytest.skip("needs root (mounts a tmpfs)")
    argv = [str(a) for a in case.setup(world)]
    before = snapshot(world.root)
    lock = contextlib.nullcontext()
    if case.lock:
        lock = lock_held(world.root / ".out.lock")
        before[".out.lock"] = hashlib.sha256(b"").hexdigest()
    with lock:
        capsys.readouterr()
        try:
            code = cli.main([*argv, "--quiet"])
        except SystemExit as exc:  # argparse's own refusals (a bad --max-shard-size)
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, err
        assert re.search(case.match, err, re.S), err
        if "usage:" not in err:
            assert err.startswith("error: ") and "\n  what to do: " in err, err
            with pytest.raises(ResidualsError, match=re.compile(case.match, re.S)):
                cli.run([*argv, "--quiet"])
        after = snapshot(world.root)
    assert after == before, {
        k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)
    }


def test_bad_shard_size_is_a_residuals_error_in_the_api():
    with pytest.raises(ResidualsError, match=r"'5XB' is not a size"):
        Options(max_shard_size="5XB")


# ---- API cases (no CLI) ----------------------------------------------------------------------------
def test_save_pretrained_into_its_own_inputs_refused(world):
    before = snapshot(world.root)
    lazy = Residuals.from_models(str(world["base"]), str(world["instruct"]))
    with pytest.raises(ResidualsError, match=r"is the input .*base"):
        lazy.save_pretrained(world["base"], overwrite=True)
    loaded = Residuals.from_pretrained(world["residuals"])
    with pytest.raises(ResidualsError, match=r"is the input .*residuals"):
        loaded.save_pretrained(world["residuals"], overwrite=True)
    with pytest.raises(ResidualsError, match=r"holds the input"):
        loaded.save_pretrained(world.models, overwrite=True)
    assert snapshot(world.root) == before


def test_push_to_an_input_repo_refused(hub, tmp_path, families):
    from huggingface_hub import HfApi

    fam = families("llama")
    api = HfApi(token="hf_alice_write")
    for role in ("base", "instruct", "target"):
        api.create_repo(f"alice/h-{role}", exist_ok=True)
        api.upload_folder(repo_id=f"alice/h-{role}", folder_path=str(fam[role]))
    before = api.model_info("alice/h-target").sha
    with pytest.raises(ResidualsError, match=r"--push-to alice/h-target is one of this run's inputs"):
        operations.merge_models(
            "alice/h-base",
            "alice/h-instruct",
            "alice/h-target",
            push_to="alice/h-target",
            token="hf_alice_write",
        )
    assert api.model_info("alice/h-target").sha == before


# ---- behaviours behind the refusals ----------------------------------------------------------------
def test_overwrite_replaces_an_earlier_result_only_when_whole(world):
    first = compute_residuals(world["base"], world["instruct"], world.out).path
    (first / "model.safetensors").write_bytes(b"an earlier, different result")
    second = compute_residuals(world["base"], world["instruct"], world.out, overwrite=True).path
    assert second == first
    assert load_state(second).keys() == load_state(world["residuals"]).keys()  # replaced by the whole new one
    assert sorted(p.name for p in world.root.iterdir()) == ["models", "out"]  # no lock, no partial left


def test_base_rows_the_instruct_model_lacks_get_a_zero_residual(tmp_path):
    """A base with 2 more vocabulary rows than its instruct model: R is zero there, and applying keeps them."""
    tok = build_tokenizer()
    big_tok = build_tokenizer(["<|a|>", "<|b|>"])
    base = make_model("llama", len(big_tok), seed=1)
    instruct = make_model("llama", len(tok), seed=2)
    save(base, big_tok, tmp_path / "base")
    save(instruct, tok, tmp_path / "instruct")
    target = make_model("llama", len(big_tok), seed=3)
    save(target, big_tok, tmp_path / "target")
    result = compute_residuals(tmp_path / "base", tmp_path / "instruct", tmp_path / "res")
    state = load_state(tmp_path / "res")
    rows = len(tok)
    embed = "model.embed_tokens.weight"
    assert state[embed].shape[0] == len(big_tok)
    assert torch.count_nonzero(state[embed][rows:]) == 0  # not −θ_base
    base_state, inst_state = load_state(tmp_path / "base"), load_state(tmp_path / "instruct")
    assert torch.equal(state[embed][:rows], inst_state[embed] - base_state[embed][:rows])
    note = next(n for n in result.notes if "vocabulary rows" in n)
    assert f"instruct model has {rows} rows" in note and "difference there is zero" in note
    assert (
        markdown_text(note) in (tmp_path / "res" / "README.md").read_text()
    )  # the card says it too, as text
    applied = operations.apply_residuals(tmp_path / "res", tmp_path / "target", tmp_path / "applied").path
    target_state, applied_state = load_state(tmp_path / "target"), load_state(applied)
    assert torch.equal(applied_state[embed][rows:], target_state[embed][rows:])  # those rows kept
    merged = operations.merge_models(
        tmp_path / "base", tmp_path / "instruct", tmp_path / "target", tmp_path / "m"
    ).path
    assert torch.equal(load_state(merged)[embed], applied_state[embed])  # one rule for both paths


def test_sigterm_removes_the_partial_folder(tmp_path):
    """SIGTERM mid-write cleans up as Ctrl-C does: no partial folder, no lock, exit 143."""
    tok = build_tokenizer()
    big = make_model("llama", len(tok), seed=1, hidden=512, layers=8)
    save(big, tok, tmp_path / "base")
    save(big, tok, tmp_path / "instruct")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "residuals_core", "compute", "--base", tmp_path / "base", "--instruct",
         tmp_path / "instruct", "--out", tmp_path / "out", "--quiet", "--max-shard-size", "10MB", "--no-direct-io"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while (
        not list(tmp_path.glob(".out.partial-*/model-*"))
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "instruct"]
