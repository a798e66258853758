"""The host arithmetic without torch: conversions bit for bit as torch makes them, and no torch import.

The command line combines on numpy so it never imports torch; numpy has no bfloat16 or float8, so
`dtypes` converts their bits itself. Every conversion is checked here against torch's own.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import load_state

from residuals_core import dtypes
from residuals_core.dtypes import BFLOAT16, FLOAT16, FLOAT32, from_torch, to_torch
from residuals_core.errors import ResidualsError


def float32_cases() -> torch.Tensor:
    """Random values over the whole exponent range, and the ties and edges of bfloat16 rounding."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    values = values[torch.isfinite(values)]
    edges = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.17549435e-38, float("inf"), float("-inf"),
         3.3895313892515355e38, 3.3961775292304005e38, -3.3961775292304005e38, 3.4028234663852886e38,
         65504.0, 65519.996, 65520.0, -65520.0],
        dtype=torch.float32,
    )  # fmt: skip
    tie_bits = torch.tensor(
        [0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001, 0x7F7F_7FFF], dtype=torch.int64
    )
    ties = tie_bits.to(torch.int32).view(torch.float32)  # exact ties to even and odd, just below and above
    return torch.cat([values, -values, edges, ties])


def test_every_bfloat16_widens_to_the_float32_torch_gives():
    every = np.arange(2**16, dtype=np.uint16)
    widened = dtypes.to_float32(every, BFLOAT16, np.empty(every.size, np.float32))
    expected = to_torch(every, BFLOAT16).float().numpy()
    assert np.array_equal(widened.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize(
    "dtype", [BFLOAT16, FLOAT16, dtypes.BY_NAME["float8_e4m3fn"], dtypes.BY_NAME["float8_e5m2"]]
)
def test_float32_rounds_into_each_output_dtype_as_torch_rounds(dtype):
    values = float32_cases()
    with np.errstate(over="ignore"):  # float16's overflows are the point here
        stored = dtypes.store(values.numpy().copy(), np.empty(values.numel(), dtype.numpy), dtype)
    expected = from_torch(values.to(dtype.torch))
    finite = np.isfinite(dtypes.to_float32(expected, dtype, np.empty(expected.size, np.float32)))
    # NaN never reaches `store`: the engine refuses a piece before it is rounded
    assert np.array_equal(stored[finite], expected[finite])
    assert finite.sum() > values.numel() // 10


@pytest.mark.parametrize("dtype", [BFLOAT16, FLOAT16, FLOAT32])
def test_written_finite_knows_the_last_value_that_rounds_to_a_finite_one(dtype):
    """The range check of a piece decides exactly what torch would round to Inf."""
    values = float32_cases()
    rounded = values.to(dtype.torch)
    for value, as_stored in zip(values.tolist(), rounded.tolist(), strict=True):
        piece = np.array([value], np.float32)
        assert dtypes.written_finite(piece, dtype) == np.isfinite(as_stored), (value, dtype)
        assert dtypes.overflow_count(piece, dtype) == (0 if np.isfinite(as_stored) else 1)
    assert not dtypes.written_finite(np.array([1.0, np.nan], np.float32), dtype)


def test_arrays_go_to_torch_and_back_without_a_copy():
    bits = np.array([0x3F80, 0xC000], np.uint16)  # 1.0 and -2.0 in bfloat16
    tensor = to_torch(bits, BFLOAT16)
    assert tensor.dtype == torch.bfloat16 and tensor.tolist() == [1.0, -2.0]
    tensor[0] = 3.0
    assert bits[0] == 0x4040  # the same memory
    assert np.shares_memory(from_torch(tensor), bits)


@pytest.mark.parametrize(
    ("name", "expected"),
    [(torch.bfloat16, "bfloat16"), ("bf16", "bfloat16"), ("torch.float16", "float16"), ("F32", "float32"),
     ("half", "float16"), (dtypes.FLOAT32, "float32")],
)  # fmt: skip
def test_dtype_names_people_type_are_understood(name, expected):
    assert dtypes.dtype_from_name(name).name == expected
    assert dtypes.dtype_from_name(name).torch == getattr(torch, expected)


def test_an_unknown_dtype_is_refused_with_the_choices():
    with pytest.raises(ResidualsError, match=r"Unknown dtype 'bfloat17'.*float32, bfloat16 or float16"):
        dtypes.dtype_from_name("bfloat17")


def test_the_command_line_computes_applies_and_merges_without_importing_torch(families, tmp_path):
    """Importing torch costs about a second of every command: none of the streaming commands needs it."""
    fam = families("llama", dtype=torch.bfloat16)
    commands = [
        ["compute", "--base", fam["base"], "--instruct", fam["instruct"], "--out", tmp_path / "res"],
        ["apply", "--residuals", tmp_path / "res", "--model", fam["target"], "--out", tmp_path / "applied"],
        ["merge", "--base", fam["base"], "--instruct", fam["instruct"], "--target", fam["target"],
         "--out", tmp_path / "merged"],
    ]  # fmt: skip
    script = (
        "import json, sys\n"
        "from residuals_core import cli\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    assert cli.main([*argv, '--quiet']) == 0, argv\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))\n"
    )
    argv = json.dumps([[str(part) for part in command] for command in commands])
    done = subprocess.run([sys.executable, "-c", script, argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    applied, merged = load_state(tmp_path / "applied"), load_state(tmp_path / "merged")
    assert applied.keys() == merged.keys() and all(torch.equal(applied[n], merged[n]) for n in applied)


def test_the_device_arithmetic_gives_the_host_arithmetic_bytes(families, tmp_path, monkeypatch):
    """The torch path a GPU takes, run with torch on the CPU, writes the very bytes numpy writes."""
    from residuals_core import arithmetic, compute_residuals, merge_models

    fam = families("llama", dtype=torch.bfloat16)
    on_host = compute_residuals(fam["base"], fam["instruct"], tmp_path / "host-res", dtype="bfloat16")
    merge_models(fam["base"], fam["instruct"], fam["target"], tmp_path / "host-merged", scale=0.7)
    monkeypatch.setattr(arithmetic, "check_device", lambda device: torch.device("cpu"))
    used = []
    real_init = arithmetic._DeviceMath.__init__
    monkeypatch.setattr(
        arithmetic._DeviceMath, "__init__", lambda self, d: (used.append(d), real_init(self, d))[1]
    )
    result = compute_residuals(fam["base"], fam["instruct"], tmp_path / "device-res", dtype="bfloat16")
    merge_models(fam["base"], fam["instruct"], fam["target"], tmp_path / "device-merged", scale=0.7)
    assert len(used) == 2
    assert result.reconstruction == on_host.reconstruction  # the same elements miss, by the same amount
    assert result.reconstruction["mismatched_elements"] > 0  # bfloat16 residuals: the check ran and counted
    for name in ("res", "merged"):
        host, device = load_state(tmp_path / f"host-{name}"), load_state(tmp_path / f"device-{name}")
        assert host.keys() == device.keys()
        assert all(torch.equal(host[n], device[n]) for n in host), name
