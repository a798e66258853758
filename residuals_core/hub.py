"""The Hugging Face Hub: resolving model ids to local folders, and pushing folders.

Downloads fetch only what the engine reads (safetensors weights and index, configs, tokenizer
files), never pickled weights unless the caller opted in. Pushes refuse namespaces the token
cannot write, and remove a repo they created if the upload then fails, so no empty repo is left.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ResidualsError

HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
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
]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]


def looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> Path:
    """A local folder as is, or a Hub id downloaded (only the files the engine needs) to the cache."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ResidualsError(f"{name} is a file, not a folder.", "Give the model's folder or a Hub id.")
    if looks_like_local_path(name) or not HUB_ID.match(name):
        raise ResidualsError(
            f"No folder at {name}, and it is not a Hub model id (like 'org/model').",
            "Check the path for typos, or give a Hub id such as 'Qwen/Qwen2.5-0.5B'.",
        )
    repo_id = name.removeprefix("hf://")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = WEIGHT_PATTERNS + META_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        folder = snapshot_download(
            repo_id, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=patterns
        )
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
    except LocalEntryNotFoundError as exc:
        raise ResidualsError(
            f"Could not download {repo_id}: the Hub is unreachable and it is not in the local cache.",
            "Check your network connection (or HF_HUB_OFFLINE / HF_ENDPOINT), or give a local folder.",
        ) from exc
    return Path(folder)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    exist_ok: bool = True,
    commit_message: str = "Upload with Residuals Studio",
) -> str:
    """Create (if needed) and upload a folder to a model repo the token can write; return its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
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
    namespace = repo_id.split("/", 1)[0]
    if namespace not in writable:
        raise ResidualsError(
            f"Your token (user {who.get('name')!r}) cannot write to the namespace {namespace!r}.",
            f"Push to one of: {', '.join(sorted(n for n in writable if n))}.",
        )
    existed = api.repo_exists(repo_id)
    if existed and not exist_ok:
        raise ResidualsError(f"{repo_id} already exists.", "Choose another name or pass exist_ok=True.")
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    try:
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
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
