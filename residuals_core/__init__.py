"""residuals_core: streaming instruction residuals (task vectors) with the `residuals` package's API.

The public names load on first use (PEP 562), so `python -m residuals_core` can parse its command
line and start checking inputs before the engine loads; the engine computes on numpy and
imports torch only for model instances, GPUs and the commands that run a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ResidualsError

__version__ = "0.1.0"

_LAZY = {
    "Residuals": ".residuals",
    "ResidualsConfig": ".config",
    "apply_residuals": ".operations",
    "compute_residuals": ".operations",
    "export_lora": ".operations",
    "merge_models": ".operations",
}

if TYPE_CHECKING:
    from .config import ResidualsConfig
    from .operations import apply_residuals, compute_residuals, export_lora, merge_models
    from .residuals import Residuals


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Residuals",
    "ResidualsConfig",
    "ResidualsError",
    "__version__",
    "apply_residuals",
    "compute_residuals",
    "export_lora",
    "merge_models",
]
