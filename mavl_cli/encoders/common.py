"""Helpers every family shares: safe weight files, offline mode, short error text."""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mavl_cli.core.errors import MavlError
from mavl_cli.io.files import check_input_file


def offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network access."""
    return any(os.environ.get(k, "0") not in ("0", "", "false", "False") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def plain(text: str) -> str:
    """First line of an exception message without terminal escape codes."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(text)).strip().splitlines()
    return lines[0][:160] if lines else "unknown reason"


def looks_local(ident: str) -> bool:
    """An ID meant as a path (exists, or starts like one) rather than a hub id."""
    return Path(ident).expanduser().exists() or ident.startswith((".", "/", "~")) or ident.count("/") > 1 or ident.endswith(
        (".pt", ".pth", ".bin", ".safetensors"))


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a weights file without unpickling arbitrary objects."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise MavlError(f"{p}: weights file not found", path=p)
    check_input_file(p, "a weights file (.safetensors, .pth, .bin)")
    with open(p, "rb") as fh:
        head = fh.read(8)
    torch_file = head.startswith((b"PK\x03\x04", b"\x80"))  # torch's zip checkpoint, or a pickle (protocol >= 2)
    try:
        if p.suffix == ".safetensors" or not torch_file:  # a safetensors file under another name loads too
            try:
                sd = load_file(str(p))
            except Exception:  # noqa: BLE001 - neither format: say so, not "pickled objects"
                if p.suffix == ".safetensors":
                    raise
                raise MavlError(f"{p}: not a weights file (neither a torch checkpoint nor safetensors)", path=p) from None
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except MavlError:
        raise
    except pickle.UnpicklingError:  # weights_only refused a Python object: never unpickle it
        raise MavlError(
            f"{p}: refusing to load: the file holds pickled Python objects, not just tensors "
            "(convert it to .safetensors, or save only the state dict)", path=p) from None
    except Exception as exc:
        raise MavlError(f"{p}: cannot read weights ({plain(str(exc))})", path=p) from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd:
        raise MavlError(f"{p}: holds no tensors (not a state dict)", path=p)
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_exact(model: Any, state: dict[str, Any], source: str, what: str, ignore_missing: tuple[str, ...] = (),
               drop_prefixes: tuple[str, ...] = ()) -> None:
    """``load_state_dict(strict=True)`` that explains a mismatch in one line.

    ``drop_prefixes``: keys in the file that the model may lack (a classifier
    head); ``ignore_missing``: model keys the file may lack (buffers).
    """
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(drop_prefixes) and k not in own)} if drop_prefixes else dict(state)
    missing = [k for k in own if k not in state and not k.startswith(ignore_missing)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise MavlError(f"{source}: weights do not fit {what}: " + ", ".join(parts) + " tensors", path=source)
    model.load_state_dict(state, strict=not ignore_missing)


def quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantisation of Linear layers (CPU): ~1.5x faster ViTs, cosine ~0.997 to fp32."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise MavlError("--precision int8 needs torch.ao.quantization, which this PyTorch build lacks; use fp32") from None
    with warnings.catch_warnings():  # its deprecation notices are for torch developers, not mavl users
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
