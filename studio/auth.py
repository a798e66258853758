"""Whose token a call carries: one rule for reads, writes and Jobs, on a Space and locally.

On a Space a visitor's requests carry the visitor's own login (OAuth), or no token at all — never
the Space's own HF_TOKEN, which huggingface_hub would send if given None. Run locally, a pasted
token or the machine's own login is used. Nothing here knows Gradio: the app hands over a `Login`.
"""

from __future__ import annotations

from dataclasses import dataclass

from residuals_core.errors import ResidualsError

MOCK_OAUTH = "mock-oauth-token-for-local-dev"  # Gradio's stand-in login when not on a Space


@dataclass(frozen=True)
class Login:
    """A visitor's sign-in as Gradio reports it: the token, the scopes granted ("" or None when
    unknown, as for a token passed through the API) and when it expires (None when unknown)."""

    token: str
    scope: str | None = None
    expires_at: float | None = None

    @property
    def mocked(self) -> bool:
        return self.token == MOCK_OAUTH


@dataclass(frozen=True)
class Credentials:
    """The rule, for one host: `on_space`, and locally the machine's own token (HF_TOKEN or a login)."""

    on_space: bool
    machine_token: str | None = None

    def read_token(self, login: Login | None, pasted: str | None = None) -> str | bool | None:
        """Reads: the visitor's login on a Space, else False (no token at all); locally a pasted
        token, else the machine's own login (None lets huggingface_hub find it)."""
        if self.on_space:
            return login.token if login is not None and not login.mocked else False
        return (pasted or "").strip() or None

    def write_token(self, login: Login | None, pasted: str | None = None) -> str:
        """Pushes and Jobs: the visitor's own login (locally also a pasted or the machine's token)."""
        token = None
        if login is not None and not login.mocked:
            token = login.token
        elif login is not None and not self.on_space:
            token = self.machine_token  # locally, Gradio mocks the login with this machine's token
        if not self.on_space:
            token = (pasted or "").strip() or token  # on a Space there is no token field
        if token is None:
            raise ResidualsError(
                "You are not logged in.",
                "Click 'Sign in with Hugging Face' above"
                + (
                    ""
                    if self.on_space
                    else ", or (running locally) paste a write token in the token field or set HF_TOKEN"
                )
                + ". Nothing was pushed.",
            )
        return token

    def check_may_run_jobs(self, login: Login | None) -> None:
        """A login that did not grant the 'jobs' scope is refused before anything is submitted."""
        if login is not None and login.scope and "jobs" not in login.scope.split():
            raise ResidualsError(
                "Your login did not grant this Space the right to run Jobs.",
                "Log out and in again, allowing 'Run Jobs' when Hugging Face asks.",
            )
