"""Encoder weights a model file carries: fine-tuned encoders stored inside the file (``encoder.*``),
embedded weight files, and the content fingerprint that identifies them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from mavl_cli.core.errors import MavlError
from mavl_cli.core.home import mavl_home
from mavl_cli.io.mavlfile import MavlFile


def tensor_fingerprint(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(np.ascontiguousarray(tensors[k]).tobytes())
    return h.hexdigest()[:16]


ENCODER_PREFIX = "encoder."  # a fine-tuned encoder's weights, carried inside the model file


def finetuned_weights_file(head_meta: dict[str, Any]) -> Path | None:
    """The weights file `mavl finetune-lrf` wrote for a fine-tuned head (timm: the folder's model.safetensors)."""
    if not head_meta.get("finetuned") or not head_meta.get("backbone_weights"):
        return None
    w = Path(str(head_meta["backbone_weights"]))
    return w / "model.safetensors" if w.is_dir() else w


def read_finetuned_weights(head: MavlFile) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """A fine-tuned head's encoder weights, to carry in the model file (``encoder.*`` tensors), and their record.

    The file must still hold what fine-tuning wrote (``weights_fingerprint``), or the model would silently pair
    the head with other weights; heads from before that record are taken as they are."""
    f = finetuned_weights_file(head.meta)
    if f is None:
        return None
    if not f.is_file():
        raise MavlError(f"{head.path}: was fine-tuned with the encoder weights {f}, which are not on this machine; "
                        "fuse needs them (they go into the model file)", path=f)

    try:
        state = load_file(str(f))
    except Exception as exc:
        raise MavlError(f"{f}: cannot read the fine-tuned encoder weights ({exc})", path=f) from None
    fp = tensor_fingerprint(state)
    want = head.meta.get("weights_fingerprint")
    if want and want != fp:
        raise MavlError(f"{f}: these encoder weights are not the ones {head.path} was fine-tuned with (changed since); "
                        "fine-tune again, or use the matching weights", path=f)
    scalars = sorted(k for k, v in state.items() if v.ndim == 0)  # the file format stores them as [1]
    return state, {"embedded": True, "fingerprint": fp, "tensors": len(state), "source": str(f), "scalars": scalars}


def embedded_weights_file(tensors: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """The model file's own encoder weights as a file the encoder family loads (cached by fingerprint), or None."""
    rec = meta.get("encoder_weights") or {}
    state = {k[len(ENCODER_PREFIX):]: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)}
    if not rec.get("embedded") or not state:
        return None
    for k in rec.get("scalars") or []:
        if k in state and state[k].size == 1:
            state[k] = state[k].reshape(())
    fp = tensor_fingerprint(state)
    if fp != rec.get("fingerprint"):
        raise MavlError(f"the model file's encoder weights do not match their recorded fingerprint ({fp} != {rec.get('fingerprint')})")

    for folder in (mavl_home() / "cache" / "encoders", Path(tempfile.gettempdir()) / "mavl-encoders"):
        dest = folder / f"{fp}.safetensors"
        try:
            if not dest.is_file() or tensor_fingerprint(_load_numpy(dest)) != fp:
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{fp}.", dir=folder)
                os.close(fd)
                try:
                    save_file({k: np.array(v, order="C") for k, v in state.items()}, tmp)  # (ascontiguousarray makes 0-d 1-d)
                    os.replace(tmp, dest)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            return str(dest)
        except OSError:
            continue
    raise MavlError("cannot write the model file's encoder weights to a cache folder ($MAVL_HOME/cache or the temp folder)")


def _load_numpy(path: Path) -> dict[str, np.ndarray]:

    try:
        return load_file(str(path))
    except Exception:
        return {}
