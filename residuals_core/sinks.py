"""Where results go: an atomic local folder, or straight into a Hub repo. One writer interface.

A sink is a context manager with a staging folder (`path`) that the operation fills (weights
through a `ShardWriter`, then config, tokenizer, manifest and card), two hooks the writer calls
around each weight file (`before_shard`, `shard_done`), and a publish step on a clean exit:
- `FolderSink` builds the folder under a hidden name next to its destination and renames it
  into place, so a failure or a kill never leaves anything that looks complete;
- `HubRepoSink` uploads each finished shard at once (`preupload_lfs_files`) and deletes it
  locally, so local disk holds about two shards whatever the model size; one `create_commit`
  at the end adds everything, so the repo shows the whole result or nothing, and a repo the run
  created is deleted again when the run fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import Cancelled, ResidualsError, from_os_error
from .options import Options, work_dir
from .units import format_size

UPLOAD_SLOTS = 2  # shards on local disk at once with a Hub sink (being written or uploading)
DISK_MARGIN_BYTES = 1024 * 1024  # config, manifest, card and the file system's own, beyond the tokenizer


class Sink:
    """The writer interface: fill `path`, and the sink publishes it when the block exits cleanly."""

    path: Path
    location: str  # where the result is, for the user: a folder or a repo URL

    def before_shard(self) -> None:
        """Called before a new weight file is opened: may wait until there is room for it."""

    def shard_done(self, path: Path, checksums: dict) -> None:
        """Called (from the writer's thread) when a weight file is complete and closed, with its checksums."""

    def share(self, split: Any, specs: dict[str, Any], tensor_stats: dict) -> set[str] | None:
        """The weight files of `split` (tensors `specs`) this sink takes (None: all of them);
        `tensor_stats` fills as they stream."""
        return None

    def gather(self, weights: dict, tensor_stats: dict) -> tuple[dict, dict]:
        """Once the share is written: the weights and per-tensor stats of the whole result."""
        return weights, tensor_stats

    def disk_needed(self, shard_sizes: list[int]) -> tuple[Path, int]:
        """(folder, bytes) of local disk this sink needs for weight files of these sizes."""
        raise NotImplementedError

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        raise NotImplementedError


def open_sink(
    out_dir: str | os.PathLike | None,
    options: Options,
    *,
    inputs: list[Any] = (),
    card_metadata: str | None = None,
) -> Sink:
    """The sink for a run: the Hub repo `options.push_to`, else the folder `out_dir`.

    `inputs` are the run's sources (checkpoints): the output may never be, hold or lie inside
    one of their folders, nor be one of their Hub repos. `card_metadata`: the card's YAML block,
    which a Hub sink has validated before it uploads anything.
    """
    folders = [Path(s.folder) for s in inputs if getattr(s, "folder", None) is not None]
    if options.push_to is not None:
        if out_dir is not None:
            raise ResidualsError(
                "Both an output folder and push_to were given.",
                "Give one: --out for a local folder, or --push-to for a Hub repo.",
            )
        repos = [s.label for s in inputs if getattr(s, "remote", False)]
        if options.run_branch is not None:
            from .split_run import RunShareSink

            return RunShareSink(options.push_to, options, inputs=repos, card_metadata=card_metadata)
        return HubRepoSink(options.push_to, options, inputs=repos, card_metadata=card_metadata)
    if out_dir is None:
        raise ResidualsError(
            "No output was given.",
            "Give an output folder (--out / out_dir) or a Hub repo (--push-to / push_to).",
        )
    return FolderSink(out_dir, overwrite=options.overwrite, fsync=options.fsync, inputs=folders)


def check_disk(sink: Sink, shard_sizes: list[int], small_files: int = 0) -> None:
    """Refuse up front, with the numbers, when the sink's local disk cannot hold what it needs.

    `small_files`: bytes of the tokenizer and other files the result copies besides its weights.
    """
    folder, needed = sink.disk_needed(shard_sizes)
    small = small_files + DISK_MARGIN_BYTES
    probe = folder.absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + small <= free:
        return
    if isinstance(sink, HubRepoSink):
        raise ResidualsError(
            f"Not enough free disk at {probe}: pushing to the Hub keeps up to two output shards here at a time, "
            f"{format_size(needed)} with these shards (+{format_size(small)} for small files), and {format_size(free)} are free.",
            "Use a smaller --max-shard-size (e.g. 1GB), free some space, or point TMPDIR (work_dir=) at a larger disk.",
        )
    raise ResidualsError(
        f"Not enough free disk at {probe}: the output needs about {format_size(needed + small)}, "
        f"{format_size(free)} are free.",
        "Free some space, choose an output folder on a larger disk, or push straight to the Hub with --push-to.",
    )


# ---- a local folder ---------------------------------------------------------------------------------
OUTPUT_SUFFIXES = (
    ".safetensors",
    ".json",
    ".md",
    ".txt",
    ".model",
    ".jinja",
    ".tiktoken",
    ".bin",
    ".pt",
    ".pth",
    ".py",
)
OUTPUT_FOLDERS = (".cache",)  # huggingface_hub's download bookkeeping inside a --local-dir


class FolderSink(Sink):
    """Build a folder under a hidden temporary name next to `dest`; rename it into place on success.

    The run claims `dest` for its whole length with a lock file beside it, so a second writer is
    refused instead of silently replacing the first one's result. `dest` may not be, hold or lie
    inside an input folder, whatever `overwrite` says; an existing `dest` is replaced only with
    `overwrite`, only when it holds nothing but model files, and only once the new folder is whole.
    """

    def __init__(
        self,
        dest: str | os.PathLike,
        *,
        overwrite: bool = False,
        fsync: bool = False,
        inputs: list[Path] = (),
    ):
        self.dest = Path(dest).expanduser().absolute()
        self.overwrite = overwrite
        self.fsync = fsync
        self.inputs = list(inputs)
        self.location = str(self.dest)
        self.path = self.dest.parent / f".{self.dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock: int | None = None
        self._lock_path = self.dest.parent / f".{self.dest.name}.lock"
        self._made_parents: list[Path] = []

    def disk_needed(self, shard_sizes: list[int]) -> tuple[Path, int]:
        return self.dest.parent, sum(shard_sizes)

    def __enter__(self) -> FolderSink:
        self._refuse_inputs()
        if os.path.ismount(self.dest):
            raise ResidualsError(
                f"The output folder {self.dest} is a mount point: a result is built beside it and renamed into "
                "place, which cannot replace a mount point.",
                f"Give a folder inside it instead, e.g. {self.dest / 'result'}.",
            )
        try:
            self._make_parents()
            self._claim()
            try:
                self._check_destination()
                _remove_stale_partials(self.dest)
                self.path.mkdir()
            except BaseException:
                self._release()
                raise
        except OSError as exc:
            raise from_os_error(exc, f"Preparing the output folder {self.dest}") from exc
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                if isinstance(exc, OSError):
                    raise from_os_error(exc, f"Writing the output folder {self.dest}") from exc
                return
            try:
                self._publish()
            except OSError as failure:
                shutil.rmtree(self.path, ignore_errors=True)
                raise from_os_error(failure, f"Moving the finished result into {self.dest}") from failure
            except BaseException:
                shutil.rmtree(self.path, ignore_errors=True)
                raise
        finally:
            self._release()
            if exc_type is not None or not self.dest.exists():
                self._remove_made_parents()

    # ---- claiming and checking the destination -------------------------------------------------
    def _refuse_inputs(self) -> None:
        out = self.dest.resolve()
        for folder in self.inputs:
            source = Path(folder).resolve()
            if out == source or source.is_relative_to(out) or out.is_relative_to(source):
                how = "is" if out == source else ("holds" if source.is_relative_to(out) else "lies inside")
                raise ResidualsError(
                    f"The output folder {self.dest} {how} the input {folder}: writing it would destroy the input "
                    "(refused with or without --overwrite).",
                    "Choose an output folder outside every input folder, e.g. a new sibling folder.",
                )

    def _make_parents(self) -> None:
        missing = []
        parent = self.dest.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._made_parents.append(folder)

    def _remove_made_parents(self) -> None:
        for folder in reversed(self._made_parents):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when still empty
        self._made_parents = []

    def _claim(self) -> None:
        """Hold an exclusive lock on `.NAME.lock` beside the destination for the whole run."""
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ResidualsError(
                    f"Another run is writing {self.dest} right now (it holds {self._lock_path}).",
                    "Wait for it to finish, or choose another output folder.",
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self._lock_path).st_ino
            except FileNotFoundError:
                same = False  # the previous holder removed it between our open and lock: try again
            if same:
                self._lock = fd
                return
            os.close(fd)

    def _release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)
            os.close(self._lock)
            self._lock = None

    def _check_destination(self) -> None:
        if self.dest.exists() and not self.dest.is_dir():
            raise ResidualsError(f"{self.dest} exists and is a file.", "Choose another output folder.")
        if not self.dest.is_dir() or not any(self.dest.iterdir()):
            return
        if not self.overwrite:
            raise ResidualsError(
                f"The output folder {self.dest} already exists and is not empty.",
                "Choose a new folder, or pass overwrite=True (--overwrite) to replace it once the new one is complete.",
            )
        foreign = sorted(
            p.name
            for p in self.dest.iterdir()
            if not (p.is_dir() and p.name in OUTPUT_FOLDERS)
            and not (p.is_file() and (p.suffix in OUTPUT_SUFFIXES or p.name == ".gitattributes"))
        )
        if foreign:
            raise ResidualsError(
                f"{self.dest} holds more than a model ({', '.join(foreign[:3])}"
                + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                + "): --overwrite only replaces a folder of model files, such as an earlier result.",
                "Choose a new output folder, or move those files away first.",
            )

    def _publish(self) -> None:
        old = None
        if self.dest.exists():
            if not self.overwrite and (not self.dest.is_dir() or any(self.dest.iterdir())):
                raise ResidualsError(
                    f"{self.dest} appeared while this run was writing (another program wrote it); it was left as it was.",
                    "Choose a new output folder, or pass --overwrite to replace it.",
                )
            old = self.dest.parent / f".{self.dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.dest, old)
        if self.fsync:
            _fsync_tree(self.path)
        try:
            os.rename(self.path, self.dest)
        except BaseException:
            if old is not None:
                os.rename(old, self.dest)  # the earlier result stays as it was
            raise
        if self.fsync:
            _fsync_path(self.dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and directory below `folder`, deepest first (already-flushed files cost nothing)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync_path(path)
    _fsync_path(folder)


def _remove_stale_partials(dest: Path) -> None:
    """Remove leftovers of earlier runs for the same destination whose process is gone."""
    for leftover in dest.parent.glob(f".{dest.name}.partial-*"):
        try:
            pid = int(leftover.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            continue


# ---- a Hub repo --------------------------------------------------------------------------------------
COMMIT_ATTEMPTS = 3  # a commit whose outcome is unknown (timeout, 5xx) is looked for, then tried again
COMMIT_RETRY_WAIT_S = 2.0
UNKNOWN_OUTCOME = (408, 500, 502, 503, 504)


def same_repo(a: str, b: str) -> bool:
    """Hub repo ids are case-insensitive: `alice/MyModel` and `alice/mymodel` are one repo."""
    return a.removeprefix("hf://").lower() == b.removeprefix("hf://").lower()


RUN_MARKER = "residuals-run: "  # + the run's id, in the description of the commit that publishes it


class HubRepoSink(Sink):
    """Stream a result into a Hub model repo: shards uploaded as they finish, one commit at the end.

    The real Hub's ways are handled here: the card's metadata is validated before the first byte
    goes up; a shard the Hub wants in "regular" mode stays on disk until the commit reads it; a
    commit that fails is looked for on the Hub before anything is cleaned up (a timed-out commit may
    have landed) and tried again when its outcome is unknown; and a failed run keeps what it uploaded
    so that running it again resumes (Xet or LFS skip the bytes the Hub already holds). Only a run
    stopped on purpose, or one that failed before uploading anything, deletes a repo it created.
    """

    upload_revision: str | None = None  # where shards are uploaded to (None: main)

    def __init__(
        self,
        repo_id: str,
        options: Options,
        *,
        commit_message: str = "Upload with Residuals Studio",
        inputs: list[str] = (),
        card_metadata: str | None = None,
    ):
        self.requested = repo_id
        self.inputs = [name.removeprefix("hf://") for name in inputs]
        self.options = options
        self.commit_message = commit_message
        self.card_metadata = card_metadata
        self.repo_id = repo_id
        self.location = repo_id
        self.path = Path()  # set on enter
        self.run_marker = f"{RUN_MARKER}{uuid.uuid4().hex}"  # finds this run's commit on the Hub
        self.uploaded = 0  # weight files the Hub holds for this run (resumable)
        self._api = None
        self._created = False
        self._commit_tried = False  # only then can a failed run's commit have landed all the same
        self._operations: list = []
        self._slots = threading.Semaphore(UPLOAD_SLOTS)
        self._queue: queue.Queue[tuple[Path, str, dict | None, bool] | None] = queue.Queue()
        self._failure: BaseException | None = None
        self._threads: list[threading.Thread] = []

    def disk_needed(self, shard_sizes: list[int]) -> tuple[Path, int]:
        pairs = [a + b for a, b in itertools.pairwise(shard_sizes)]
        return work_dir(self.options), max(pairs or shard_sizes or [0])

    def __enter__(self) -> HubRepoSink:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        from .hub import hub_errors, with_rate_limits, writable_repo_id

        self._api = HfApi(token=self.options.token)
        self.repo_id = writable_repo_id(self._api, self.requested)
        if any(same_repo(self.repo_id, name) for name in self.inputs):
            raise ResidualsError(
                f"--push-to {self.repo_id} is one of this run's inputs (repo ids are case-insensitive): "
                "the result would replace its files.",
                "Push to a new repo (e.g. add -merged to the name).",
            )
        self._check_card()
        with hub_errors(self.repo_id, None):
            existed = with_rate_limits(lambda: self._api.repo_exists(self.repo_id))
            if existed:
                url = with_rate_limits(
                    lambda: self._api.create_repo(self.repo_id, private=self.options.private, exist_ok=True)
                )
            else:
                try:  # exist_ok=False: of two runs racing for one new name, only one may think it made it
                    url = with_rate_limits(
                        lambda: self._api.create_repo(
                            self.repo_id, private=self.options.private, exist_ok=False
                        )
                    )
                except HfHubHTTPError as exc:
                    if exc.response is None or exc.response.status_code != 409:
                        raise
                    raise ResidualsError(
                        f"{self.repo_id} was created by someone else (another run?) while this one was starting.",
                        "Wait for that run to finish, or push to another name.",
                    ) from None
                self._created = True
        self.location = str(url)
        folder = work_dir(self.options)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=".residuals-push-", dir=folder))
        except OSError as exc:
            self._discard(deliberate=True)
            raise from_os_error(exc, f"Making the upload staging folder in {folder}") from exc
        # one uploader per slot: the last two shards go up side by side, which shortens the tail
        self._threads = [
            threading.Thread(target=self._upload_shards, name=f"hub-upload-{i}", daemon=True)
            for i in range(UPLOAD_SLOTS)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def _check_card(self) -> None:
        """The Hub checks card metadata only at commit time, after every upload: ask it now instead."""
        if self.card_metadata is None:
            return
        from .hub import hub_errors, with_rate_limits

        try:
            with hub_errors(self.repo_id, None):
                with_rate_limits(lambda: self._api._validate_yaml(self.card_metadata, repo_type="model"))
        except ValueError as exc:
            if isinstance(exc, ResidualsError):
                raise
            raise ResidualsError(
                f"The Hub would refuse the model card of {self.repo_id}: {str(exc).strip()}",
                "Nothing was uploaded. Name inputs by their Hub ids (card metadata may only name models "
                "that exist on the Hub), or fix the license/language/tags given.",
            ) from None

    # ---- the writer's hooks ----------------------------------------------------------------------
    def before_shard(self) -> None:
        while not self._slots.acquire(timeout=0.2):
            self._check_uploads()
        self._check_uploads()

    def shard_done(self, path: Path, checksums: dict) -> None:
        self._queue.put((path, path.name, checksums, True))

    def add_file(self, path: Path, path_in_repo: str) -> None:
        """Upload a finished file from elsewhere (a pushed folder) as it comes: read, never deleted."""
        self.before_shard()
        self._queue.put((Path(path), path_in_repo, None, False))

    def _upload_shards(self) -> None:
        from huggingface_hub import CommitOperationAdd

        from .hub import with_rate_limits

        while (item := self._queue.get()) is not None:
            path, path_in_repo, checksums, owned = item
            uploaded = False
            try:
                if self._failure is None:
                    operation = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(path))
                    if checksums is not None:  # known from writing: no second read to hash it
                        operation.upload_info.sha256 = bytes.fromhex(checksums["sha256"])
                    # a rerun: Xet sends only chunks the Hub lacks; LFS skips objects it already holds
                    with_rate_limits(
                        lambda op=operation: self._api.preupload_lfs_files(
                            self.repo_id, additions=[op], revision=self.upload_revision
                        )
                    )
                    uploaded = self._uploaded(operation, checksums)
                    self.uploaded += uploaded
            except BaseException as exc:
                self._failure = self._failure or exc
            finally:
                if owned and (uploaded or self._failure is not None):
                    with contextlib.suppress(OSError):
                        path.unlink()
                self._slots.release()
                self._queue.task_done()
        self._queue.task_done()

    def _uploaded(self, operation: Any, checksums: dict | None) -> bool:
        """A file is preuploaded: keep its operation for the commit; whether its local copy may go.

        A "regular" file is not uploaded yet: the commit reads it, so it must stay on disk."""
        self._operations.append(operation)
        return operation._upload_mode == "lfs" and operation._is_uploaded

    def _check_uploads(self) -> None:
        if self._failure is not None:
            from .hub import hub_refusal

            cause = self._failure
            problem = (
                hub_refusal(cause, self.repo_id).problem
                if getattr(cause, "response", None) is not None
                else f"{type(cause).__name__}: {cause}"
            )
            raise ResidualsError(
                f"Uploading to {self.repo_id} failed ({problem}).",
                "Check your connection and token, then run the same command again: what the Hub already "
                "holds is not sent again.",
            ) from cause

    # ---- publishing -------------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        try:
            if exc_type is not None:
                deliberate = not isinstance(exc, Exception) or isinstance(exc, Cancelled)
                cleanup = self._discard(deliberate=deliberate)
                if isinstance(exc, OSError):
                    raise from_os_error(
                        exc, f"Staging the upload to {self.repo_id} in {self.path.parent}"
                    ) from exc
                if isinstance(exc, ResidualsError) and not deliberate:
                    raise ResidualsError(f"{exc.problem} {cleanup}", exc.fix) from exc
                return
            try:
                self._check_uploads()
                self._commit()
            except BaseException as failure:
                deliberate = not isinstance(failure, Exception)
                cleanup = self._discard(deliberate=deliberate)
                problem = (
                    failure.problem
                    if isinstance(failure, ResidualsError)
                    else f"{type(failure).__name__}: {failure}"
                )
                fix = failure.fix if isinstance(failure, ResidualsError) else "Run the same command again."
                raise ResidualsError(
                    f"Pushing to {self.repo_id} failed ({problem}). {cleanup}", fix
                ) from failure
        finally:
            shutil.rmtree(self.path, ignore_errors=True)

    def _commit(self) -> None:
        """One commit; when its answer is lost (timeout, 5xx) look for it on the Hub, then try again."""
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import httpx

        from .hub import hub_refusal, rate_limit_wait

        weights = self._final_operations()
        shards = {op.path_in_repo for op in weights}
        small = [
            CommitOperationAdd(path_in_repo=p.relative_to(self.path).as_posix(), path_or_fileobj=str(p))
            for p in sorted(self.path.rglob("*"))
            if p.is_file() and p.relative_to(self.path).as_posix() not in shards
        ]
        self._commit_tried = True
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                self._api.create_commit(
                    repo_id=self.repo_id,
                    operations=[*weights, *small],
                    commit_message=self.commit_message,
                    commit_description=self.run_marker,
                    parent_commit=self._parent_commit(),
                )
                return
            except (HfHubHTTPError, httpx.TransportError) as exc:
                response = getattr(exc, "response", None)
                status = response.status_code if response is not None else None
                wait = rate_limit_wait(response)
                # 412: main moved since `_parent_commit` (another writer); ours may be the commit that did
                unknown = status in (*UNKNOWN_OUTCOME, 412) or status is None or wait is not None
                if unknown and self._landed():
                    return  # the commit was made; only its answer was lost
                if not unknown or attempt == COMMIT_ATTEMPTS:
                    if response is None:
                        raise
                    raise hub_refusal(exc, self.repo_id) from exc
                time.sleep(wait[0] + 1 if wait else COMMIT_RETRY_WAIT_S * attempt)

    def _final_operations(self) -> list:
        """The weight files' operations of the one commit."""
        return self._operations

    def _parent_commit(self) -> str | None:
        """The commit the one commit must follow (None: whatever main is then)."""
        return None

    def _landed(self) -> bool:
        """Whether this run's commit is on the repo's main branch (found by the run's marker)."""
        from .hub import with_rate_limits

        try:
            commits = with_rate_limits(lambda: self._api.list_repo_commits(self.repo_id))
        except Exception:
            return False
        return any(self.run_marker in (c.message or "") for c in commits[:5])

    def _discard(self, *, deliberate: bool) -> str:
        """After a failure: say what is left. A repo this run created goes only when nothing was uploaded
        to it or the run was stopped on purpose; otherwise it keeps the uploads for a resume."""
        if self._commit_tried and self._landed():
            return f"The result was committed to {self.repo_id} all the same."
        if not self._created:
            return f"The existing repo {self.repo_id} was left as it was (no commit was made)" + (
                f"; the {self.uploaded} weight file(s) already uploaded are kept for a rerun."
                if self.uploaded
                else "."
            )
        if self.uploaded and not deliberate:
            return (
                f"The repo {self.repo_id}, created by this run, was kept without a commit: it holds the "
                f"{self.uploaded} weight file(s) already uploaded. Run the same command again to resume "
                f"(they are not sent again), or delete it (hf repos delete {self.repo_id})."
            )
        try:
            self._api.delete_repo(self.repo_id)
        except Exception:
            return f"The repo {self.repo_id} was created by this run but could not be deleted; delete it on the Hub."
        return f"The empty repo {self.repo_id} created by this push was deleted."
