"""residuals_core.checkpoint on its own: the one weight-file rule and the header parser, on bytes and lists."""

from __future__ import annotations

import json

import pytest

from residuals_core.checkpoint import INDEX_NAME, parse_header, select_weight_files
from residuals_core.dtypes import BFLOAT16, FLOAT32
from residuals_core.errors import ResidualsError


def header(entries: dict, data_bytes: int, **extra) -> tuple[bytes, int]:
    """(raw header JSON, file size) for entries {name: (dtype, shape, [begin, end])}."""
    raw = json.dumps(
        {n: {"dtype": d, "shape": s, "data_offsets": o} for n, (d, s, o) in entries.items()} | extra
    ).encode()
    return raw, 8 + len(raw) + data_bytes


def test_a_valid_header_gives_each_tensor_its_dtype_shape_and_file_offset():
    raw, size = header({"a": ("F32", [2, 3], [0, 24]), "b": ("BF16", [4], [24, 32])}, 32,
                       __metadata__={"format": "pt"})  # fmt: skip
    tensors = parse_header(raw, size, "m", "model.safetensors")
    assert tensors["a"].dtype == FLOAT32 and tensors["a"].shape == (2, 3) and tensors["a"].nbytes == 24
    assert tensors["b"].dtype == BFLOAT16 and tensors["b"].offset == 8 + len(raw) + 24
    assert {t.file for t in tensors.values()} == {"model.safetensors"}


@pytest.mark.parametrize(
    ("entries", "data_bytes", "words"),
    [
        ({"a": ("F32", [2], [0, 4])}, 4, "need 8"),  # offsets shorter than shape × dtype
        ({"a": ("F32", [1], [0, 4]), "b": ("F32", [1], [8, 12])}, 12, "(a gap)"),
        ({"a": ("F32", [2], [0, 8]), "b": ("F32", [1], [4, 8])}, 8, "overlap"),
        ({"a": ("F32", [1], [0, 4])}, 8, "cover 4 data bytes but the file holds 8"),
        ({"a": ("F32", [-1], [0, 4])}, 4, "non-negative integers"),
        ({"a": ("F32", [1], [0, 4, 8])}, 4, "two non-negative integers"),
        ({"a": ("F32", [4], [0, 16])}, 8, "is truncated"),
        ({"a": ("X9", [1], [0, 1])}, 1, "dtype 'X9'"),
    ],
    ids=["short", "gap", "overlap", "slack", "negative", "offsets", "truncated", "dtype"],
)
def test_a_header_that_does_not_tile_its_data_exactly_is_refused(entries, data_bytes, words):
    raw, size = header(entries, data_bytes)
    with pytest.raises(ResidualsError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_header(raw, size, "m", "model.safetensors")


def test_duplicate_names_and_non_objects_are_refused():
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    with pytest.raises(ResidualsError, match="'a' appears twice"):
        parse_header(raw, 8 + len(raw) + 8, "m", "f")
    with pytest.raises(ResidualsError, match="JSON list, not an object"):
        parse_header(b"[]", 10, "m", "f")
    with pytest.raises(ResidualsError, match="unreadable safetensors header"):
        parse_header(b"\xff{", 10, "m", "f")


def index(weight_map: dict) -> callable:
    return lambda: {"weight_map": weight_map}


def test_the_index_names_the_shards_when_there_is_one():
    listing = [
        INDEX_NAME,
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "extra.safetensors",
    ]
    files = select_weight_files(
        listing,
        index({"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}),
        "m",
    )
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_without_an_index_model_safetensors_else_every_safetensors_file():
    assert select_weight_files(["model.safetensors", "other.safetensors"], index({}), "m") == [
        "model.safetensors"
    ]
    assert select_weight_files(["b.safetensors", "a.safetensors", ".hidden.safetensors"], index({}), "m") == [
        "a.safetensors",
        "b.safetensors",
    ]


@pytest.mark.parametrize(
    ("listing", "weight_map", "words"),
    [
        ([INDEX_NAME], {"a": "../../etc/passwd"}, "not a file name of this checkpoint"),
        ([INDEX_NAME], {"a": "sub/model.safetensors"}, "not a file name of this checkpoint"),
        ([INDEX_NAME, "pytorch_model.bin"], {"a": "pytorch_model.bin"}, "not a .safetensors file"),
        ([INDEX_NAME], {"a": "model-00001.safetensors"}, "are missing"),
        ([INDEX_NAME], {}, "has no weight_map"),
        (["pytorch_model.bin"], None, "only pickle checkpoints"),
        (["README.md"], None, "contains no model weights"),
    ],
    ids=[
        "parent-path",
        "subfolder",
        "pickle-shard",
        "missing-shard",
        "empty-index",
        "pickles-only",
        "nothing",
    ],
)
def test_what_the_rule_refuses_and_why(listing, weight_map, words):
    with pytest.raises(ResidualsError, match=words):
        select_weight_files(listing, index(weight_map or {}), "m")


def test_pickles_only_when_allowed():
    listing = ["pytorch_model.bin", "optimizer.pt", "training_args.bin"]
    assert select_weight_files(listing, index({}), "m", allow_pickle=True) == ["pytorch_model.bin"]


def _resident_bytes(path) -> int:
    """Bytes of a file in the page cache: mincore over a copy-on-write mapping (nothing written to it)."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        first = ctypes.c_char.from_buffer(mapped)
        try:
            assert libc.mincore(ctypes.c_void_p(ctypes.addressof(first)), ctypes.c_size_t(size), vector) == 0
        finally:
            del first
    return sum(page & 1 for page in vector) * mmap.PAGESIZE


def test_the_command_line_starts_reading_local_inputs_while_torch_loads(tmp_path):
    """prefetch_local_inputs asks the kernel for the head of each local folder's first weight file;
    anything that is not a local folder of weights (a Hub id, demo:…, None) is passed over."""
    import os

    from waits import wait_for

    from residuals_core.sources import prefetch_local_inputs

    folder = tmp_path / "model"
    folder.mkdir()
    first, second = folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"
    for path in (first, second):
        path.write_bytes(os.urandom(4 << 20))
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
        os.close(fd)
    if _resident_bytes(first) or _resident_bytes(second):
        pytest.skip("this file system keeps files in memory (tmpfs): nothing to read ahead")
    prefetch_local_inputs(["org/name", "demo:base-v1", None, str(tmp_path / "missing"), str(folder)], 1 << 20)
    wait_for(lambda: _resident_bytes(first) >= 1 << 20, what="the first megabyte read ahead")
    assert _resident_bytes(first) < 4 << 20 and _resident_bytes(second) == 0  # only what was asked for


def test_a_local_file_is_read_ahead_of_the_engine(tmp_path):
    """Reading the start of a local file asks the kernel (from a background thread) for the next
    LOCAL_READ_AHEAD_BYTES, so a file not in the page cache streams instead of one request at a time."""
    import os

    from waits import wait_for

    from residuals_core.sources import LOCAL_READ_AHEAD_BYTES, LocalFile

    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(2 * LOCAL_READ_AHEAD_BYTES))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _resident_bytes(path):
        pytest.skip("this file system keeps files in memory (tmpfs): nothing to read ahead")
    reader = LocalFile(path)
    reader.read_bytes(0, 1 << 20)
    wait_for(lambda: _resident_bytes(path) >= LOCAL_READ_AHEAD_BYTES, what="the next 64 MB read ahead")
    assert _resident_bytes(path) < 2 * LOCAL_READ_AHEAD_BYTES  # no more than was asked for
    reader.close()
