"""How a run reads, computes and writes: one explicit object, passed down, never read from the environment.

A multi-user app varies these per job (one visitor's token, another's output repo), so no layer
below the public functions looks at environment variables or globals for them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ResidualsError
from .sources import DEFAULT_READ_AHEAD_BYTES
from .units import parse_size

if TYPE_CHECKING:  # torch is imported by what runs the arithmetic, not by what only describes it
    import torch

DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_MAX_SMALL_FILE_BYTES = 100 * 10**6  # a real tokenizer.json is at most a few tens of MB
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Options:
    """Everything about a run that is not the arithmetic itself.

    - device: where to combine (cpu, cuda); piece_bytes: float32 bytes per piece (None: by device)
    - max_shard_size: largest output weight file; with `push_to` it also bounds local disk (~2 shards)
    - overwrite: replace an existing output folder once the new one is complete
    - fsync: flush outputs before renaming them into place; direct_io: write weights with O_DIRECT
    - token, cache_dir, allow_pickle, read_ahead_bytes: how inputs are read (cache_dir holds
      only a Hub model's small files: config, tokenizer, index, manifest); token=False sends no
      token at all, not even the machine's own, which is what a hosted app gives a visitor who is
      not logged in
    - max_small_file_bytes: the largest such small file a Hub model may have (refused beyond)
    - push_to, private: write straight into this Hub repo instead of a folder
    - work_dir: where a Hub output's shards wait for their upload (default: the temp folder)
    - run_branch, only_shards: write one share of a run split over several Jobs: the output shards
      numbered `only_shards` (1-based; None: every one not yet there) go to the branch `run_branch`
      of `push_to`, and the share that completes the set makes the one commit to main
    - plan_only: open the inputs and plan, write nothing; the Result's summary holds the shard plan
    - progress: callback (done, total, tensor name)
    """

    device: str | torch.device = "cpu"
    piece_bytes: int | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    fsync: bool = False
    direct_io: bool = True
    token: str | bool | None = None  # None: the machine's own login (HF_TOKEN); False: send none
    cache_dir: str | os.PathLike | None = None
    allow_pickle: bool = False
    read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES
    max_small_file_bytes: int = DEFAULT_MAX_SMALL_FILE_BYTES
    push_to: str | None = None
    private: bool = False
    work_dir: str | os.PathLike | None = None
    run_branch: str | None = None
    only_shards: tuple[int, ...] | None = None
    plan_only: bool = False
    progress: Progress | None = None

    def __post_init__(self) -> None:
        # bad values are refused when the options are made, not deep inside a run
        parse_size(self.max_shard_size)
        for name in ("piece_bytes", "read_ahead_bytes", "max_small_file_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ResidualsError(
                    f"{name}={value!r} is not a positive number of bytes.",
                    f"Give {name} as bytes, e.g. 2097152.",
                )
        if self.push_to is not None and not isinstance(self.push_to, str):
            raise ResidualsError(
                f"push_to={self.push_to!r} is not a repo id.", "Give push_to as 'user/name'."
            )
        if self.run_branch is not None and self.push_to is None:
            raise ResidualsError(
                "A share of a split run (run_branch) writes into a Hub repo, and no push_to was given.",
                "Add --push-to ME/NAME, the repo the run publishes into.",
            )
        if self.only_shards is not None and (
            self.run_branch is None or any(not isinstance(n, int) or n < 1 for n in self.only_shards)
        ):
            raise ResidualsError(
                f"only_shards={self.only_shards!r} needs a run branch and shard numbers from 1.",
                "Give --only-shards with --run-branch, e.g. --only-shards 3,7 (or use jobs run --shards N).",
            )

    def with_(self, **changes: Any) -> Options:
        return replace(self, **changes)

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


OPTION_NAMES = frozenset(f.name for f in fields(Options))


def make_options(options: Options | None, overrides: dict[str, Any]) -> Options:
    """`options` (or the defaults) with keyword overrides; unknown keywords are a clear error."""
    unknown = sorted(set(overrides) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    return (options or Options()).with_(**overrides) if overrides else (options or Options())


def work_dir(options: Options) -> Path:
    import tempfile

    return Path(options.work_dir) if options.work_dir is not None else Path(tempfile.gettempdir())
