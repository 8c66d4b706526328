"""timm family: any timm model, weights from the hub or local files.

Spec: ``timm:NAME`` or a bare ``NAME`` (``vit_base_patch16_224``,
``hf-hub:timm/...``); ``--weights`` a ``.safetensors``/``.pth``/``.bin`` file
(read with ``weights_only=True``) or a hub-layout folder (``config.json``
naming the architecture + ``model.safetensors``); ``timm:/path/folder`` is the
same as ``--weights /path/folder``.

Preprocessing: ``timm.data.resolve_model_data_config(model)`` (input size,
mean, std, interpolation, crop_pct, crop_mode), applied by mavl's uint8 path
(:mod:`mavl_cli.encoders.preprocess`) with torchvision's geometry (short side to
``floor(size / crop_pct)`` with the long side truncated, centre crop offsets
rounded), so features equal those of ``timm.data.create_transform(**cfg)``.

Pooling: ``default`` (the model's own head pooling: timm's CLS token (ViTs)
or global average (CNNs)), ``cls`` (ViTs: the class token after the final
norm), ``mean`` (mean of the spatial map: ViT patch tokens after the final
norm, prefix tokens excluded; CNN feature map), ``max`` (max over the map). Spatial map: ``forward_features`` (CNN stage output, or ViT patch
tokens after the final norm reshaped to the patch grid) -> ``[B, C, h, w]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save
from timm.data import resolve_model_data_config

from mavl_cli.core.defaults import DEFAULT_IMAGE_ENCODER
from mavl_cli.core.errors import MavlError
from mavl_cli.core.limits import MAX_INPUT_SIDE, MAX_PARAMETERS
from mavl_cli.encoders.base import (
    BackboneInfo,
    ImageEncoder,
    grid_from_tokens,
    tokens_to_map,
)
from mavl_cli.encoders.common import load_exact, load_state_dict, offline, plain
from mavl_cli.encoders.spec import EncoderSpec
from mavl_cli.io.files import atomic_write_bytes, loads_json

FAMILY = "timm"
HAS_TEXT = False
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")


class TimmEncoder(ImageEncoder):
    family = FAMILY
    poolings = ("default", "cls", "mean", "max")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "default":
            return self.net(x)
        out = self.net.forward_features(x)
        if out.ndim == 3:  # tokens after the final norm
            if self.pooling == "cls":
                return out[:, 0]
            fmap = self._tokens_map(out, x)
        else:
            if self.pooling == "cls":
                raise MavlError(f"{self.name}: --pooling cls needs a ViT-style model with a class token")
            fmap = self._nchw(out)
        return fmap.amax(dim=(2, 3)) if self.pooling == "max" else fmap.mean(dim=(2, 3))

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net.forward_features(x)
        return self._tokens_map(out, x) if out.ndim == 3 else self._nchw(out)

    def _tokens_map(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        patch = getattr(getattr(self.net, "patch_embed", None), "patch_size", None)
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        prefix = getattr(self.net, "num_prefix_tokens", None)
        if patch and prefix is not None:
            gh, gw = x.shape[2] // patch, x.shape[3] // patch
            if tokens.shape[1] == prefix + gh * gw:
                return tokens_to_map(tokens, prefix, gh, gw)
        return tokens_to_map(tokens, *grid_from_tokens(tokens, x.shape[2], x.shape[3], patch))

    def _nchw(self, out: torch.Tensor) -> torch.Tensor:
        if str(getattr(self.net, "output_fmt", "NCHW")).upper().endswith("NHWC"):
            return out.permute(0, 3, 1, 2)
        return out

    @property
    def spatial_pools(self) -> bool:  # type: ignore[override]
        if self.pooling in ("mean", "max"):
            return True
        return self.pooling == "default" and getattr(self.net, "global_pool", None) is not None and \
            str(getattr(getattr(self.net, "global_pool", None), "pool_type", "")) == "avg"

    @property
    def patch(self) -> int | None:
        size = getattr(getattr(self.net, "patch_embed", None), "patch_size", None)
        return int(size[0] if isinstance(size, (tuple, list)) else size) if size else None

    def pool_spatial(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.amax(dim=(2, 3)) if self.pooling == "max" else fmap.mean(dim=(2, 3))

    def cam_block(self) -> torch.nn.Module | None:
        """``--pooling cls`` ViTs: Grad-CAM on the tokens entering the last block (the class token after the
        final norm does not read the last block's patch outputs)."""
        blocks = getattr(self.net, "blocks", None)
        if self.pooling != "cls" or not isinstance(blocks, torch.nn.Sequential | torch.nn.ModuleList) or not len(blocks):
            return None
        return blocks[-1]


def _read_folder(folder: Path) -> tuple[str | None, dict[str, Any], Path]:
    """A hub-layout folder: (architecture from config.json, model args, weights file)."""
    arch, args = None, {}
    cfg_path = folder / "config.json"
    if cfg_path.exists():
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

    if name.startswith("hf-hub:"):
        return
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else " (`timm.list_models()` lists them)"
        raise MavlError(f"unknown timm model {name!r}{hint}")


def _check_size(name: str, args: dict[str, Any]) -> None:
    """--model-args must not make timm allocate gigabytes: a bounded input side, and a parameter count
    measured on the meta device (no memory) before the real build."""

    size = args.get("img_size")
    if size is not None:
        sides = list(size) if isinstance(size, (list, tuple)) else [size]
        if not sides or any(not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_INPUT_SIDE for v in sides):
            raise MavlError(f"cannot build {name!r}: --model-args img_size must be a whole number (or two) in "
                            f"1..{MAX_INPUT_SIDE}, got {size!r}")

    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, num_classes=0, **args)
    except Exception:  # noqa: BLE001 - the real build below reports bad arguments
        return
    n = sum(p.numel() for p in probe.parameters())
    if n > MAX_PARAMETERS:
        raise MavlError(f"cannot build {name!r}: --model-args {args} would give it {n:,} parameters (more than "
                        f"{MAX_PARAMETERS:,}); check the sizes")


def load_image(spec: EncoderSpec) -> TimmEncoder:
    """Build the encoder a ``timm`` spec names (classifier removed: pooled features out)."""

    name, weights, args = spec.id, spec.weights, dict(spec.options)
    reading = sorted(k for k in args if k in _FILE_ARGS)
    if reading:
        raise MavlError(f"--model-args: {', '.join(reading)} would make timm read files on its own (unpickling them); "
                        "give local weights with --weights instead")
    if weights is None and Path(name).expanduser().is_dir():  # timm:/path/folder
        weights, name = str(Path(name).expanduser()), DEFAULT_IMAGE_ENCODER
    pooling = spec.pooling or "default"
    if pooling not in TimmEncoder.poolings:
        raise MavlError(f"unknown --pooling {pooling!r} for timm; use one of {', '.join(TimmEncoder.poolings)}")
    state = None
    if weights is not None:
        wp = Path(weights)
        if wp.is_dir():
            arch, folder_args, wfile = _read_folder(wp)
            if arch and name == DEFAULT_IMAGE_ENCODER and arch != name:
                name = arch
            elif arch and arch.split(".")[0] != name.split(".")[0]:
                raise MavlError(f"{wp}: folder holds a {arch!r} model, but --backbone is {name!r}", path=wp)
            args = {**folder_args, **args}
            state = load_state_dict(wfile)
        else:
            state = load_state_dict(wp)
    _check_name(name)
    build_args = dict(args)
    if build_args:
        _check_size(name, build_args)
    try:
        if state is None and spec.pretrained:
            model = _create_pretrained(name, build_args)
        else:
            model = timm.create_model(name, pretrained=False, num_classes=0, **build_args)
    except MavlError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad --model-args (img_size 0, wrong types) fail inside timm
        raise MavlError(f"cannot build {name!r} with arguments {build_args}: {type(exc).__name__}: {plain(str(exc))}") from None
    if state is not None:
        head = ("head.", "fc.", "classifier.", "head.fc.", "last_linear.")
        load_exact(model, state, str(weights), f"timm model {name!r}", drop_prefixes=head)
    model.eval()
    source = "hub" if (weights is None and spec.pretrained) else ("random" if weights is None else str(weights))
    final = EncoderSpec("timm", name, str(weights) if weights is not None else None, spec.pretrained,
                        None if pooling == "default" else pooling, args, spec.trust_remote_code)
    return TimmEncoder(final, model, int(model.num_features), data_config(model, args), pooling, name=name,
                       weights_source=source)


def data_config(model: Any, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's own eval data config for ``model``, as mavl's preprocessing record."""

    cfg = dict(resolve_model_data_config(model))
    args = args or {}
    if args.get("img_size"):  # the pretrained cfg still names the architecture's default size
        size = args["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        cfg["input_size"] = (3, int(h), int(w))
    return {
        "kind": "timm",
        "input_size": [int(v) for v in cfg["input_size"]],
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "crop_pct": float(cfg.get("crop_pct", 1.0) or 1.0),
        "crop_mode": str(cfg.get("crop_mode") or "center"),
    }


def create_backbone(
    name: str = DEFAULT_IMAGE_ENCODER,
    weights: str | Path | None = None,
    pretrained: bool = True,
    model_args: dict[str, Any] | None = None,
) -> tuple[Any, BackboneInfo]:
    """The timm model (pooled features out) and its info; kept for callers predating the registry."""
    enc = load_image(EncoderSpec("timm", name, str(weights) if weights is not None else None, pretrained, None,
                                 dict(model_args or {})))
    return enc.net, enc.info


def _create_pretrained(name: str, args: dict[str, Any]) -> Any:

    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **args)
    except Exception as exc:
        why = "HF_HUB_OFFLINE is set" if offline() else f"{type(exc).__name__}: {plain(str(exc))[:120]}"
        raise MavlError(
            f"cannot get pretrained weights for {name!r} from the model hub ({why}); "
            "pass --weights FILE_OR_FOLDER with local weights, or --random-init for an untrained backbone"
        ) from None


def save_local_backbone(model: Any, name: str, folder: Path, model_args: dict[str, Any] | None = None) -> Path:
    """Save a timm model in the hub's folder layout (config.json + model.safetensors)."""

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MavlError(f"{folder}: cannot create folder ({exc.strerror or exc})", path=folder) from None
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # weights first, config last: a folder with a config.json is complete (each file is written atomically)
    atomic_write_bytes(folder / "model.safetensors", save(sd))
    atomic_write_bytes(folder / "config.json", json.dumps({"architecture": name, "model_args": model_args or {}}, indent=2).encode())
    return folder
