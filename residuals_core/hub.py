"""The Hugging Face Hub: opening model ids for streaming, and pushing finished folders.

Opening a model fetches only its small files (config, tokenizer, index, card) and reads the
safetensors headers by range; the weights are streamed later by `sources.HubFile`, never stored.
Pushes refuse namespaces the token cannot write, and remove a repo they created if the upload
then fails, so no empty repo is left.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import TypeVar

from .checkpoint import (
    INDEX_NAME,
    Checkpoint,
    PickleCheckpoint,
    hub_weight_locations,
    read_json,
    unindexed_weight_files,
)
from .errors import ResidualsError
from .options import DEFAULT_MAX_SMALL_FILE_BYTES
from .sources import DEFAULT_READ_AHEAD_BYTES
from .tokenizer import TOKENIZER_FILES

T = TypeVar("T")
log = logging.getLogger("residuals_core")
LARGE_FILE_BYTES = 1024 * 1024  # a pushed folder's files this large are uploaded as they are, not copied
RATE_LIMIT_RETRIES = 6  # waits for a rate limit to reset before a call gives up
MAX_RATE_LIMIT_WAIT_S = 330  # the Hub's windows are 5 minutes

# The small files the engine reads from a Hub model, by name: nothing else of a repo is fetched
# (a repo's README, extra tokenizer dumps or notebooks are never needed to stream its weights).
SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "residuals_manifest.json",
    INDEX_NAME,
    *TOKENIZER_FILES,
)
SMALL_FILE_PATTERNS = ("*.tiktoken",)
META_PATTERNS = [*SMALL_FILES, *SMALL_FILE_PATTERNS]


def small_files_of(repo_id: str, siblings: list, max_bytes: int) -> dict[str, int]:
    """{file: size} of the small files a Hub model has, sizes from its tree listing; refused beyond `max_bytes`.

    The cap is checked before anything is downloaded, so a repo cannot make a look at its headers
    cost gigabytes of disk by calling a huge file `tokenizer.json`.
    """
    chosen = {}
    for sibling in siblings:
        name = sibling.rfilename
        if "/" in name or not (name in SMALL_FILES or any(fnmatch(name, p) for p in SMALL_FILE_PATTERNS)):
            continue
        size = sibling.size if sibling.size is not None else (sibling.lfs.size if sibling.lfs else 0)
        if size > max_bytes:
            raise ResidualsError(
                f"{repo_id}'s {name} is {size / 1e6:,.1f} MB, more than the {max_bytes / 1e6:,.0f} MB a "
                "model's config or tokenizer file may be here, so it was not downloaded.",
                "This is not a usual model repo: choose another model (or, with the library, raise "
                "max_small_file_bytes if you trust this one).",
            )
        chosen[name] = size
    return chosen


def looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


HUB_PREFIX = "hf://"  # names the Hub explicitly: never read as a local folder, whatever exists on disk


def valid_repo_id(name: str) -> bool:
    """The Hub's own rule for a repo id, 'name' or 'namespace/name' (huggingface_hub's validate_repo_id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def split_revision(name: str) -> tuple[str, str | None]:
    """'org/model@REV' -> ('org/model', 'REV'): a Hub id pinned to a commit or branch (HfFileSystem's form)."""
    repo, at, revision = name.partition("@")
    return (repo, revision) if at and revision and "/" not in revision else (name, None)


def is_hub_id(name: str) -> bool:
    """True for 'org/model' style ids that are not an existing local path, and for any 'hf://org/model'
    (either may be pinned to a revision: 'hf://org/model@COMMIT')."""
    if "@" in name:
        name = split_revision(name)[0]
    if name.startswith(HUB_PREFIX):
        bare = name.removeprefix(HUB_PREFIX)
        return not looks_like_local_path(bare) and valid_repo_id(bare)
    return not Path(name).expanduser().exists() and not looks_like_local_path(name) and valid_repo_id(name)


def _check_local_name(name: str) -> None:
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise ResidualsError(f"{name} is a file, not a folder.", "Give the model's folder or a Hub id.")
    if not path.is_dir():
        raise ResidualsError(
            f"No folder at {name}, and it is not a Hub model id (like 'org/model').",
            "Check the path for typos, or give a Hub id such as 'Qwen/Qwen2.5-0.5B'.",
        )


def rate_limit_wait(response) -> tuple[float, str] | None:
    """(seconds until the limit resets, which limit) for a 429 answer, from its RateLimit / Retry-After."""
    from huggingface_hub.utils import parse_ratelimit_headers

    if response is None or response.status_code != 429:
        return None
    info = parse_ratelimit_headers(response.headers)
    if info is not None:
        return float(info.reset_in_seconds), info.resource_type
    retry_after = (response.headers.get("Retry-After") or "").strip()
    return (float(retry_after) if retry_after.isdigit() else 10.0), "requests"


def wait_out(wait: tuple[float, str], attempt: int, attempts: int) -> None:
    """Sleep until a rate limit resets, saying why nothing moves (the CLI prints these warnings)."""
    seconds = min(wait[0] + 1, MAX_RATE_LIMIT_WAIT_S)
    log.warning(
        "The Hub is rate-limiting this run (its '%s' limit): waiting %.0f s before trying again (%d of %d).",
        wait[1],
        seconds,
        attempt,
        attempts,
    )
    time.sleep(seconds)


def rate_limited_error(what: str, limit: str) -> ResidualsError:
    """What to say once the waits ran out: a rate limit, not a wrong id or token."""
    return ResidualsError(
        f"The Hub kept rate-limiting {what} (its '{limit}' limit).",
        "Wait a few minutes and run again; requests made with a token (logged in) get higher limits.",
    )


def with_rate_limits(call: Callable[[], T], *, attempts: int = RATE_LIMIT_RETRIES) -> T:
    """Run a Hub API call, waiting out 429 answers as the Hub asks (said in progress) a few times."""
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, attempts):
        try:
            return call()
        except HfHubHTTPError as exc:
            wait = rate_limit_wait(exc.response)
            if wait is None:
                raise
            wait_out(wait, attempt, attempts)
    return call()


_WHOAMI: dict[tuple[str, str], dict] = {}
_WHOAMI_LOCK = threading.Lock()


def whoami(api) -> dict:
    """The token's user and orgs, asked once per token and endpoint: the Hub rate-limits whoami hard."""
    from huggingface_hub.utils import get_token

    token = api.token if isinstance(api.token, str) else get_token() if api.token is not False else None
    key = (api.endpoint, token or "")
    with _WHOAMI_LOCK:
        if key in _WHOAMI:
            return _WHOAMI[key]
    who = with_rate_limits(api.whoami)
    with _WHOAMI_LOCK:
        _WHOAMI[key] = who
    return who


@contextmanager
def hub_errors(repo_id: str, revision: str | None):
    """Turn huggingface_hub's exceptions into messages that say what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError as exc:
        raise hub_refusal(exc, repo_id) from exc
    except RepositoryNotFoundError as exc:
        raise ResidualsError(
            f"Model {repo_id} was not found on the Hub (or it is private).",
            "Check the id's spelling; for a private model pass a token with read access (token=... / HF_TOKEN).",
        ) from exc
    except RevisionNotFoundError as exc:
        raise ResidualsError(
            f"Revision {revision!r} of {repo_id} does not exist.", "Use an existing branch, tag or commit."
        ) from exc
    except LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError: caught first
        raise ResidualsError(
            f"Could not read {repo_id}: the Hub is unreachable and it is not in the local cache.",
            "Check your network connection (or HF_HUB_OFFLINE / HF_ENDPOINT), or give a local folder.",
        ) from exc
    except EntryNotFoundError as exc:
        raise ResidualsError(
            f"{repo_id}: a file it lists could not be found ({exc}).", "Try again later."
        ) from exc
    except HfHubHTTPError as exc:
        raise hub_refusal(exc, repo_id) from exc
    except Exception as exc:
        from huggingface_hub.utils import httpx

        if isinstance(exc, ResidualsError) or not isinstance(exc, (OSError, httpx.TransportError)):
            raise
        from huggingface_hub import constants

        raise ResidualsError(
            f"Could not reach the Hub at {constants.ENDPOINT} for {repo_id} ({type(exc).__name__}: {exc}).",
            "Check your network connection (or HF_ENDPOINT), or give a local folder.",
        ) from exc


def hub_refusal(exc, repo_id: str) -> ResidualsError:
    """A refused Hub request in words that match its cause: gated, rate limit, quota, scope, or the rest."""
    from huggingface_hub.errors import GatedRepoError

    if isinstance(exc, GatedRepoError):
        return ResidualsError(
            f"{repo_id} is gated: your account has not been granted access.",
            "Accept its licence on the model page, then pass a token (token=... / HF_TOKEN) of that account.",
        )
    response = getattr(exc, "response", None)
    status = response.status_code if response is not None else None
    text = str(exc)
    wait = rate_limit_wait(response)
    if wait is not None:
        return rate_limited_error(f"requests for {repo_id} after {RATE_LIMIT_RETRIES} waits", wait[1])
    if status == 403 and "storage" in text.lower() and ("limit" in text.lower() or "quota" in text.lower()):
        return ResidualsError(
            f"The Hub refused to store more in {repo_id}: your private storage quota is full ({text.strip()}).",
            "Free private storage (delete or make public older repos), upgrade your plan, or push without "
            "--private.",
        )
    if status == 403 and "scope" in text.lower():
        return ResidualsError(
            f"Your token may not do this for {repo_id}: {text.strip()}",
            "Log in again granting that permission, or use a token that has it.",
        )
    return ResidualsError(f"The Hub refused a request for {repo_id}: {exc}", "Check the id and your token.")


def open_hub_model(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES,
    max_small_file_bytes: int = DEFAULT_MAX_SMALL_FILE_BYTES,
) -> Checkpoint:
    """A Hub model at one commit: small files fetched, headers by ranged reads, weights streamed later.

    Only config, tokenizer, index and manifest files land in `cache_dir`, each at most
    `max_small_file_bytes` by the tree listing; weight files are read as they stream (sha256
    checked). Pickled weights (only with `allow_pickle`) have no header to read remotely and
    cannot be streamed, so they are downloaded.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    repo_id, pinned = split_revision(repo_id.removeprefix("hf://"))
    revision = revision or pinned
    api = HfApi(token=token)
    with hub_errors(repo_id, revision):
        info = with_rate_limits(lambda: api.model_info(repo_id, revision=revision, files_metadata=True))
        commit = info.sha
        small = small_files_of(repo_id, info.siblings or [], max_small_file_bytes)
        folder = Path(
            snapshot_download(
                repo_id, revision=commit, token=token, cache_dir=cache_dir, allow_patterns=list(small)
            )
        )
        locations = hub_weight_locations(
            repo_id, commit, info.siblings or [], folder, token, allow_pickle=allow_pickle
        )
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
        if not all(loc.filename.endswith(".safetensors") for loc in locations):
            files = [
                Path(
                    hf_hub_download(repo_id, loc.filename, revision=commit, token=token, cache_dir=cache_dir)
                )
                for loc in locations
            ]
            return PickleCheckpoint(repo_id, folder, files, config)
        listing = [s.rfilename for s in info.siblings or [] if "/" not in s.rfilename]
        indexed = any(name == INDEX_NAME for name in listing)
        checkpoint = Checkpoint.open_hub(
            repo_id,
            folder,
            locations,
            config,
            read_ahead_bytes=read_ahead_bytes,
            unindexed=unindexed_weight_files(listing, [loc.filename for loc in locations])
            if indexed
            else None,
        )
        checkpoint.small_file_bytes = sum(small.values())
        return checkpoint


def resolve_model_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_small_file_bytes: int = DEFAULT_MAX_SMALL_FILE_BYTES,
) -> Path:
    """A local folder as is, or a Hub id downloaded whole into the cache (for transformers to load).

    The engine never needs this (it streams); loading a model for generation does.
    """
    from huggingface_hub import snapshot_download

    name = str(name_or_path)
    if not is_hub_id(name):
        _check_local_name(name)
        return Path(name).expanduser()
    with open_hub_model(
        name, revision=revision, token=token, cache_dir=cache_dir, max_small_file_bytes=max_small_file_bytes
    ) as checkpoint:
        files = list(checkpoint.readers)
        commit = next(iter(checkpoint.readers.values())).location.commit
    with hub_errors(name, revision):
        return Path(
            snapshot_download(
                name.removeprefix("hf://"),
                revision=commit,
                token=token,
                cache_dir=cache_dir,
                allow_patterns=files + META_PATTERNS,
            )
        )


def writable_repo_id(api, repo_id: str) -> str:
    """The full repo id (namespace added) after checking the token can write there; refuse otherwise."""
    from huggingface_hub.errors import HfHubHTTPError

    with hub_errors(repo_id, None):
        try:
            who = whoami(api)
        except HfHubHTTPError as exc:
            if rate_limit_wait(exc.response) is not None:
                raise
            raise ResidualsError(
                "The Hub did not accept the token (whoami failed).",
                "Log in again or pass a valid write token (token=... / HF_TOKEN).",
            ) from exc
    writable = {who.get("name")} | {org.get("name") for org in who.get("orgs", []) or []}
    if "/" not in repo_id:
        repo_id = f"{who['name']}/{repo_id}"
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ResidualsError(
            f"{repo_id!r} is not a valid repo id ({exc}).", "Use a name like 'you/my-model'."
        ) from None
    namespace = repo_id.split("/", 1)[0]
    if namespace.lower() not in {n.lower() for n in writable if n}:  # namespaces are case-insensitive
        raise ResidualsError(
            f"Your token (user {who.get('name')!r}) cannot write to the namespace {namespace!r}.",
            f"Push to one of: {', '.join(sorted(n for n in writable if n))}.",
        )
    return repo_id


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    exist_ok: bool = True,
    commit_message: str = "Upload with Residuals Studio",
    readme: str | None = None,
) -> str:
    """Create (if needed) and upload a folder to a model repo the token can write; return its URL.

    The same sink as a streamed result: large files go up as they come (Xet or LFS), one commit
    holds every file, the card is validated first, and a failed push can be resumed. `readme`
    replaces the folder's README.md in that commit (a card written for the repo's name).
    """
    from huggingface_hub import HfApi

    from .options import Options
    from .sinks import HubRepoSink

    folder = Path(folder)
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    card_text = readme
    if card_text is None and (folder / "README.md").is_file():
        card_text = (folder / "README.md").read_text()
    metadata = card_text if card_text is not None and card_text.startswith("---") else None
    if not exist_ok:
        api = HfApi(token=token)
        full_id = writable_repo_id(api, repo_id)
        with hub_errors(full_id, None):
            if with_rate_limits(lambda: api.repo_exists(full_id)):
                raise ResidualsError(
                    f"{full_id} already exists.", "Choose another name or pass exist_ok=True."
                )
    with HubRepoSink(
        repo_id,
        Options(token=token, private=private),
        commit_message=commit_message,
        card_metadata=metadata,
    ) as sink:
        for path in files:
            name = path.relative_to(folder).as_posix()
            if readme is not None and name == "README.md":
                continue
            if path.stat().st_size >= LARGE_FILE_BYTES:
                sink.add_file(path, name)  # uploaded from where it is, never copied
            else:
                (sink.path / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, sink.path / name)
        if readme is not None:
            (sink.path / "README.md").write_text(readme)
    return sink.location
