"""Sparser residuals: DARE (drop and rescale) and TIES-style magnitude trimming, streamed like everything else.

Both are views of a residuals source that read the same flat element ranges as the engine:
- `DareSource` drops each element with probability p and scales the rest by 1/(1−p) (Yu et al. 2023).
  The random draw of an element depends only on (seed, tensor name, element index), in fixed
  blocks, so the result is the same whatever the piece size or device;
- `TrimmedSource` keeps the largest `keep` share of each tensor's magnitudes (Yadav et al. 2023's
  trim step). The exact threshold is found without holding the tensor: two histogram passes over
  the float32 bit patterns of |R| (which sort as integers), then the values below it read as zero.

Integer tensors pass through unchanged. The result is an ordinary (dense) residuals folder, which
`residuals` 0.3.2 reads; zeros compress well, but a dense file weighs what it did.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from .checkpoint import TensorSource, element_ranges
from .dtypes import FLOAT32, to_torch
from .errors import ResidualsError

DARE_BLOCK = 1 << 20  # elements per random block: the unit of reproducibility
SCAN_PIECE_BYTES = 8 * 1024 * 1024  # float32 bytes per read while scanning a tensor for its threshold


class _View(TensorSource):
    """A source that changes the values of another, element range by element range."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.tensors = source.tensors
        self.label = source.label
        self.vocab_size = source.vocab_size

    def position(self, name: str) -> tuple[int, int]:
        return self.source.position(name)

    def finish(self) -> None:
        self.source.finish()

    def close(self) -> None:
        self.source.close()


class DareSource(_View):
    """Each element dropped with probability `drop`, the kept ones scaled by 1/(1−drop)."""

    def __init__(self, source: TensorSource, drop: float, seed: int = 0):
        if not 0 <= drop < 1:
            raise ResidualsError(f"A DARE drop rate of {drop!r} is not in [0, 1).", "Use e.g. --dare 0.9.")
        super().__init__(source)
        self.drop, self.seed = drop, seed

    def read_elements(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        piece = self.source.read_elements(name, start, stop, out)
        dtype = self.tensors[name].dtype
        if self.drop == 0 or not dtype.is_floating_point or stop <= start:
            return piece
        keep = self._keep_mask(name, start, stop)
        values = to_torch(piece, dtype)
        scaled = values.float().mul_(keep).mul_(1 / (1 - self.drop))  # in place when float32
        if dtype != FLOAT32:
            values.copy_(scaled)
        return piece

    def _keep_mask(self, name: str, start: int, stop: int) -> torch.Tensor:
        parts = []
        for block in range(start // DARE_BLOCK, (stop - 1) // DARE_BLOCK + 1):
            digest = hashlib.sha256(f"{self.seed}:{name}:{block}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            draws = torch.rand(DARE_BLOCK, generator=generator)
            first = block * DARE_BLOCK
            parts.append(draws[max(start, first) - first : min(stop, first + DARE_BLOCK) - first])
        return (torch.cat(parts) >= self.drop).float()


class TrimmedSource(_View):
    """Each tensor's largest `keep` share of magnitudes kept, the rest read as zero."""

    def __init__(self, source: TensorSource, keep: float):
        if not 0 < keep <= 1:
            raise ResidualsError(
                f"A trim share of {keep!r} is not in (0, 1].", "Use e.g. --trim 0.2 (keep 20%)."
            )
        super().__init__(source)
        self.keep = keep
        self._thresholds: dict[str, float] = {}

    def threshold(self, name: str) -> float:
        """The smallest magnitude kept in this tensor (exact: the k-th largest |value|)."""
        if name not in self._thresholds:
            self._thresholds[name] = self._find_threshold(name)
        return self._thresholds[name]

    def read_elements(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        piece = self.source.read_elements(name, start, stop, out)
        dtype = self.tensors[name].dtype
        if self.keep == 1 or not dtype.is_floating_point:
            return piece
        values = to_torch(piece, dtype)
        values.masked_fill_(values.float().abs() < self.threshold(name), 0)
        return piece

    def _scan(self, name: str):
        info = self.tensors[name]
        for start, stop in element_ranges(info.numel, SCAN_PIECE_BYTES):
            raw = self.source.read_elements(name, start, stop)
            yield to_torch(raw, info.dtype).float().abs().view(torch.int32)

    def _find_threshold(self, name: str) -> float:
        numel = self.tensors[name].numel
        wanted = math.ceil(self.keep * numel)  # how many to keep
        if wanted >= numel or numel == 0:
            return 0.0
        high = torch.zeros(1 << 16, dtype=torch.int64)  # pass 1: the upper 16 bits
        for bits in self._scan(name):
            high += torch.bincount(bits >> 16, minlength=1 << 16)
        from_top = torch.flip(high, [0]).cumsum(0)
        top_bin = (1 << 16) - 1 - int(torch.searchsorted(from_top, torch.tensor(wanted)))
        still = wanted - int(high[top_bin + 1 :].sum())  # to take from inside that bin
        low = torch.zeros(1 << 16, dtype=torch.int64)  # pass 2: the lower 16 bits within it
        for bits in self._scan(name):
            inside = bits[(bits >> 16) == top_bin]
            low += torch.bincount(inside & 0xFFFF, minlength=1 << 16)
        low_from_top = torch.flip(low, [0]).cumsum(0)
        low_bin = (1 << 16) - 1 - int(torch.searchsorted(low_from_top, torch.tensor(still)))
        return float(torch.tensor([(top_bin << 16) | low_bin], dtype=torch.int32).view(torch.float32))
