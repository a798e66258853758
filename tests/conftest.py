import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# huggingface_hub reads HF_ENDPOINT when imported: point it at the local test Hub before anything imports it
HUB_PORT = _free_port()
ROOT = Path(__file__).resolve().parent.parent
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ.pop("HF_HUB_DISABLE_XET", None)  # uploads go through Xet, as they do for users
os.environ.pop("HF_TOKEN", None)

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402 (HF_ENDPOINT must be set first)
import torch  # noqa: E402
from tiny_models import make_family  # noqa: E402

torch.set_num_threads(1)


SLOW_FIXTURES = {"space", "served_app", "page"}  # a served app (and a browser): seconds per test


def pytest_collection_modifyitems(items):
    """Tests of the served app are slow by what they use; others are marked where they are written."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """Tiny base / instruct / target folders per architecture, built once per test session."""
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(arch: str, **kwargs):
        key = (arch, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            folder = root / f"{arch}-{len(cache)}"
            cache[key] = make_family(folder, arch, **kwargs)
        return cache[key]

    return get


TOKENS = {
    "hf_alice_write": {"name": "alice", "orgs": ["residuals-lab"]},
    "hf_bob_write": {"name": "bob", "orgs": []},
    "hf_space_secret": {"name": "studio-owner", "orgs": []},  # a hosted Space's own HF_TOKEN
}


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    from hub_server import LocalHub

    with LocalHub(tmp_path_factory.mktemp("hub"), TOKENS, port=HUB_PORT) as hub:
        yield hub


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch):
    """The local Hub with a fresh request log and a per-test download cache."""
    hub_server.log.clear()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return hub_server


@contextlib.contextmanager
def _launched_app(env: dict[str, str], log_path: Path):
    """`python app.py` with `env` (port and everything else), until it answers; yields its URL."""
    port = int(env["GRADIO_SERVER_PORT"])
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"app exited: {log_path.read_text()}") from None
                time.sleep(0.5)
        else:
            proc.kill()
            raise RuntimeError(f"app did not start: {log_path.read_text()}")
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _app_env(**settings: str) -> dict[str, str]:
    return {
        **os.environ,
        "GRADIO_SERVER_PORT": str(_free_port()),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "PYTHONPATH": str(ROOT),
        **settings,
    }


@pytest.fixture(scope="session")
def served_app(hub_server, tmp_path_factory):
    env = _app_env(
        HF_TOKEN="hf_alice_write",
        HF_HUB_CACHE=str(tmp_path_factory.mktemp("app-cache")),
        TMPDIR=str(tmp_path_factory.mktemp("app-tmp")),  # its sessions' folders, swept by it alone
    )
    with _launched_app(env, tmp_path_factory.mktemp("app-log") / "app.log") as url:
        yield url


@pytest.fixture(scope="session")
def space(hub_server, tmp_path_factory):
    """The app served in Space mode; yields (url, its folders, its log file)."""
    root = tmp_path_factory.mktemp("space")
    folders = {"tmp": root / "tmp", "gradio": root / "gradio", "hf": root / "hf"}
    for folder in folders.values():
        folder.mkdir()
    env = _app_env(
        SYSTEM="spaces",
        SPACE_ID="studio-owner/residuals-studio",
        HF_TOKEN="hf_space_secret",
        OAUTH_CLIENT_ID="fake-client-id",
        OAUTH_CLIENT_SECRET="fake-client-secret",
        OAUTH_SCOPES="openid profile read-repos write-repos",
        OPENID_PROVIDER_URL="http://127.0.0.1:9",
        TMPDIR=str(folders["tmp"]),
        GRADIO_TEMP_DIR=str(folders["gradio"]),
        HF_HOME=str(folders["hf"]),
        HF_HUB_CACHE=str(folders["hf"] / "hub"),
        STUDIO_MAX_SMALL_FILE_MB="1",  # the demo family's tokenizer is 0.1 MB; tests try bigger ones
        STUDIO_SESSION_IDLE_MINUTES="1",  # so that the sweep's work can be watched within a test
        STUDIO_SWEEP_SECONDS="1",
    )
    log_path = root / "app.log"
    with _launched_app(env, log_path) as url:
        yield url, folders, log_path


@pytest.fixture(scope="module")
def llama_residuals(families, tmp_path_factory):
    """The llama family and float32 residuals of it (instruct − base), computed once per module."""
    from residuals_core import compute_residuals

    fam = families("llama")
    folder = tmp_path_factory.mktemp("residuals") / "residuals"
    compute_residuals(fam["base"], fam["instruct"], folder)
    return fam, folder
