"""residuals_core: streaming instruction residuals (task vectors) with the `residuals` package's API."""

__version__ = "0.1.0"

from .config import ResidualsConfig
from .errors import ResidualsError
from .operations import apply_residuals, compute_residuals, export_lora, merge_models
from .residuals import Residuals

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
