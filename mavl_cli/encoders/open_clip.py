"""open_clip family: CLIP-style models with aligned image and text towers (``pip install "mavl[openclip]"``).

Spec (the ID is open_clip's own model name, with its schemes):

- ``open_clip:hf-hub:ORG/NAME`` (e.g. BiomedCLIP): config and weights from the
  hub (its cache when ``HF_HUB_OFFLINE`` is set);
- ``open_clip:/path/folder`` or ``open_clip:local-dir:/path/folder``: the hub
  layout on disk (``open_clip_config.json`` + ``open_clip_model.safetensors``
  or ``open_clip_pytorch_model.bin``);
- ``open_clip:ViT-B-32 --weights chexzero.pt``: a built-in architecture and an
  OpenAI-style CLIP state dict (plain tensors, read with ``weights_only``);
  ``--weights openai`` (a pretrained tag) asks open_clip for its own download;
  ``open_clip:/path/model_config.json --weights file.pt`` registers a config
  file first (``open_clip.add_model_config``) for architectures open_clip
  does not ship.

Preprocessing: ``model.visual.preprocess_cfg`` (size, mean, std,
interpolation, resize_mode, fill colour), recorded as ``{"kind":
"open_clip", "preprocess_cfg", "input_size"}``; mavl rebuilds open_clip's own
eval transform from it (``image_transform_v2(PreprocessCfg(**cfg),
is_train=False)``) and runs it on each decoded image, so features equal
``model.encode_image(preprocess(img))``.

Pooling: ``embed`` (``encode_image``: the tower's own pooling and projection
into the space shared with the text tower). Spatial map (ViT towers):
``visual.forward_intermediates`` of the last block with the final norm,
``[B, width, h, w]`` (``width`` is the tower's, before the projection; see
``spatial_dim``); heatmaps take each location through ``proj``
(``local_features``) and run Grad-CAM on the tokens entering the last block
(class-token pooling). ModifiedResNet towers (OpenAI RN50-style): layer4's map;
each location through the attention pool's value and output projections, and
Grad-CAM through the attention pool itself. timm ViT trunks (BiomedCLIP's
TimmModel layout): the trunk's normed patch tokens through its head, Grad-CAM
on the tokens entering the trunk's last block. Attention-pooled towers and timm
CNN trunks: no map (one clear line). Geometry (:func:`geometry`): from the same
``preprocess_cfg`` (``resize_mode`` shortest / longest / squash). ``has_text``: True; ``text_encoder()`` gives the aligned
text tower with open_clip's own tokenizer.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mavl_cli.core.errors import MavlError
from mavl_cli.encoders.base import ImageEncoder
from mavl_cli.encoders.common import (
    load_exact,
    load_state_dict,
    looks_local,
    offline,
    plain,
)
from mavl_cli.encoders.geometry import CropGeometry, centre_offset
from mavl_cli.encoders.spec import EncoderSpec

FAMILY = "open_clip"
HAS_TEXT = True
_TRANSFORMS: dict[str, Any] = {}
_LOCK = threading.Lock()
DROP_KEYS = ("input_resolution", "context_length", "vocab_size")  # OpenAI JIT-era extras, not tensors of the model


class OpenCLIPEncoder(ImageEncoder):
    family = FAMILY
    poolings = ("embed",)
    has_text = True

    def __init__(self, spec: EncoderSpec, clip: Any, model_name: str, preprocessing: dict[str, Any], **kw: Any) -> None:
        super().__init__(spec, clip.visual, int(_embed_dim(clip)), preprocessing, **kw)
        object.__setattr__(self, "_clip", clip)  # the whole model, for the text tower (not a submodule here)
        self.model_name = model_name
        v = clip.visual
        ln = getattr(v, "ln_post", None)
        self.spatial_dim = int(ln.normalized_shape[0]) if ln is not None and hasattr(ln, "normalized_shape") else None
        if hasattr(v, "attnpool") and hasattr(v, "layer4"):
            self.tower = "resnet"  # ModifiedResNet: layer4's map, attention-pooled
            self.spatial_dim = int(v.attnpool.k_proj.in_features)
        elif hasattr(v, "transformer") and hasattr(v, "conv1") and getattr(v, "attn_pool", None) is None:
            self.tower = "vit"
        elif _timm_vit_trunk(v):
            self.tower = "timm-vit"  # TimmModel around a timm ViT (BiomedCLIP's layout): trunk tokens, then its head
            self.spatial_dim = int(v.trunk.num_features)
        else:
            self.tower = None  # attention-pooled (CoCa) towers, timm CNN trunks: no map mavl reads
        patch = getattr(v, "patch_size", None) or getattr(getattr(getattr(v, "trunk", None), "patch_embed", None),
                                                          "patch_size", None)
        self.patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch) if patch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        if self.tower is None or not hasattr(self.net, "forward_intermediates"):
            raise MavlError(f"{self.spec.name}: this open_clip image tower ({type(self.net).__name__}"
                            f"{', attention-pooled' if getattr(self.net, 'attn_pool', None) is not None else ''}) "
                            "gives no spatial feature map mavl can read (ViT towers and ModifiedResNet do)")
        out = self.net.forward_intermediates(x, indices=1, intermediates_only=True, normalize_intermediates=True,
                                             output_fmt="NCHW")
        return out["image_intermediates"][-1]

    def local_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """Each location through what the pooled path applies after pooling: ViT, the tokens (already
        through ``ln_post``) times ``proj``; ModifiedResNet, the attention pool's value and output
        projections (its positional embedding added), the pool's output for a location attending to itself."""
        v = self.net
        if self.tower == "timm-vit":  # what forward_head does after pooling (fc_norm), then the adapter head
            fc_norm = getattr(v.trunk, "fc_norm", None) or torch.nn.Identity()
            t = fmap.permute(0, 2, 3, 1)
            return v.head(fc_norm(t)).permute(0, 3, 1, 2)
        if self.tower == "resnet":
            ap = v.attnpool
            b, c, h, w = fmap.shape
            pos = ap.positional_embedding[1:].to(fmap.dtype)
            if pos.shape[0] != h * w:
                raise MavlError(f"{self.spec.name}: its attention pool expects a {int(pos.shape[0] ** 0.5)}^2 map, got {h}x{w}")
            t = fmap.flatten(2).transpose(1, 2) + pos
            return ap.c_proj(ap.v_proj(t)).transpose(1, 2).reshape(b, -1, h, w)
        if getattr(v, "proj", None) is None:
            return fmap
        return torch.einsum("bchw,cd->bdhw", fmap, v.proj)

    def pool_spatial(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.tower == "resnet":
            return self.net.attnpool(fmap)
        return self.local_features(fmap).mean(dim=(2, 3))

    @property
    def spatial_pools(self) -> bool:  # type: ignore[override]
        v = self.net
        if self.tower == "resnet":
            return True
        if self.tower == "timm-vit":  # avg pooling over the normed patch tokens, then fc_norm and the head
            return False
        return self.tower == "vit" and getattr(v, "pool_type", "tok") == "avg" and not getattr(v, "final_ln_after_pool", False)

    def cam_block(self) -> torch.nn.Module | None:
        if self.tower not in ("vit", "timm-vit") or self.spatial_pools:
            return None
        if self.tower == "timm-vit":
            return self.net.trunk.blocks[-1]
        blocks = getattr(getattr(self.net, "transformer", None), "resblocks", None)
        return blocks[-1] if blocks is not None and len(blocks) else None

    def text_encoder(self) -> "OpenCLIPText":
        return OpenCLIPText(self._clip, self.model_name, self.spec)


class OpenCLIPText:
    """open_clip's text tower with its own tokenizer: texts -> vectors in the image tower's space."""

    def __init__(self, clip: Any, model_name: str, spec: EncoderSpec) -> None:
        import open_clip

        self.clip, self.spec = clip, spec
        try:
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as exc:
            raise MavlError(f"{spec.name}: cannot load its tokenizer ({plain(str(exc))})") from None
        self.context_length = int(getattr(self.tokenizer, "context_length", 77) or 77)
        self.dim = int(_embed_dim(clip))

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens each text needs (start/end included), to report truncation."""
        tok = self.tokenizer
        if hasattr(tok, "encode"):
            return [len(tok.encode(t)) + 2 for t in texts]
        inner = getattr(tok, "tokenizer", None)
        if inner is not None:
            return [len(inner(t)["input_ids"]) for t in texts]
        return [0 for _ in texts]

    def encode(self, texts: list[str], device: Any = "cpu") -> torch.Tensor:
        tokens = self.tokenizer(texts).to(device)
        return self.clip.to(device).encode_text(tokens)


def _timm_vit_trunk(visual: Any) -> bool:
    """An open_clip TimmModel whose trunk is a timm ViT pooled by class token or mean (no attention pool)."""
    trunk = getattr(visual, "trunk", None)
    return trunk is not None and hasattr(visual, "head") and all(
        hasattr(trunk, a) for a in ("blocks", "patch_embed", "num_prefix_tokens", "norm")) and \
        getattr(trunk, "attn_pool", None) is None and getattr(trunk, "global_pool", None) in ("token", "avg")


def _embed_dim(clip: Any) -> int:
    proj = getattr(clip.visual, "output_dim", None)
    if proj:
        return int(proj)
    with torch.inference_mode():
        size = clip.visual.image_size
        h, w = (size, size) if isinstance(size, int) else size
        return int(clip.visual(torch.zeros(1, 3, h, w)).shape[1])


def _model_name(spec: EncoderSpec) -> tuple[str, str | None]:
    """(name for open_clip.create_model, pretrained tag or file or None)."""
    ident = spec.id
    if ident.startswith(("hf-hub:", "local-dir:")):
        _weights_file_only(spec, "hub repo")
        if ident.startswith("local-dir:") and not Path(ident[len("local-dir:"):]).is_dir():
            raise MavlError(f"{ident[len('local-dir:'):]}: open_clip model folder not found")
        return ident, spec.weights
    p = Path(ident).expanduser()
    if p.is_dir():
        if not (p / "open_clip_config.json").exists():
            raise MavlError(f"{p}: not an open_clip model folder (no open_clip_config.json)", path=p)
        _weights_file_only(spec, "folder")
        return f"local-dir:{p}", spec.weights
    if p.suffix == ".json" and p.is_file():
        import open_clip

        open_clip.add_model_config(str(p))
        ident = p.stem
    elif looks_local(ident):
        raise MavlError(f"{ident}: open_clip model folder not found", path=ident)
    return ident, spec.weights


def _weights_file_only(spec: EncoderSpec, what: str) -> None:
    """A folder or hub repo brings its own weights; ``--weights`` may only name a state-dict file to load on
    top (e.g. the encoder ``mavl finetune-lrf`` fine-tuned), never a pretrained tag."""
    w = spec.weights
    if w and not (Path(w).expanduser().is_file() or Path(w).suffix in (".safetensors", ".pt", ".pth", ".bin")):
        raise MavlError(f"{spec.name}: the {what} brings its own weights; --weights may only name a state-dict file "
                        "to load on top of it (drop --weights otherwise)")


def load_image(spec: EncoderSpec) -> OpenCLIPEncoder:
    import open_clip

    name, weights = _model_name(spec)
    if not name.startswith(("hf-hub:", "local-dir:")) and name not in open_clip.list_models():
        raise MavlError(f"unknown open_clip model {name!r} (open_clip.list_models() lists them; or give a folder "
                        "with open_clip_config.json)")
    file = Path(weights).expanduser() if weights and (Path(weights).expanduser().exists() or looks_local(weights)) else None
    try:
        if file is not None:
            if not file.exists():
                raise MavlError(f"{file}: weights file not found", path=file)
            with _no_weights_warning():  # mavl loads the weights itself, just below
                if name.startswith(("hf-hub:", "local-dir:")):  # the repo's config; the file's weights
                    clip = open_clip.create_model(name, load_weights=False)
                else:
                    clip = open_clip.create_model(name, pretrained=None)
            _load_clip_state(clip, file)
        elif name.startswith(("hf-hub:", "local-dir:")):
            clip = open_clip.create_model(name, load_weights=spec.pretrained)
        else:
            if spec.pretrained and not weights:
                raise MavlError(f"open_clip:{name} has no weights: pass --weights FILE (an OpenAI-style CLIP state dict) "
                                "or a pretrained tag (e.g. --weights openai), or use a folder/hf-hub: id")
            clip = open_clip.create_model(name, pretrained=weights if spec.pretrained else None)
    except MavlError:
        raise
    except Exception as exc:
        if name.startswith("hf-hub:") or (weights and file is None):
            why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline() else plain(str(exc))
            raise MavlError(f"cannot get open_clip:{name} weights ({why}); pass a local folder (open_clip_config.json "
                            "+ weights) or --weights FILE") from None
        raise MavlError(f"cannot build open_clip:{name} ({plain(str(exc))})") from None
    clip.eval()
    pre = transform_record(clip)
    return OpenCLIPEncoder(spec, clip, name, pre, pooling=spec.pooling)


class _no_weights_warning:
    """open_clip logs "No pretrained weights loaded" on the root logger when a model is built empty;
    mavl then loads the weights itself, and stderr must stay one clear line."""

    @staticmethod
    def filter(record: Any) -> bool:
        return "No pretrained weights loaded" not in str(record.getMessage())

    def __enter__(self) -> None:

        logging.getLogger().addFilter(self.filter)

    def __exit__(self, *exc: Any) -> None:

        logging.getLogger().removeFilter(self.filter)


def _load_clip_state(clip: Any, file: Path) -> None:
    """An OpenAI-style (or open_clip) CLIP state dict, via open_clip's own key conversions."""
    from open_clip.factory import convert_state_dict, resize_pos_embed

    state = {k: v for k, v in load_state_dict(file).items() if k not in DROP_KEYS}
    state = convert_state_dict(clip, state)
    if "logit_scale" in state and clip.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
    if "logit_bias" not in state and getattr(clip, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(clip.logit_bias)
    resize_pos_embed(state, clip)
    load_exact(clip, state, str(file), "this open_clip architecture")


def transform_record(clip: Any) -> dict[str, Any]:
    cfg = dict(getattr(clip.visual, "preprocess_cfg", None) or {})
    if not cfg:
        size = clip.visual.image_size

        from open_clip.transform import PreprocessCfg

        cfg = {**asdict(PreprocessCfg()), "size": size}
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    size = cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return {"kind": "open_clip", "preprocess_cfg": cfg, "input_size": [3, int(h), int(w)]}


def _transform(cfg: dict[str, Any]) -> Any:

    key = json.dumps(cfg["preprocess_cfg"], sort_keys=True)
    with _LOCK:
        tf = _TRANSFORMS.get(key)
        if tf is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            pc = dict(cfg["preprocess_cfg"])
            pc = {k: (tuple(v) if isinstance(v, list) else v) for k, v in pc.items()}
            tf = _TRANSFORMS[key] = image_transform_v2(PreprocessCfg(**pc), is_train=False)
    return tf


def geometry(cfg: dict[str, Any], iw: int, ih: int) -> Any:
    """Where an ``iw x ih`` image lands in the model input, from the same ``preprocess_cfg`` that
    :func:`prepare` builds open_clip's eval transform from (``image_transform``: ``shortest``
    = Resize + CenterCrop, ``longest`` = ResizeKeepRatio(longest) + CenterCropOrPad, ``squash``)."""

    pc = cfg["preprocess_cfg"]
    mode = pc.get("resize_mode") or "shortest"
    _, th, tw = (int(v) for v in cfg["input_size"])
    if mode == "squash":
        return CropGeometry(iw, ih, tw, th, 0, 0, tw, th, f"open_clip squash to {tw}x{th}")
    if mode not in ("shortest", "longest"):
        raise MavlError(f"open_clip resize_mode {mode!r}: heatmaps know shortest, longest and squash")
    if mode == "shortest" and th == tw:  # torchvision Resize(int): short side exact, long side truncated
        s, l = (iw, ih) if iw <= ih else (ih, iw)
        ns, nl = th, int(th * l / s)
        nw, nh = (ns, nl) if iw <= ih else (nl, ns)
    else:  # ResizeKeepRatio: one ratio (the larger for longest, the smaller for shortest), sizes rounded
        rh, rw = ih / th, iw / tw
        ratio = max(rh, rw) if mode == "longest" else min(rh, rw)
        nh, nw = round(ih / ratio), round(iw / ratio)
    left, top = centre_offset(nw, tw, "round"), centre_offset(nh, th, "round")
    return CropGeometry(iw, ih, nw, nh, left, top, tw, th,
                        f"open_clip {mode} edge to {nw}x{nh}, centre {'crop/pad' if mode == 'longest' else 'crop'} {tw}x{th}")


def decode_size(cfg: dict[str, Any]) -> int:
    mode = cfg["preprocess_cfg"].get("resize_mode", "shortest")
    interp = cfg["preprocess_cfg"].get("interpolation", "bicubic")
    side = max(int(v) for v in cfg["input_size"][1:])
    # PIL bicubic to the short side is exactly open_clip's Resize (torchvision on PIL); other modes start from more
    return side if mode == "shortest" and interp == "bicubic" else 4 * side


def prepare(img: Any, cfg: dict[str, Any]) -> np.ndarray:
    """One decoded PIL image -> float32 ``[3, H, W]`` through open_clip's own eval transform."""
    return _transform(cfg)(img).numpy().astype(np.float32, copy=False)
