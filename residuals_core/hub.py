"""The Hugging Face Hub: opening model ids for streaming, and pushing finished folders.

Opening a model fetches only its small files (config, tokenizer, index, card) and reads the
safetensors headers by range; the weights are streamed later by `sources.HubFile`, never stored.
Pushes refuse namespaces the token cannot write, and remove a repo they created if the upload
then fails, so no empty repo is left.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import (
    INDEX_NAME,
    Checkpoint,
    PickleCheckpoint,
    hub_weight_locations,
    read_json,
    unindexed_weight_files,
)
from .errors import ResidualsError
from .sources import DEFAULT_READ_AHEAD_BYTES

HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")
META_PATTERNS = [
    "config.json",
    "generation_config.json",
    "residuals_manifest.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "README.md",
    "model.safetensors.index.json",
]


def looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


HUB_PREFIX = "hf://"  # names the Hub explicitly: never read as a local folder, whatever exists on disk


def is_hub_id(name: str) -> bool:
    """True for 'org/model' style ids that are not an existing local path, and for any 'hf://org/model'."""
    if name.startswith(HUB_PREFIX):
        bare = name.removeprefix(HUB_PREFIX)
        return not looks_like_local_path(bare) and bool(HUB_ID.match(bare))
    return (
        not Path(name).expanduser().exists() and not looks_like_local_path(name) and bool(HUB_ID.match(name))
    )


def _check_local_name(name: str) -> None:
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise ResidualsError(f"{name} is a file, not a folder.", "Give the model's folder or a Hub id.")
    if not path.is_dir():
        raise ResidualsError(
            f"No folder at {name}, and it is not a Hub model id (like 'org/model').",
            "Check the path for typos, or give a Hub id such as 'Qwen/Qwen2.5-0.5B'.",
        )


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
        raise ResidualsError(
            f"{repo_id} is gated: your account has not been granted access.",
            "Accept its licence on the model page, then pass a token (token=... / HF_TOKEN) of that account.",
        ) from exc
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
        raise ResidualsError(
            f"The Hub refused a request for {repo_id}: {exc}", "Check the id and your token."
        ) from exc
    except Exception as exc:
        if isinstance(exc, ResidualsError) or not (
            isinstance(exc, OSError)
            or type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2")
        ):
            raise
        from huggingface_hub import constants

        raise ResidualsError(
            f"Could not reach the Hub at {constants.ENDPOINT} for {repo_id} ({type(exc).__name__}: {exc}).",
            "Check your network connection (or HF_ENDPOINT), or give a local folder.",
        ) from exc


def open_hub_model(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES,
) -> Checkpoint:
    """A Hub model at one commit: small files fetched, headers by ranged reads, weights streamed later.

    Only config, tokenizer, index and card files land in `cache_dir`; weight files are read as
    they stream (sha256 checked). Pickled weights (only with `allow_pickle`) have no header to
    read remotely and cannot be streamed, so they are downloaded.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    repo_id = repo_id.removeprefix("hf://")
    api = HfApi(token=token)
    with hub_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        commit = info.sha
        folder = Path(
            snapshot_download(
                repo_id, revision=commit, token=token, cache_dir=cache_dir, allow_patterns=META_PATTERNS
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
        return Checkpoint.open_hub(
            repo_id,
            folder,
            locations,
            config,
            read_ahead_bytes=read_ahead_bytes,
            unindexed=unindexed_weight_files(listing, [loc.filename for loc in locations])
            if indexed
            else None,
        )


def resolve_model_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder as is, or a Hub id downloaded whole into the cache (for transformers to load).

    The engine never needs this (it streams); loading a model for generation does.
    """
    from huggingface_hub import snapshot_download

    name = str(name_or_path)
    if not is_hub_id(name):
        _check_local_name(name)
        return Path(name).expanduser()
    with open_hub_model(name, revision=revision, token=token, cache_dir=cache_dir) as checkpoint:
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
            who = api.whoami()
        except HfHubHTTPError as exc:
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
    if namespace not in writable:
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

    One commit holds every file (large ones go through the library's LFS/Xet path); `readme`
    replaces the folder's README.md in that commit (a card written for the repo's name).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_id = writable_repo_id(api, repo_id)
    existed = api.repo_exists(repo_id)
    if existed and not exist_ok:
        raise ResidualsError(f"{repo_id} already exists.", "Choose another name or pass exist_ok=True.")
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    try:
        folder = Path(folder)
        operations = [
            CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
            for p in sorted(folder.rglob("*"))
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            and not (readme is not None and p.relative_to(folder).as_posix() == "README.md")
        ]
        if readme is not None:
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode()))
        api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
    except Exception as exc:
        if not existed:
            try:
                api.delete_repo(repo_id)
                cleanup = f"The empty repo {repo_id} created by this push was deleted."
            except Exception:
                cleanup = f"The repo {repo_id} was created but could not be deleted; delete it on the Hub."
        else:
            cleanup = f"The existing repo {repo_id} was left as it was."
        raise ResidualsError(
            f"Uploading to {repo_id} failed ({type(exc).__name__}: {exc}). {cleanup}", "Try the push again."
        ) from exc
    return str(url)
