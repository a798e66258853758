import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch
from tiny_models import make_family

torch.set_num_threads(1)


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
