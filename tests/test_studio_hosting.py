"""The hosting rules on their own: what a model field may name, whose token a read carries, job estimates."""

from __future__ import annotations

import pytest

from residuals_core import ResidualsError
from residuals_core.demo import DEMO_FAMILY
from studio.hosting import (
    SESSION_MERGED,
    SESSION_RESIDUALS,
    HostLimits,
    InputPolicy,
    estimate_job,
    refuse_if_too_long,
)

SPACE = InputPolicy(on_space=True)
LOCAL = InputPolicy(on_space=False)


@pytest.mark.parametrize("policy", [SPACE, LOCAL], ids=["space", "local"])
def test_demo_models_and_session_results_by_name(policy):
    assert policy.resolve("demo:base-v1", role="base") == str(DEMO_FAMILY / "base-v1")
    session = {SESSION_RESIDUALS: "/srv/s1/residuals", SESSION_MERGED: None}
    assert policy.resolve(SESSION_RESIDUALS, role="residuals", session=session) == "/srv/s1/residuals"
    with pytest.raises(ResidualsError, match=r"no this session's merged model yet.*Apply"):
        policy.resolve(SESSION_MERGED, role="merged", session=session)
    with pytest.raises(ResidualsError, match=r"not a model of the demo family.*demo:base-v1"):
        policy.resolve("demo:../../etc", role="base")


@pytest.mark.parametrize(
    "text",
    [
        "/",
        "/etc/passwd",
        "./models/x",
        "../x",
        "~/.cache/huggingface",
        "a/b/c",
        "app.py",
        "C:\\x",
        "org/na me",
    ],
)
def test_on_a_space_anything_but_a_hub_id_is_refused(text):
    with pytest.raises(ResidualsError, match=r"folders on the server cannot be read.*Hub model id"):
        SPACE.resolve(text, role="base")


def test_on_a_space_a_hub_id_always_means_the_hub():
    # even where a folder of that name exists on the server, the Hub is meant
    assert SPACE.resolve("tests/tiny", role="base") == "hf://tests/tiny"
    assert SPACE.resolve("Qwen/Qwen2.5-0.5B", role="base") == "hf://Qwen/Qwen2.5-0.5B"


def test_locally_folders_work_and_names_are_bounded():
    assert LOCAL.resolve("/data/my-model", role="base") == "/data/my-model"
    with pytest.raises(ResidualsError, match="5000 characters"):
        LOCAL.resolve("x" * 5000, role="base")
    with pytest.raises(ResidualsError, match="base field is empty"):
        SPACE.resolve("  ", role="base")


def test_estimates_and_refusal():
    limits = HostLimits(max_seconds=60, hub_bytes_per_s=100e6, local_bytes_per_s=1e9)
    estimate = estimate_job([(4e9, True), (2e9, True), (1e9, False)], 2e9, limits)
    assert estimate.hub_read_bytes == 6e9 and estimate.local_read_bytes == 1e9
    assert estimate.seconds == pytest.approx(6e9 / 100e6 + 3)  # the link sets the pace
    assert "6.00 GB streamed from the Hub" in estimate.describe()
    with pytest.raises(ResidualsError, match="about 63 s here: more than the 60 s"):
        refuse_if_too_long(estimate, limits)
    refuse_if_too_long(estimate_job([(1e6, False)], 1e6, limits), limits)
    limits = HostLimits.from_environment({"STUDIO_MAX_JOB_MINUTES": "5", "STUDIO_HUB_MB_PER_S": "50"})
    assert limits.max_seconds == 300 and limits.hub_bytes_per_s == 50e6


def test_fixes_are_said_as_a_visitor_can_act_on_them():
    from studio.hosting import visitor_fix

    assert "Sign in" in visitor_fix("Check the id; for a private model pass a token (token=... / HF_TOKEN).")
    assert "try again in a minute" in visitor_fix(
        "Check your network connection (or HF_HUB_OFFLINE / HF_ENDPOINT)."
    )
    assert "short of disk" in visitor_fix("Free some space, or point TMPDIR (work_dir=) at a larger disk.")
    assert visitor_fix("Use models of one family and size.") == "Use models of one family and size."
