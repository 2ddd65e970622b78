"""opendino: an open, tested and fast implementation of DINOv2 (Oquab et al. 2023, arXiv 2304.07193).

The small public API; everything else lives in the subpackages (`models`, `data`, `eval`, ...). Imports are lazy so
that `import opendino` and the CLI start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["build_backbone", "extract_features", "load_backbone", "save_backbone"]

if TYPE_CHECKING:
    from opendino.eval.features import extract_features
    from opendino.models.hub import build_backbone, load_backbone, save_backbone

_LAZY = {
    "build_backbone": "opendino.models.hub",
    "load_backbone": "opendino.models.hub",
    "save_backbone": "opendino.models.hub",
    "extract_features": "opendino.eval.features",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'opendino' has no attribute {name!r}")
