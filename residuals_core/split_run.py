"""One result written by several Jobs, each a share of its output shards, published in one commit.

client   plan once from headers (shard names, the inputs pinned to their commits)
         → the branch `residuals-run-<id>` of the target repo → N Jobs, job k the shards k, k+N, …
job k    opens the same inputs, plans the same shards (checked by the plan's fingerprint), reads
         only the byte ranges of its shards' tensors, and commits each finished shard to the run
         branch with its record (checksums, per-tensor norms) — a rerun skips what is there
the share that finds every shard on the branch writes the small files from all the records and
makes the one commit to main, which copies the shards by reference (nothing uploaded twice);
then the branch goes. Until then main is untouched: nothing half-published.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .arithmetic import TensorStats
from .errors import ResidualsError
from .options import Options
from .sinks import RUN_MARKER, HubRepoSink  # a split run's id is its branch name
from .writer import ShardPlan, file_digest, write_index

RUN_FOLDER = ".residuals-run"  # on the run branch only: one record per shard, never copied to main
BRANCH_PREFIX = "residuals-run-"


def plan_fingerprint(split: ShardPlan, specs: dict[str, Any]) -> str:
    """What every share must agree on: each file's name and its tensors' names, dtypes and shapes."""
    layout = [
        # dtypes spelled "torch.<name>" as before: shares planned by an earlier version still agree
        [name, [[t, f"torch.{specs[t].dtype.name}", list(specs[t].shape)] for t in tensors]]
        for name, tensors in split.files
    ]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def run_branch_name(argv: list[str], fingerprint: str) -> str:
    """The branch of one run: the same command on the same pinned inputs finds it again (and resumes)."""
    digest = hashlib.sha256(json.dumps([argv, fingerprint]).encode()).hexdigest()
    return f"{BRANCH_PREFIX}{digest[:12]}"


_RUN_BRANCH = re.compile(rf"{BRANCH_PREFIX}[0-9a-f]{{12}}")


def is_run_branch(name: str) -> bool:
    """Whether `name` is exactly a branch `run_branch_name` makes: what the Space checks a browser's record of
    its run against (`--run-branch` itself takes any branch name)."""
    return bool(_RUN_BRANCH.fullmatch(name))


def assign_shards(numbers: list[int], jobs: int) -> list[list[int]]:
    """Job k of n writes the k-th, (k+n)-th, … of the shards still to write: neighbours go to different
    jobs, so each job reads every input file's ranges spread alike and the jobs end together."""
    return [numbers[k::jobs] for k in range(jobs)]


def parse_shard_numbers(text: str) -> tuple[int, ...]:
    """'3', '3,7', '2-5' or 'none' (no shard: only publish a run whose shards are all on its branch)."""
    if text.strip().lower() == "none":
        return ()
    numbers: list[int] = []
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            numbers.extend(range(int(low), int(high if dash else low) + 1))
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise ResidualsError(
            f"--only-shards {text!r} is not a list of shard numbers.",
            "Give numbers from 1 as printed by jobs run, e.g. 3, 3,7 or 2-5.",
        )
    return tuple(sorted(set(numbers)))


def format_shard_numbers(numbers: list[int] | tuple[int, ...]) -> str:
    return ",".join(map(str, numbers)) if numbers else "none"


@dataclass
class RunState:
    """What a run branch holds: the shard records (by file name) and whether main has the result."""

    branch: str
    recorded: dict[str, str]  # file name -> path of its record on the branch
    published: bool
    branch_exists: bool

    @property
    def shards_total(self) -> int | None:
        """How many shards the result has, from a recorded shard's name (`model-00002-of-00011…`; a lone
        `model.safetensors` is 1 of 1); None before any shard is on the branch."""
        for name in self.recorded:
            of = re.search(r"-of-(\d+)\.safetensors$", name)
            return int(of.group(1)) if of else 1
        return None


def run_state(api: Any, repo_id: str, branch: str) -> RunState:
    """Read from the Hub: which shards of a run are on its branch, and whether its commit is on main."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    from .hub import with_rate_limits

    commits = with_rate_limits(lambda: api.list_repo_commits(repo_id))
    published = any(f"{RUN_MARKER}{branch}" in (c.message or "") for c in commits[:20])
    try:
        entries = with_rate_limits(
            lambda: list(api.list_repo_tree(repo_id, path_in_repo=RUN_FOLDER, revision=branch))
        )
        exists = True
    except RevisionNotFoundError:
        entries, exists = [], False
    except EntryNotFoundError:
        entries, exists = [], True
    recorded = {Path(e.path).name.removesuffix(".json"): e.path for e in entries if e.path.endswith(".json")}
    return RunState(branch, recorded, published, exists)


class PartWritten(Exception):
    """Not a failure: this share's shards are on the run branch, other shares' are not all there yet."""

    def __init__(self, written: list[str], present: int, total: int, repo_id: str, branch: str):
        self.written, self.present, self.total = written, present, total
        super().__init__(
            f"wrote {len(written)} shard(s) to {repo_id}@{branch}; {present} of {total} are there — the share "
            "that completes them publishes the result"
        )


class RunShareSink(HubRepoSink):
    """A share of a split run: its shards committed one by one to the run branch, each with its record;
    the one commit to main when the branch holds every shard (see the module's docstring).

    A failure leaves the branch as it is (other shares write to it too): running the share again
    continues where it stopped.
    """

    def __init__(self, repo_id: str, options: Options, **kwargs: Any):
        super().__init__(repo_id, options, **kwargs)
        self.branch = options.run_branch
        self.only = options.only_shards
        self.run_marker = f"{RUN_MARKER}{self.branch}"
        self.upload_revision = self.branch
        self.state: RunState | None = None
        self.split: ShardPlan | None = None
        self.fingerprint = ""
        self.written: list[str] = []
        self._stats: dict[str, TensorStats] = {}
        self._specs: dict[str, Any] = {}

    def __enter__(self) -> RunShareSink:
        from .hub import hub_errors, with_rate_limits

        super().__enter__()
        try:
            with hub_errors(self.repo_id, self.branch):
                with_rate_limits(
                    lambda: self._api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
                )
                self.state = run_state(self._api, self.repo_id, self.branch)
        except BaseException as exc:
            super().__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    # ---- the engine's side ----------------------------------------------------------------------
    def share(self, split: ShardPlan, specs: dict[str, Any], tensor_stats: dict) -> set[str]:
        self.split, self._specs, self._stats = split, specs, tensor_stats
        self.fingerprint = plan_fingerprint(split, specs)
        numbers = {name: i for i, (name, _) in enumerate(split.files, start=1)}
        if self.only is not None and max(self.only, default=0) > len(numbers):
            raise ResidualsError(
                f"--only-shards {format_shard_numbers(self.only)}: this result has {len(numbers)} shard(s).",
                f"Give shard numbers from 1 to {len(numbers)}.",
            )
        wanted = {n for n, i in numbers.items() if self.only is None or i in self.only}
        return wanted - set(self.state.recorded)

    def _uploaded(self, operation: Any, checksums: dict | None) -> bool:
        """Commit the shard to the run branch with its record, so that a rerun never writes it again."""
        from huggingface_hub import CommitOperationAdd

        from .hub import with_rate_limits

        name = operation.path_in_repo
        tensors = dict(self.split.files)[name]
        number = [f for f, _ in self.split.files].index(name) + 1
        record = {
            "file": name,
            "number": number,
            "of": len(self.split.files),
            "plan": self.fingerprint,
            "checksums": checksums,
            "tensors": {t: asdict(self._stats[t]) for t in tensors},
        }
        record_op = CommitOperationAdd(
            path_in_repo=f"{RUN_FOLDER}/{name}.json",
            path_or_fileobj=(json.dumps(record, indent=1) + "\n").encode(),
        )
        with_rate_limits(
            lambda: self._api.create_commit(
                self.repo_id,
                operations=[operation, record_op],
                commit_message=f"Residuals run: shard {number} of {len(self.split.files)}",
                revision=self.branch,
            )
        )
        self.written.append(name)
        return True

    def gather(self, weights: dict, tensor_stats: dict) -> tuple[dict, dict]:
        """Wait for this share's commits; with every shard on the branch, the whole result's weights
        and stats from the records (in the result's order) — else `PartWritten`."""
        from .hub import hub_errors

        self._queue.join()
        self._check_uploads()
        with hub_errors(self.repo_id, self.branch):
            self.state = run_state(self._api, self.repo_id, self.branch)
        names = [name for name, _ in self.split.files]
        present = [n for n in names if n in self.state.recorded]
        if self.state.published or len(present) < len(names):
            if self.state.published:
                self._commit_tried = True  # `_landed` then says so
            raise PartWritten(self.written, len(present), len(names), self.repo_id, self.branch)
        records = self._read_records(names)
        all_weights = {n: records[n]["checksums"] for n in names}
        if self.split.is_sharded:
            index = write_index(self.path, self.split, sum(self.split.file_bytes(self._specs)))
            all_weights[index.name] = file_digest(index)
        stats = {
            t: TensorStats(**records[n]["tensors"][t]) for n, tensors in self.split.files for t in tensors
        }
        return all_weights, stats

    def _read_records(self, names: list[str]) -> dict[str, dict]:
        from huggingface_hub import hf_hub_download

        from .hub import hub_errors, with_rate_limits

        folder = Path(tempfile.mkdtemp(prefix=".residuals-records-", dir=self.path.parent))
        records = {}
        try:
            with hub_errors(self.repo_id, self.branch):
                for name in names:
                    path = with_rate_limits(
                        lambda name=name: hf_hub_download(
                            self.repo_id,
                            self.state.recorded[name],
                            revision=self.branch,
                            token=self.options.token,
                            local_dir=folder,
                        )
                    )
                    records[name] = json.loads(Path(path).read_text())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        stale = sorted(n for n, r in records.items() if r.get("plan") != self.fingerprint)
        if stale:
            raise ResidualsError(
                f"{len(stale)} shard(s) on {self.repo_id}@{self.branch} (e.g. {stale[0]}) were planned from other "
                "inputs than this share's: the inputs changed on the Hub since the run began.",
                f"Delete the branch {self.branch} of {self.repo_id} and start the run again.",
            )
        return records

    # ---- publishing -------------------------------------------------------------------------------
    def _final_operations(self) -> list:
        from huggingface_hub import CommitOperationCopy

        return [
            CommitOperationCopy(src_path_in_repo=name, path_in_repo=name, src_revision=self.branch)
            for name, _ in self.split.files
        ]

    def _parent_commit(self) -> str | None:
        from .hub import with_rate_limits

        return with_rate_limits(lambda: self._api.repo_info(self.repo_id)).sha

    def _commit(self) -> None:
        if self._landed():
            return  # another share completed the set at the same time and published it
        super()._commit()
        with contextlib.suppress(Exception):  # published; a branch left over is only untidy
            self._api.delete_branch(self.repo_id, branch=self.branch)

    def _discard(self, *, deliberate: bool) -> str:
        if self._commit_tried and self._landed():
            return f"The result was committed to {self.repo_id} all the same."
        done = len(self.state.recorded) if self.state else 0
        return (
            f"The run's branch {self.branch} of {self.repo_id} keeps the shards already there ({done} before this "
            f"share, {len(self.written)} from it); main was not touched. Run the same command again to continue "
            f"(or delete the branch: hf repos branch delete {self.repo_id} {self.branch})."
        )


def describe_part(error: PartWritten) -> str:
    written = ", ".join(error.written) if error.written else "nothing new"
    return f"{written}; {error.present} of {error.total} shards on the run branch"


__all__ = [
    "PartWritten",
    "RunShareSink",
    "RunState",
    "assign_shards",
    "describe_part",
    "format_shard_numbers",
    "parse_shard_numbers",
    "plan_fingerprint",
    "run_branch_name",
    "run_state",
]
