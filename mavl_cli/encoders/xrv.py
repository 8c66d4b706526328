"""xrv family: torchxrayvision's chest-X-ray CNNs (``pip install "mavl[xrv]"``).

Spec: ``xrv:NAME`` with NAME one of torchxrayvision's weights names
(``densenet121-res224-all``, ``-nih``, ``-chex``, ... , ``resnet50-res512-all``).
Weights: ``--weights FILE`` (a state dict of the xrv model or of its inner
torchvision ResNet, read with ``weights_only``), or none: torchxrayvision's own
cache (``~/.torchxrayvision/models_data``; nothing is downloaded when
``HF_HUB_OFFLINE`` is set, and a missing file is one clear line). ``--model-args``
passes DenseNet constructor arguments (``growth_rate``, ``block_config``,
``num_init_features``) for non-standard sizes.

Preprocessing, as torchxrayvision's own pipeline (README / datasets): one
channel (colour images averaged over channels), ``xrv.datasets.normalize(img,
255)`` to [-1024, 1024], ``XRayCenterCrop`` (the central square) and
``XRayResizer(resolution)`` (skimage), recorded as ``{"kind": "xrv",
"resolution", "maxval", "engine", "input_size": [1, R, R]}``.

Pooling: ``mean`` (DenseNet: ``features2``, ReLU then global average of the
last dense block; ResNet: ``features``, global average of layer4). Spatial
map: the same map before pooling, ``[B, 1024, 7, 7]`` (DenseNet-121 at 224)
or ``[B, 2048, 16, 16]`` (ResNet-50 at 512).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mavl_cli.core.errors import MavlError
from mavl_cli.encoders.base import ImageEncoder
from mavl_cli.encoders.common import load_exact, load_state_dict, offline, plain
from mavl_cli.encoders.geometry import CropGeometry
from mavl_cli.encoders.spec import EncoderSpec

FAMILY = "xrv"
HAS_TEXT = False
DECODE_FACTOR = 4


class XRVEncoder(ImageEncoder):
    family = FAMILY
    poolings = ("mean",)
    spatial_pools = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(x).mean(dim=(2, 3))

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        if hasattr(net, "model"):  # xrv.models.ResNet wraps a torchvision resnet
            m = net.model
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            return m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return torch.nn.functional.relu(net.features(x))


def _resolution(name: str) -> int:
    for part in name.split("-"):
        if part.startswith("res") and part[3:].isdigit():
            return int(part[3:])
    return 224


def _cached(name: str) -> Path | None:
    import torchxrayvision as xrv

    url = xrv.models.model_urls[name]["weights_url"]
    path = Path("~/.torchxrayvision/models_data").expanduser() / Path(url).name
    return path if path.exists() else None


def _bare(name: str, options: dict[str, Any], n_classes: int | None) -> Any:
    """The xrv architecture for ``name`` without touching any weights file."""
    import torchvision
    import torchxrayvision as xrv

    labels = xrv.models.model_urls.get(name, {}).get("labels") or xrv.datasets.default_pathologies
    n = n_classes or len(labels)
    if name.startswith("resnet"):
        net = xrv.models.ResNet.__new__(xrv.models.ResNet)
        torch.nn.Module.__init__(net)
        net.weights, net.apply_sigmoid = name, False
        net.model = getattr(torchvision.models, name.split("-")[0])(num_classes=n, weights=None)
        net.model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return net
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return xrv.models.DenseNet(num_classes=n, **kw)


def load_image(spec: EncoderSpec) -> XRVEncoder:
    import torchxrayvision as xrv

    name = spec.id
    known = [k for k in xrv.models.model_urls if "-" in k]
    if name not in xrv.models.model_urls or "-" not in name:
        raise MavlError(f"unknown torchxrayvision model {name!r}; use one of {', '.join(known)}")
    if spec.weights:
        state = load_state_dict(spec.weights)
        state = {k: v for k, v in state.items() if k != "op_threshs"}
        if name.startswith("resnet") and not any(k.startswith("model.") for k in state):
            state = {f"model.{k}": v for k, v in state.items()}
        cls_key = "model.fc.weight" if name.startswith("resnet") else "classifier.weight"
        n = int(state[cls_key].shape[0]) if cls_key in state else None
        try:
            net = _bare(name, spec.options, n)
        except TypeError as exc:
            raise MavlError(f"cannot build xrv:{name} with arguments {spec.options}: {plain(str(exc))}") from None
        load_exact(net, state, spec.weights, f"torchxrayvision model {name!r}", ignore_missing=("op_threshs",))
    elif not spec.pretrained:
        net = _bare(name, spec.options, None)
    else:
        if _cached(name) is None:
            why = "HF_HUB_OFFLINE is set" if offline() else "not in torchxrayvision's cache"
            if offline():
                raise MavlError(f"xrv:{name}: weights not downloaded ({why}); pass --weights FILE (a state dict), "
                                "or download them once with torchxrayvision on a connected machine")
        try:
            cls = xrv.models.ResNet if name.startswith("resnet") else xrv.models.DenseNet
            net = cls(weights=name)
        except Exception as exc:
            raise MavlError(f"xrv:{name}: cannot get its weights ({plain(str(exc))}); pass --weights FILE") from None
    net.eval()
    res = _resolution(name)
    pre = {"kind": "xrv", "resolution": res, "maxval": 255, "engine": "skimage", "input_size": [1, res, res]}
    enc = XRVEncoder(spec, net, 0, pre, pooling=spec.pooling)
    with torch.inference_mode():
        enc.dim = int(enc(torch.zeros(1, 1, 64, 64)).shape[1])
    return enc


def geometry(cfg: dict[str, Any], iw: int, ih: int) -> Any:
    """Where an ``iw x ih`` image lands in the model input, as :func:`prepare` runs it:
    ``XRayCenterCrop`` (the central ``min(w, h)`` square, offsets ``w // 2 - side // 2``), then
    ``XRayResizer(resolution)`` of that square (pixel centres scaled, as skimage resizes)."""

    side, res = min(iw, ih), int(cfg["resolution"])
    startx, starty = iw // 2 - side // 2, ih // 2 - side // 2
    k = res / side
    return CropGeometry(iw, ih, iw * k, ih * k, startx * k, starty * k, res, res,
                        f"xrv centre square {side}x{side} at ({startx}, {starty}), resize to {res}x{res}")


def decode_size(cfg: dict[str, Any]) -> int:
    return DECODE_FACTOR * int(cfg["resolution"])


def prepare(img: Any, cfg: dict[str, Any]) -> np.ndarray:
    """One decoded PIL image -> float32 ``[1, R, R]`` in [-1024, 1024], through torchxrayvision's transforms."""
    import torchxrayvision as xrv

    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 3:  # colour: averaged over channels, as torchxrayvision's examples do
        arr = arr.mean(axis=2)
    arr = xrv.datasets.normalize(arr, float(cfg.get("maxval", 255)))[None, ...]
    arr = xrv.datasets.XRayCenterCrop()(arr)
    arr = xrv.datasets.XRayResizer(int(cfg["resolution"]), engine=str(cfg.get("engine", "skimage")))(arr)
    return np.ascontiguousarray(arr, dtype=np.float32)
