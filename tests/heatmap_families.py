"""Tiny models of every encoder family with a spatial map, as model files, for the heatmap tests.

Each encoder is saved in its family's own on-disk format (the builders of tests/test_encoders.py),
then a random LRF head + fusion + label text makes a ``model`` file around it, as `mavl fuse` would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax"]
#: family case -> what the spec needs; the hf cases are test_encoders' tiny models
FAMILY_CASES = ("hf-dinov2", "hf-dinov2_registers", "hf-convnext", "hf-swin", "hf-vit", "open_clip-vit", "open_clip-resnet", "open_clip-timm",
                "xrv-densenet", "timm-vit_cls", "timm-cnn_max")
TINY_DENSENET = {"growth_rate": 8, "block_config": [1, 1], "num_init_features": 8}
TINY_VIT = {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}
#: a random LRF head whose 8 ReLU units all stay off for this encoder's features gives constant logits (and
#: all-zero Grad-CAM maps): those cases get another seed
HEAD_SEED = {"timm-vit_cls": 3}
#: the pooling each case's encoder is built with (None: the family's default)
POOLING = {"timm-vit_cls": "cls", "timm-vit_mean": "mean", "timm-cnn_max": "max"}


def encoder_spec(case: str, root: Path) -> tuple[str, str | None, dict]:
    """(spec, weights, options) of a tiny encoder of ``case``, written under ``root`` if not there yet."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    folder = root / case
    family, kind = case.split("-", 1)
    if family == "hf":
        if not folder.exists():
            from tests.encoders.test_encoders import _hf_tiny

            _hf_tiny(kind, folder)
        return f"hf:{folder}", None, {}
    if family == "open_clip":
        if not folder.exists():
            from open_clip.model import CLIP
            from safetensors.torch import save_file

            torch.manual_seed(0)
            if kind == "vit":
                vision = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}
            elif kind == "timm":  # BiomedCLIP's layout: a timm ViT trunk (timm's own tiny test_vit, 160 px) + linear head
                vision = {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                          "timm_proj": "linear", "image_size": 160}
            else:  # ModifiedResNet (OpenAI RN50 layout): 4 stages, /32, attention pool
                vision = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16}
            cfg = {"embed_dim": 16, "vision_cfg": vision,
                   "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
            pre = {"mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "resize_mode": "shortest"}
            folder.mkdir()
            (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
            save_file({k: v.contiguous() for k, v in CLIP(**cfg).state_dict().items()}, str(folder / "open_clip_model.safetensors"))
        return f"open_clip:{folder}", None, {}
    if family == "timm":  # registry poolings other than the model's own (timm's own go through SpatialAdapter)
        if not folder.exists():
            import timm

            from mavl_cli.encoders.timm import save_local_backbone

            torch.manual_seed(0)
            name, args = ("vit_tiny_patch16_224", dict(TINY_VIT)) if kind.startswith("vit") else ("resnet10t", {})
            save_local_backbone(timm.create_model(name, pretrained=False, num_classes=0, **args), name, folder, args)
        return f"timm:{folder}", None, {}
    if family == "xrv":
        weights = root / "xrv-densenet.pt"
        if not weights.exists():
            import torchxrayvision as xrv

            torch.manual_seed(0)
            kw = {k: tuple(v) if isinstance(v, list) else v for k, v in TINY_DENSENET.items()}
            torch.save(xrv.models.DenseNet(num_classes=18, **kw).state_dict(), weights)
        return "xrv:densenet121-res224-all", str(weights), dict(TINY_DENSENET)
    raise ValueError(case)


def model_file(case: str, root: Path, aggregate: str = "mean") -> Path:
    """A fused ``model`` file (random LRF head, fusion, 3 labels x 2 aspects) around the tiny encoder."""
    from mavl_cli.encoders import build_image_encoder

    path = root / f"{case}-{aggregate}.model.safetensors"
    if path.exists():
        return path
    spec, weights, options = encoder_spec(case, root)
    enc = build_image_encoder(spec, weights=weights, options=options, pooling=POOLING.get(case))
    return write_fused_model(path, enc.dim, enc.name, enc.to_meta(), aggregate, head_seed=HEAD_SEED.get(case, 1))


def write_fused_model(path: Path, dim: int, backbone: str, encoder_meta: dict, aggregate: str = "mean",
                      head_seed: int = 1, extra_meta: dict | None = None) -> Path:
    """A ``model`` file for an encoder of feature size ``dim``: random LRF head (rank 8), random fusion,
    3 labels x 2 aspects (the second label has one aspect)."""
    import torch

    from mavl_cli.io.mavlfile import MavlFile, write_file
    from mavl_cli.models.fusion import FusionModel
    from mavl_cli.models.lrf import LRFHead
    from mavl_cli.models.modelfile import build_model

    torch.manual_seed(head_seed)
    head = LRFHead(dim, 8, len(LABELS)).eval()
    lrf = MavlFile("lrf-head", {k: v.detach().numpy() for k, v in head.state_dict().items()},
                            {"labels": LABELS, "rank": 8, "keep": 4, "eta": 0.0, "fingerprint": "x", "backbone": backbone})
    rng = np.random.default_rng(2)
    text = MavlFile("text-embeddings", {"embeddings": rng.standard_normal((3, 2, 16)).astype(np.float32),
                                                 "mask": np.array([[1, 1], [1, 0], [1, 1]], np.uint8)},
                             {"labels": LABELS, "aspects": ["a", "b"]})
    fusion = FusionModel(8, 16, 3, 2, dim=16, aggregate=aggregate)
    with torch.no_grad():
        fusion.aspect_logits.normal_()
    cfg = {"img_dim": 8, "txt_dim": 16, "dim": 16, "aggregate": aggregate, "n_aspects": 2}
    tensors, meta = build_model({k: v.detach().numpy() for k, v in fusion.state_dict().items()}, cfg, text,
                                encoder_meta, lrf, {})
    meta.update(extra_meta or {})
    write_file(path, "model", tensors, meta)
    return path


def map_model(path: Path):
    """(loaded model file, its encoder, its MapModel)."""
    from mavl_cli.explain.heatmaps import build_map_model
    from mavl_cli.models.mavlmodel import image_encoder
    from mavl_cli.models.modelfile import load_model

    model = load_model(path)
    enc, prep = image_encoder(model.meta)
    return model, enc, build_map_model(model, enc, prep)


def spot_image(w: int, h: int, x0: int, y0: int, sigma: float, dark: bool = False) -> np.ndarray:
    """8-bit gray film: a bright Gaussian spot at (x0, y0) on a dim background (dark: inverted)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = 40 + 180 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
    return (255 - img if dark else img).astype(np.uint8)
