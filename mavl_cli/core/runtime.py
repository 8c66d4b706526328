"""Devices, seeds and thread settings: the small things every stage needs the same way."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from mavl_cli.core.errors import MavlError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> Any:
    """Map ``auto|cpu|cuda|mps`` to a torch.device, failing clearly when absent."""

    name = (name or "auto").lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise MavlError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MavlError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MavlError("--device mps was asked for, but MPS is not available")
    return torch.device(name)


def set_seed(seed: int) -> Any:
    """Seed python, numpy and torch; returns a torch.Generator for data order.

    On CPU the same seed gives byte-identical outputs (tested); on GPU,
    cuBLAS may still differ in the last bits.
    """

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 16))
