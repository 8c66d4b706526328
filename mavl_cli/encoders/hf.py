"""hf family: Hugging Face transformers vision encoders (DINOv2 / RAD-DINO, ViT, Swin, ConvNeXt...).

Spec: ``hf:HUB_ID`` (``hf:microsoft/rad-dino``; needs the hub cache when
``HF_HUB_OFFLINE`` is set) or ``hf:/path/folder`` (a ``save_pretrained``
folder: ``config.json``, weights, and ``preprocessor_config.json`` from the
image processor's own ``save_pretrained``). ``--weights`` may name another
such folder, or a ``.safetensors``/``.bin`` state dict for the same config.
Models whose config needs remote code (``auto_map``) are refused unless
``--trust-remote-code``.

Preprocessing: the model's own ``AutoImageProcessor`` (the class and backend
``from_pretrained`` picks, with its saved settings), recorded as
``{"kind": "hf", "processor_class", "processor", "input_size"}`` and rebuilt
from that record; mavl runs it on each decoded image in its decoder threads,
so features equal ``model(**processor(images=img, return_tensors="pt"))``.
The decoder only pre-shrinks images whose short side exceeds 4x the model's
input (box reduction, see :mod:`mavl_cli.io.imageio`).

Pooling: models with prefix tokens (ViT, DINOv2, with or without registers):
``cls`` (default; ``last_hidden_state[:, 0]`` after the final layer norm,
which for DINOv2 is its ``pooler_output``) or ``mean`` (mean of the patch
tokens, prefix tokens excluded). Models with a spatial output (ConvNeXt,
ResNet) or without a class token (Swin): ``default`` (the model's own
``pooler_output``) or ``mean`` (mean of the map). Spatial map:
``last_hidden_state`` patch tokens reshaped to ``[B, hidden, h, w]``, or the
4-D ``last_hidden_state`` itself. How the pooled feature follows from that
map (a mean; ConvNeXt: a mean then its final layer norm, applied per location
for heatmaps) is probed at load; class-token pooling gives heatmaps' Grad-CAM
the tokens entering the last encoder layer (``cam_block``).

Geometry (:func:`geometry`): read off the same image processor (its resize
rule: ``shortest_edge``, ``height``/``width`` squash, ``shortest_edge`` +
``longest_edge``, ``max_height``/``max_width``; ConvNeXt's ``crop_pct`` rule;
its centre crop), so heatmaps map back exactly as the image was prepared.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.image_utils import get_image_size_for_max_height_width
from transformers.utils import logging as hf_logging

from mavl_cli.core.errors import MavlError
from mavl_cli.encoders.base import ImageEncoder, grid_from_tokens, tokens_to_map
from mavl_cli.encoders.common import (
    load_exact,
    load_state_dict,
    looks_local,
    offline,
    plain,
)
from mavl_cli.encoders.geometry import CropGeometry, centre_offset
from mavl_cli.encoders.spec import EncoderSpec

FAMILY = "hf"
HAS_TEXT = False  # its text encoders are the BERT-style path (mavl_cli.encoders.text)
DECODE_FACTOR = 4
_PROCESSORS: dict[str, Any] = {}
_LOCK = threading.Lock()


class HFEncoder(ImageEncoder):
    family = FAMILY

    def __init__(self, spec: EncoderSpec, net: torch.nn.Module, preprocessing: dict[str, Any], prefix: int | None,
                 patch: int | None, **kw: Any) -> None:
        self.poolings = ("cls", "mean") if prefix else ("default", "mean")
        super().__init__(spec, net, 0, preprocessing, **kw)
        self.prefix = prefix
        self.patch = patch
        # what the pooler applies after the mean (ConvNeXt: its layernorm); a plain attribute, not a submodule
        object.__setattr__(self, "post", None)
        self._pools: bool | None = True if self.pooling == "mean" else None  # None: probed on first use

    def _hidden(self, x: torch.Tensor) -> Any:
        return self.net(pixel_values=x)

    def _map(self, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if hidden.ndim == 4:
            return hidden
        prefix, gh, gw = grid_from_tokens(hidden, x.shape[2], x.shape[3], self.patch)
        return tokens_to_map(hidden, prefix, gh, gw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._hidden(x)
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "default":
            pooled = getattr(out, "pooler_output", None)
            if pooled is not None:
                return pooled.flatten(1)
        return self._map(hidden, x).mean(dim=(2, 3))

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(self._hidden(x).last_hidden_state, x)

    @property
    def spatial_pools(self) -> bool:  # type: ignore[override]
        if self._pools is None:
            self.probe_pooling()
        return bool(self._pools)

    def local_features(self, fmap: torch.Tensor) -> torch.Tensor:
        if self._pools is None:
            self.probe_pooling()
        if self.post is None:
            return fmap
        return self.post(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def pool_spatial(self, fmap: torch.Tensor) -> torch.Tensor:
        if self._pools is None:
            self.probe_pooling()
        pooled = fmap.mean(dim=(2, 3))
        return pooled if self.post is None else self.post(pooled)

    def cam_block(self) -> torch.nn.Module | None:
        if self.pooling != "cls":
            return None
        enc = getattr(self.net, "encoder", None)
        for layers in (getattr(enc, "layer", None), getattr(enc, "layers", None), getattr(self.net, "layers", None)):
            if isinstance(layers, torch.nn.ModuleList) and len(layers):
                return layers[-1]  # ViT (transformers 5: model.layers), DINOv2 (model.encoder.layer)
        return None

    def probe_pooling(self) -> None:
        """Find how the pooled feature follows from the spatial map (a mean, or a mean then the model's
        final layer norm as ConvNeXt's pooler does), checked on a random input; heatmaps need it
        (Grad-CAM re-runs the pooled feature from the map), so it runs on first use, not at load."""
        x = torch.randn(1, *self.input_size, generator=torch.Generator().manual_seed(0))
        p = next(self.net.parameters(), None)
        x = x.to(p.device) if p is not None else x
        with torch.inference_mode():
            want, fmap = self(x), self.spatial(x)
        norm = getattr(self.net, "layernorm", None)
        self._pools = False  # while probing: pool_spatial must not probe again
        for post in (None, norm if isinstance(norm, torch.nn.LayerNorm) else None):
            object.__setattr__(self, "post", post)
            with torch.inference_mode():
                got = fmap.mean(dim=(2, 3)) if post is None else post(fmap.mean(dim=(2, 3)))
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6):
                self._pools = True
                return
        object.__setattr__(self, "post", None)
        self._pools = False


def _quiet() -> None:

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _source(spec: EncoderSpec) -> tuple[str, Path | None]:
    """(what from_pretrained gets, the state-dict file to load on top, if any)."""
    ident, extra = spec.id, None
    if spec.weights:
        w = Path(spec.weights).expanduser()
        if w.is_dir():
            ident = str(w)
        elif w.exists():
            extra = w
        else:
            raise MavlError(f"{w}: weights file or folder not found", path=w)
    local = Path(ident).expanduser()
    if local.exists():
        if not local.is_dir():
            raise MavlError(f"{local}: an hf encoder must be a save_pretrained folder (config.json, weights, "
                            "preprocessor_config.json)", path=local)
        if not (local / "config.json").exists():
            raise MavlError(f"{local}: not a Hugging Face model folder (no config.json)", path=local)
        ident = str(local)
    elif looks_local(ident):
        raise MavlError(f"{ident}: model folder not found", path=ident)
    return ident, extra


def _check_remote_code(ident: str, trust: bool) -> None:
    cfg_file = Path(ident) / "config.json"
    if not cfg_file.exists():
        return
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError:
        raise MavlError(f"{cfg_file}: not valid JSON", path=cfg_file) from None
    if cfg.get("auto_map") and not trust:
        raise MavlError(f"{ident}: this model needs its own Python code from the model folder/hub (auto_map in "
                        "config.json); mavl does not run it unless you pass --trust-remote-code", path=ident)


def _hub_error(ident: str, what: str, exc: Exception) -> MavlError:
    if Path(ident).exists():
        return MavlError(f"{ident}: cannot load the {what} ({plain(str(exc))})", path=ident)
    why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline() else plain(str(exc))
    return MavlError(f"cannot load hf:{ident} ({what}) from the model hub ({why}); pass a local save_pretrained folder, "
                     "e.g. --backbone hf:/models/rad-dino")


def load_image(spec: EncoderSpec) -> HFEncoder:

    _quiet()
    ident, extra = _source(spec)
    _check_remote_code(ident, spec.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(ident, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise MavlError(f"hf:{ident} needs its own Python code; mavl does not run it unless you pass "
                            "--trust-remote-code") from None
        raise _hub_error(ident, "model config", exc) from None
    try:
        processor = AutoImageProcessor.from_pretrained(ident, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:
        if Path(ident).exists():
            raise MavlError(f"{ident}: no usable image processor in the folder ({plain(str(exc))}); save the model's "
                            "AutoImageProcessor into it with save_pretrained", path=ident) from None
        raise _hub_error(ident, "image processor", exc) from None
    try:
        if spec.pretrained:
            net = AutoModel.from_pretrained(ident, trust_remote_code=spec.trust_remote_code)
        else:
            net = AutoModel.from_config(config, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:
        raise _hub_error(ident, "model weights", exc) from None
    if hasattr(net, "vision_model") and not hasattr(net, "embeddings"):  # CLIP-like wrappers: the image tower
        net = net.vision_model
    if extra is not None:
        load_exact(net, load_state_dict(extra), str(extra), f"the hf model {ident}")
    net.eval()
    pre = processor_record(processor)
    patch = getattr(config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    c, h, w = pre["input_size"]
    with torch.inference_mode():
        probe = net(pixel_values=torch.zeros(1, c, h, w))
    hidden = probe.last_hidden_state
    prefix = None
    if hidden.ndim == 3:
        prefix = grid_from_tokens(hidden, h, w, patch)[0]
    final = spec.with_(id=ident if Path(ident).exists() else spec.id)
    enc = HFEncoder(final, net, pre, prefix or None, patch, pooling=spec.pooling)
    with torch.inference_mode():
        enc.dim = int(enc(torch.zeros(1, c, h, w)).shape[1])
    return enc


def processor_record(processor: Any) -> dict[str, Any]:
    """The image processor as a JSON recipe, with the fixed input size it produces."""

    rec = {"kind": "hf", "processor_class": type(processor).__name__,
           "processor": json.loads(json.dumps(processor.to_dict(), default=list))}
    shapes = {tuple(_run(processor, Image.new("RGB", size, 128)).shape) for size in ((300, 400), (400, 300))}
    if len(shapes) != 1:
        raise MavlError(f"the image processor {type(processor).__name__} gives differently shaped inputs for portrait "
                        f"and landscape images ({sorted(shapes)}); mavl needs a fixed input size (set crop_size)")
    rec["input_size"] = [int(v) for v in shapes.pop()]
    return rec


def _run(processor: Any, img: Any) -> np.ndarray:
    out = processor(images=img, return_tensors="pt")["pixel_values"]
    return out[0].numpy().astype(np.float32, copy=False)


def _processor(cfg: dict[str, Any]) -> Any:
    key = json.dumps([cfg.get("processor_class"), cfg.get("processor")], sort_keys=True)
    with _LOCK:
        proc = _PROCESSORS.get(key)
        if proc is None:
            _quiet()
            cls = getattr(transformers, str(cfg.get("processor_class")), None)
            if cls is None:
                raise MavlError(f"this transformers version has no image processor {cfg.get('processor_class')!r}")
            proc = _PROCESSORS[key] = cls.from_dict(dict(cfg["processor"]))
    return proc


def _sized(size: Any, key: str) -> int | None:
    v = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return int(v) if v else None


def _resized(size: Any, h: int, w: int) -> tuple[int, int]:
    """The (height, width) transformers' backends resize an ``h x w`` image to (their ``resize`` rules)."""

    short, long_ = _sized(size, "shortest_edge"), _sized(size, "longest_edge")
    if short and long_:
        return tuple(get_size_with_aspect_ratio((h, w), short, long_))
    if short:  # torchvision's rule (get_resize_output_image_size, default_to_square=False)
        s, l = (w, h) if w <= h else (h, w)
        new_s, new_l = short, int(short * l / s)
        return (new_l, new_s) if w <= h else (new_s, new_l)
    if _sized(size, "max_height") and _sized(size, "max_width"):
        return tuple(get_image_size_for_max_height_width((h, w), _sized(size, "max_height"), _sized(size, "max_width")))
    if _sized(size, "height") and _sized(size, "width"):
        return _sized(size, "height"), _sized(size, "width")
    raise MavlError(f"cannot tell how this image processor resizes (size {dict(size)})")


def geometry(cfg: dict[str, Any], iw: int, ih: int) -> Any:
    """Where an ``iw x ih`` image lands in the model input, read off the same image processor
    :func:`prepare` runs (its class's resize and centre-crop rules, its saved settings)."""

    proc = _processor(cfg)
    cls = type(proc)
    name = cls.__name__
    backend = PilBackend if issubclass(cls, PilBackend) else TorchvisionBackend if issubclass(cls, TorchvisionBackend) else None
    convnext = name.startswith("ConvNext")
    custom = [m for m in ("resize", "center_crop", "_preprocess", "preprocess")
              if backend is None or getattr(cls, m, None) is not getattr(backend, m, None)]
    if (custom and not (convnext and set(custom) <= {"resize", "_preprocess"})) or getattr(proc, "do_pad", None):
        what = "pads" if getattr(proc, "do_pad", None) else f"has its own {', '.join(custom) or 'backend'}"
        raise MavlError(f"heatmaps cannot map back through the image processor {name}: it {what}; "
                        "mavl knows the resize/centre-crop processors (ViT, DINOv2/BiT, ConvNeXt, Swin, ...)")
    pad = "ceil" if backend is PilBackend else "floor"
    _, out_h, out_w = (int(v) for v in cfg["input_size"])
    h, w, rule = ih, iw, []
    crop: tuple[int, int] | None = None
    if convnext and proc.do_resize:
        se = _sized(proc.size, "shortest_edge")
        if se is None:
            raise MavlError(f"{name}: size has no shortest_edge")
        if se < 384:  # ConvNeXt's rule: short side to shortest_edge / crop_pct, then a shortest_edge square
            h, w = _resized({"shortest_edge": int(se / proc.crop_pct)}, ih, iw)
            crop = (se, se)
            rule.append(f"shortest edge {int(se / proc.crop_pct)} (crop_pct {proc.crop_pct:g})")
        else:
            h, w = se, se
            rule.append(f"squash to {se}x{se}")
    elif proc.do_resize:
        h, w = _resized(proc.size, ih, iw)
        rule.append(f"resize {dict(proc.size)} -> {w}x{h}")
    if proc.do_center_crop and not convnext:
        crop = (_sized(proc.crop_size, "height"), _sized(proc.crop_size, "width"))
    if crop is not None:
        rule.append(f"centre crop {crop[1]}x{crop[0]}")
        top, left = centre_offset(h, crop[0], "floor", pad), centre_offset(w, crop[1], "floor", pad)
    else:
        crop, top, left = (h, w), 0, 0
    if tuple(crop) != (out_h, out_w):
        raise MavlError(f"{name} gives {crop[1]}x{crop[0]} inputs for a {iw}x{ih} image, not the recorded "
                        f"{out_w}x{out_h}; heatmaps cannot map back through it")
    return CropGeometry(iw, ih, w, h, left, top, out_w, out_h, f"hf {name}: " + ", ".join(rule))


def decode_size(cfg: dict[str, Any]) -> int:
    return DECODE_FACTOR * max(int(v) for v in cfg["input_size"][1:])


def prepare(img: Any, cfg: dict[str, Any]) -> np.ndarray:
    """One decoded PIL image -> float32 ``[C, H, W]`` through the model's own image processor."""
    proc = _processor(cfg)
    if img.mode != "RGB" and int(cfg["input_size"][0]) == 3 and not getattr(proc, "do_convert_rgb", True):
        img = img.convert("RGB")
    return _run(proc, img)
