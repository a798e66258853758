"""Tensor dtypes without torch: names, sizes and ranges, and the host-side conversions of the engine.

The engine computes on numpy on the CPU, so that a command-line merge does not pay for importing
torch (about a second: half of a 1B apply). numpy has no bfloat16 or float8: their values are held
as raw bits (uint16, uint8) and converted here exactly as torch converts them (bfloat16 rounds to
nearest, ties to even). torch is imported only where tensors are handed to it: model instances,
a GPU device, and float8 conversions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ResidualsError


@dataclass(frozen=True)
class DType:
    """One element type: torch's name for it, safetensors' code, and how numpy holds its bytes."""

    name: str  # torch's and config.json's spelling: "bfloat16"
    code: str  # the safetensors header's: "BF16"
    itemsize: int
    is_floating_point: bool
    storage: str  # the numpy dtype that holds the bytes: bfloat16 values are uint16 bits
    max: float = 0.0  # largest finite value (floating point)
    overflow: float = float("inf")  # smallest float32 magnitude that rounds to a non-finite value

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DType({self.name!r})"

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.storage)

    @property
    def torch(self) -> Any:
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.name)


_ALL = [
    DType("float64", "F64", 8, True, "float64", 1.7976931348623157e308),
    DType("float32", "F32", 4, True, "float32", 3.4028234663852886e38),
    DType("float16", "F16", 2, True, "float16", 65504.0, 65520.0),
    # 0x7F7F is the largest bfloat16; float32 values from halfway to the next power round to Inf
    DType("bfloat16", "BF16", 2, True, "uint16", 3.3895313892515355e38, 3.3961775292304005e38),
    DType("int64", "I64", 8, False, "int64"),
    DType("int32", "I32", 4, False, "int32"),
    DType("int16", "I16", 2, False, "int16"),
    DType("int8", "I8", 1, False, "int8"),
    DType("uint8", "U8", 1, False, "uint8"),
    DType("bool", "BOOL", 1, False, "bool"),
    # float8: torch converts; e4m3fn has no Inf and turns what exceeds it into NaN
    DType("float8_e4m3fn", "F8_E4M3", 1, True, "uint8", 448.0, 464.0),
    DType("float8_e5m2", "F8_E5M2", 1, True, "uint8", 57344.0, 61440.0),
]
BY_NAME = {d.name: d for d in _ALL}
BY_CODE = {d.code: d for d in _ALL}  # safetensors header codes
FLOAT32, BFLOAT16, FLOAT16, INT64 = (
    BY_NAME["float32"],
    BY_NAME["bfloat16"],
    BY_NAME["float16"],
    BY_NAME["int64"],
)

_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "f64": "float64",
    "double": "float64",
    "long": "int64",
    "int": "int32",
}


def dtype_from_name(name: str | DType | Any) -> DType:
    """Accept torch dtypes and the spellings people type: 'bf16', 'bfloat16', 'torch.float16', 'F32'."""
    if isinstance(name, DType):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    found = BY_NAME.get(_ALIASES.get(key, key))
    if found is None:
        raise ResidualsError(
            f"Unknown dtype {name!r}.",
            "Use one of float32, bfloat16 or float16 (or a torch.dtype).",
        )
    return found


def dtype_name(dtype: DType | Any) -> str:
    return dtype_from_name(dtype).name


# ---- conversions on the host (numpy arrays of the storage dtype) ------------------------------------------
def to_float32(raw: np.ndarray, dtype: DType, out: np.ndarray) -> np.ndarray:
    """The float32 values of `raw` (elements of `dtype`, as stored) written into `out`; returns `out`."""
    if dtype.name == "bfloat16":  # bfloat16 is the top half of a float32: exact
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
    elif dtype.storage == dtype.name or not dtype.is_floating_point:  # numpy's own types
        np.copyto(out, raw, casting="unsafe")
    else:
        _torch_copy(out, FLOAT32, raw, dtype)
    return out


def store(values: np.ndarray, out: np.ndarray, dtype: DType) -> np.ndarray:
    """`values` (float32 or int64) rounded into `out` (storage of `dtype`), as torch rounds them.

    A float32 `values` is used as scratch space for bfloat16: the caller is done with it.
    """
    if dtype.name == "bfloat16" and values.dtype == np.float32:
        bits = values.view(np.uint32)
        # round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, keep the top half
        np.right_shift(bits, 16, out=out, casting="unsafe")
        np.bitwise_and(out, 1, out=out)
        np.add(bits, out, out=bits)
        np.add(bits, 0x7FFF, out=bits)
        np.right_shift(bits, 16, out=out, casting="unsafe")
    elif dtype.storage == dtype.name or not dtype.is_floating_point:
        np.copyto(out, values, casting="unsafe")
    else:
        _torch_copy(out, dtype, values, dtype_from_name(values.dtype.name))
    return out


def convert(raw: np.ndarray, dtype: DType, to: DType) -> np.ndarray:
    """Stored elements of `dtype` as stored elements of `to` (a fresh array unless the same dtype),
    rounded as torch rounds them."""
    if dtype == to:
        return raw
    out = np.empty(raw.size, dtype=to.numpy)
    if dtype.storage == dtype.name and to.storage == to.name:  # numpy converts its own types directly
        np.copyto(out, raw, casting="unsafe")
        return out
    return store(to_float32(raw, dtype, np.empty(raw.size, np.float32)), out, to)


def written_finite(values: np.ndarray, dtype: DType) -> bool:
    """Whether float32 `values` are all finite once rounded to `dtype`, from their range alone."""
    if values.size == 0:
        return True
    if dtype.overflow == float("inf"):  # float32 and wider: NaN and Inf propagate through a sum
        return bool(np.isfinite(values.sum()))
    low, high = float(values.min()), float(values.max())  # NaN propagates and compares false
    return -dtype.overflow < low and high < dtype.overflow


def overflow_count(values: np.ndarray, dtype: DType) -> int:
    """How many float32 `values` are NaN or Inf once rounded to `dtype`."""
    finite = np.isfinite(values)
    if dtype.overflow != float("inf"):
        finite &= np.abs(values) < dtype.overflow
    return int(values.size - np.count_nonzero(finite))


def all_finite(raw: np.ndarray, dtype: DType) -> bool:
    """Whether stored elements of `dtype` hold no NaN or Inf (integers always do)."""
    if not dtype.is_floating_point or raw.size == 0:
        return True
    return bool(np.isfinite(to_float32(raw, dtype, np.empty(raw.size, np.float32))).all())


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise bitwise equality of two arrays of one storage type (NaN equals itself, −0 ≠ 0)."""
    as_int = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return a.view(as_int) == b.view(as_int)


# ---- handing arrays to torch and back -------------------------------------------------------------------
def to_torch(array: np.ndarray, dtype: DType) -> Any:
    """A torch tensor sharing `array`'s memory (elements of `dtype`, as stored)."""
    import torch

    if dtype.storage == "uint16":  # torch views int16 bits as bfloat16
        return torch.from_numpy(array.view(np.int16)).view(dtype.torch)
    tensor = torch.from_numpy(array)
    return tensor if dtype.storage == dtype.name else tensor.view(dtype.torch)


def from_torch(tensor: Any) -> np.ndarray:
    """A CPU tensor's elements as a numpy array of its dtype's storage type (shared memory when it can)."""
    import torch

    dtype = dtype_from_name(tensor.dtype)
    tensor = tensor.detach().cpu()
    if dtype.storage == dtype.name:
        return tensor.numpy()
    bits = tensor.view(torch.int16 if dtype.itemsize == 2 else torch.uint8).numpy()
    return bits.view(dtype.numpy)


def _torch_copy(out: np.ndarray, out_dtype: DType, raw: np.ndarray, raw_dtype: DType) -> None:
    """float8 conversions: torch's, so results match it bit for bit."""
    to_torch(out, out_dtype).copy_(to_torch(raw, raw_dtype))


def as_float64(raw: np.ndarray, dtype: DType) -> np.ndarray:
    """The values of stored elements as a fresh float64 array (for sums that must not lose digits)."""
    if dtype.storage == dtype.name:
        return raw.astype(np.float64)
    return to_float32(raw, dtype, np.empty(raw.size, np.float32)).astype(np.float64)
