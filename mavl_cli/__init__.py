"""mavl: multi-label chest X-ray diagnosis with low-rank features and vision-language fusion.

Python API (heavy libraries load on first use, so ``import mavl_cli`` stays light)::

    import mavl_cli as mavl
    m = mavl.load("model.safetensors")
    m.predict(["film.png"])
"""

from __future__ import annotations

from typing import Any

from mavl_cli.core.version import __version__

__all__ = ["load", "__version__"]


def load(path: Any = None, weights: str | None = None, device: str = "cpu") -> Any:
    """Load a model file as a :class:`mavl_cli.api.Model` (see :mod:`mavl_cli.api`)."""
    from mavl_cli.api import load as _load

    return _load(path, weights=weights, device=device)
