"""Image backbones: any timm model, weights from the hub or from local files.

One factory, :func:`create_backbone`, serves the hub default, a local weights
file (``.safetensors``, or ``.pth``/``.bin`` read with ``weights_only=True``)
and a local model folder in the hub's layout (``config.json`` naming the
architecture, plus ``model.safetensors``). Tests build tiny models and load
them through this same path.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mavl_cli.errors import MavlError

DEFAULT_BACKBONE = "vit_base_patch16_224"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")


@dataclass
class BackboneInfo:
    """What downstream stages need to reproduce the image preprocessing."""

    name: str
    weights: str  # "hub" or the local path as given
    dim: int
    data_config: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        return {
            "backbone": self.name,
            "backbone_weights": self.weights,
            "backbone_args": self.model_args,
            "preprocessing": self.data_config,
            "feature_dim": self.dim,
        }


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a weights file without unpickling arbitrary objects."""
    import torch

    from mavl_cli.contract import check_input_file

    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise MavlError(f"{p}: weights file not found", path=p)
    check_input_file(p, "a weights file (.safetensors, .pth, .bin)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except MavlError:
        raise
    except pickle.UnpicklingError:  # weights_only refused a Python object: never unpickle it
        raise MavlError(
            f"{p}: refusing to load: the file holds pickled Python objects, not just tensors "
            "(convert it to .safetensors, or save only the state dict)", path=p) from None
    except Exception as exc:
        raise MavlError(f"{p}: cannot read weights ({_plain(str(exc))})", path=p) from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd:
        raise MavlError(f"{p}: holds no tensors (not a state dict)", path=p)
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def _plain(text: str) -> str:
    """First line of an exception message without terminal escape codes."""
    import re

    lines = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()
    return lines[0][:160] if lines else "unknown reason"


def _read_folder(folder: Path) -> tuple[str | None, dict[str, Any], Path]:
    """A hub-layout folder: (architecture from config.json, model args, weights file)."""
    arch, args = None, {}
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        from mavl_cli.contract import loads_json

        try:
            text = cfg_path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise MavlError(f"{cfg_path}: cannot read ({getattr(exc, 'strerror', None) or exc})", path=cfg_path) from None
        cfg = loads_json(text, str(cfg_path), "config.json")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_args") or {}, dict) \
                or not isinstance(cfg.get("architecture") or "", str):
            raise MavlError(f"{cfg_path}: not a model config (expected a JSON object with 'architecture')", path=cfg_path)
        arch = cfg.get("architecture")
        args = dict(cfg.get("model_args") or {})
    for name in WEIGHT_FILES:
        if (folder / name).exists():
            return arch, args, folder / name
    raise MavlError(f"{folder}: no weights file in this folder (looked for {', '.join(WEIGHT_FILES)})", path=folder)


#: timm.create_model arguments that load files themselves (with pickle): never accepted from users
_FILE_ARGS = {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict"}


def _check_name(name: str) -> None:
    import timm

    if name.startswith("hf-hub:"):
        return
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else " (`timm.list_models()` lists them)"
        raise MavlError(f"unknown timm model {name!r}{hint}")


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    pretrained: bool = True,
    model_args: dict[str, Any] | None = None,
) -> tuple[Any, BackboneInfo]:
    """Build a timm model with its classifier removed (pooled features out).

    ``weights``: None = the hub's pretrained weights for ``name``; a file or
    a hub-layout folder = local weights. ``pretrained=False`` gives random
    weights (for tests and ablations only).
    """
    import timm

    args = dict(model_args or {})
    reading = sorted(k for k in args if k in _FILE_ARGS)
    if reading:
        raise MavlError(f"--model-args: {', '.join(reading)} would make timm read files on its own (unpickling them); "
                        "give local weights with --weights instead")
    weights_src = "hub" if (weights is None and pretrained) else ("random" if weights is None else str(weights))
    state = None
    if weights is not None:
        wp = Path(weights)
        if wp.is_dir():
            arch, folder_args, wfile = _read_folder(wp)
            if arch and name == DEFAULT_BACKBONE and arch != name:
                name = arch
            elif arch and arch.split(".")[0] != name.split(".")[0]:
                raise MavlError(f"{wp}: folder holds a {arch!r} model, but --backbone is {name!r}", path=wp)
            args = {**folder_args, **args}
            state = load_state_dict(wfile)
        else:
            state = load_state_dict(wp)
    _check_name(name)
    try:
        if state is None and pretrained:
            model = _create_pretrained(name, args)
        else:
            model = timm.create_model(name, pretrained=False, num_classes=0, **args)
    except MavlError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad --model-args (img_size 0, wrong types) fail inside timm
        raise MavlError(f"cannot build {name!r} with arguments {args}: {type(exc).__name__}: {_plain(str(exc))}") from None
    if state is not None:
        _load_into(model, state, str(weights), name)
    model.eval()
    from timm.data import resolve_model_data_config

    cfg = dict(resolve_model_data_config(model))
    if args.get("img_size"):  # the pretrained cfg still names the architecture's default size
        size = args["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        cfg["input_size"] = (3, int(h), int(w))
    data_config = {
        "input_size": list(cfg["input_size"]),
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
    }
    info = BackboneInfo(name=name, weights=weights_src, dim=int(model.num_features), data_config=data_config, model_args=args)
    return model, info


def _create_pretrained(name: str, args: dict[str, Any]) -> Any:
    import timm

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **args)
    except Exception as exc:
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        raise MavlError(
            f"cannot get pretrained weights for {name!r} from the model hub ({why}); "
            "pass --weights FILE_OR_FOLDER with local weights, or --random-init for an untrained backbone"
        ) from None


def _load_into(model: Any, state: dict[str, Any], source: str, name: str) -> None:
    """Load a state dict, ignoring only the classifier head, and explain any mismatch."""
    own = model.state_dict()
    head_prefixes = ("head.", "fc.", "classifier.", "head.fc.", "last_linear.")
    state = {k: v for k, v in state.items() if not (k.startswith(head_prefixes) and k not in own)}
    missing = [k for k in own if k not in state]
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
        raise MavlError(f"{source}: weights do not fit timm model {name!r}: " + ", ".join(parts) + " tensors", path=source)
    model.load_state_dict(state, strict=True)


def save_local_backbone(model: Any, name: str, folder: Path, model_args: dict[str, Any] | None = None) -> Path:
    """Save a timm model in the hub's folder layout (config.json + model.safetensors)."""
    from safetensors.torch import save

    from mavl_cli.contract import atomic_write_bytes

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MavlError(f"{folder}: cannot create folder ({exc.strerror or exc})", path=folder) from None
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # weights first, config last: a folder with a config.json is complete (each file is written atomically)
    atomic_write_bytes(folder / "model.safetensors", save(sd))
    atomic_write_bytes(folder / "config.json", json.dumps({"architecture": name, "model_args": model_args or {}}, indent=2).encode())
    return folder


def quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantisation of Linear layers (CPU): ~1.5x faster ViTs, cosine ~0.997 to fp32."""
    import warnings

    import torch

    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise MavlError("--precision int8 needs torch.ao.quantization, which this PyTorch build lacks; use fp32") from None
    with warnings.catch_warnings():  # its deprecation notices are for torch developers, not mavl users
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
