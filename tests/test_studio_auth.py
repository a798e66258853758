"""studio.auth: whose token each call carries, on a Space and locally."""

from __future__ import annotations

import pytest

from residuals_core.errors import ResidualsError
from studio.auth import MOCK_OAUTH, Credentials, Login

SPACE, LOCAL = Credentials(on_space=True), Credentials(on_space=False, machine_token="hf_machine")


def test_reads_carry_the_visitors_login_or_nothing_on_a_space():
    assert SPACE.read_token(None, "hf_pasted") is False  # never the Space's own, never pasted
    assert SPACE.read_token(Login(MOCK_OAUTH)) is False
    assert SPACE.read_token(Login("hf_visitor")) == "hf_visitor"
    assert LOCAL.read_token(None, " hf_pasted ") == "hf_pasted"
    assert LOCAL.read_token(None, "") is None  # locally: the machine's own login, found by huggingface_hub


def test_writes_need_a_login_and_say_how_to_get_one():
    with pytest.raises(
        ResidualsError, match=r"not logged in.*Sign in with Hugging Face.*Nothing was pushed"
    ) as info:
        SPACE.write_token(None, "hf_pasted")  # no token field on a Space
    assert "HF_TOKEN" not in str(info.value)
    assert SPACE.write_token(Login("hf_visitor")) == "hf_visitor"
    assert (
        LOCAL.write_token(Login(MOCK_OAUTH)) == "hf_machine"
    )  # Gradio's local stand-in: this machine's token
    assert LOCAL.write_token(Login(MOCK_OAUTH), "hf_pasted") == "hf_pasted"
    with pytest.raises(ResidualsError, match="set HF_TOKEN"):
        Credentials(on_space=False).write_token(None)


def test_jobs_need_the_jobs_scope_when_the_login_says_its_scopes():
    SPACE.check_may_run_jobs(Login("t", scope="openid write-repos jobs"))
    SPACE.check_may_run_jobs(Login("t", scope=""))  # a token given through the API: scopes unknown
    with pytest.raises(ResidualsError, match="did not grant this Space the right to run Jobs"):
        SPACE.check_may_run_jobs(Login("t", scope="openid write-repos"))
