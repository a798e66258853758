"""Push a session's result to the visitor's own Hub namespace."""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub import RepoUrl

from residuals_core import operations
from residuals_core.errors import ResidualsError
from residuals_core.hub import HUB_PREFIX

from ..auth import Login
from ..context import StudioContext, Workspace
from . import repo_name_given

NEXT_STEP = {"residuals": "compute residuals", "merged": "apply or merge", "lora": "export an adapter"}


@dataclass(frozen=True)
class Pushed:
    repo: str
    private: bool
    already: bool = False  # it had been written straight into that repo


def push(
    ctx: StudioContext,
    workspace: Workspace,
    session_hash: str | None,
    kind: str,
    repo_name: str,
    private: bool,
    login: Login | None,
    pasted_token: str | None,
) -> Pushed:
    ctx.check_open(workspace, session_hash)
    folder = workspace.get(kind)
    if not folder:
        raise ResidualsError(f"Nothing to push yet: {NEXT_STEP[kind]} first.", "Then push it.")
    if folder.startswith(HUB_PREFIX):
        return Pushed(folder.removeprefix(HUB_PREFIX), private, already=True)
    token = ctx.credentials.write_token(login, pasted_token)
    url = operations.push_to_hub(folder, repo_name_given(repo_name), private=private, token=token)
    return Pushed(RepoUrl(url).repo_id, private)
