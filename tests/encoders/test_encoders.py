"""Encoder families: spec parsing, and exactness against each family's own library.

Every family test builds a tiny random model in that family's own on-disk
format, runs the family library's own reference pipeline and asserts that
mavl's features match (cosine >= 0.9999; the max abs difference is printed,
run with ``-s`` to see it). Test images: an 8-bit PNG, a 16-bit PNG, a
MONOCHROME1 DICOM and a large JPEG (tests/encoder_files.py).

What mavl guarantees, and how each case is compared:

- 8-bit PNG: the reference reads the file with PIL itself; compared from the file.
- 16-bit PNG and DICOM: the reference libraries cannot decode them as mavl
  does (PIL's ``convert("RGB")`` clips 16-bit values at 255; none of them reads
  DICOM, MONOCHROME1 inversion or windowing). mavl's guarantee is: from mavl's
  decoded 8-bit image (windowed, MONOCHROME1 inverted) onwards, preprocessing
  and features are the family's own; compared from ``load_radiograph(path)``.
- large JPEG: from the decoded full-resolution image the guarantee is the
  same (cosine >= 0.9999). From the file mavl decodes at reduced scale for
  speed (JPEG draft mode when the image is 2x the size it needs, then one PIL
  bicubic step, box reduction beyond 4x), so the family's resize starts from a
  smaller image than the reference's: that case is held to cosine >= 0.999
  (tiny random models amplify high-frequency differences far more than
  trained ones) and its figure is printed.
"""

from __future__ import annotations

import numpy as np
import pytest
from tests.encoder_files import (
    compare,
    mavl_features,
    mavl_file_features,
    report,
    write_images,
)

from mavl_cli.core.errors import MavlError
from mavl_cli.encoders import build_image_encoder
from mavl_cli.encoders.spec import EncoderSpec, split_spec

COS = 0.9999
COS_LARGE_FILE = 0.999  # see the module docstring: reduced-scale JPEG decoding


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("films"))


def decoded(paths):
    from mavl_cli.io.imageio import load_radiograph

    return {k: load_radiograph(p) for k, p in paths.items()}


# ----------------------------------------------------------------------------- spec


@pytest.mark.parametrize("text, family, ident", [
    ("vit_base_patch16_224", "timm", "vit_base_patch16_224"),
    ("hf-hub:timm/vit_small_patch16_224.augreg_in21k", "timm", "hf-hub:timm/vit_small_patch16_224.augreg_in21k"),
    ("timm:resnet50", "timm", "resnet50"),
    ("hf:microsoft/rad-dino", "hf", "microsoft/rad-dino"),
    ("hf:/models/rad-dino", "hf", "/models/rad-dino"),
    ("open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "open_clip",
     "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"),
    ("openclip:ViT-B-32", "open_clip", "ViT-B-32"),
    ("xrv:densenet121-res224-all", "xrv", "densenet121-res224-all"),
    ("torchxrayvision:resnet50-res512-all", "xrv", "resnet50-res512-all"),
])
def test_spec_parsing(text, family, ident):
    assert split_spec(text) == (family, ident)
    spec = EncoderSpec.parse(text, "w.pt", pooling="mean")
    assert (spec.family, spec.id, spec.weights, spec.pooling) == (family, ident, "w.pt", "mean")
    assert EncoderSpec.from_meta({"encoder": spec.to_meta()}) == spec
    assert split_spec(spec.name) == (family, ident)  # the canonical name parses back


@pytest.mark.parametrize("text, words", [("foo:bar", "unknown encoder family 'foo'"), ("hf:", "nothing after hf:"),
                                         ("", "empty encoder name")])
def test_bad_specs_are_one_clear_error(text, words):
    with pytest.raises(MavlError, match=words):
        split_spec(text)


def test_old_files_rebuild_as_timm():
    spec = EncoderSpec.from_meta({"backbone": "vit_tiny_patch16_224", "backbone_weights": "random",
                                  "backbone_args": {"img_size": 32}})
    assert (spec.family, spec.id, spec.pretrained, spec.options) == ("timm", "vit_tiny_patch16_224", False, {"img_size": 32})


def test_registry_import_is_torch_free():
    import subprocess
    import sys

    code = "import sys, mavl_cli.encoders; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


# ----------------------------------------------------------------------------- timm


TIMM_CASES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}),
    "cnn": ("resnet10t", {}),
}


@pytest.fixture(scope="module", params=sorted(TIMM_CASES))
def timm_folder(request, tmp_path_factory):
    import timm
    import torch

    from mavl_cli.encoders.timm import save_local_backbone

    name, args = TIMM_CASES[request.param]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **args)
    return name, args, save_local_backbone(model, name, tmp_path_factory.mktemp(f"timm_{request.param}"), args)


def test_timm_matches_timm_transforms(timm_folder, images):
    """mavl vs timm's own loader (pretrained_cfg_overlay file) and create_transform(resolve_data_config)."""
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    name, args, folder = timm_folder
    ref = timm.create_model(name, pretrained=True, num_classes=0,
                            pretrained_cfg_overlay={"file": str(folder / "model.safetensors")}, **args).eval()
    over = {"input_size": (3, args["img_size"], args["img_size"])} if "img_size" in args else {}
    tf = create_transform(**resolve_data_config(over, model=ref))
    enc = build_image_encoder(f"timm:{name}", weights=str(folder))
    assert enc.dim == ref.num_features
    dec = decoded(images)

    def ref_feats(ims):
        with torch.inference_mode():
            return ref(torch.stack([tf(im.convert("RGB")) for im in ims])).numpy()

    for case in images:
        cos, diff = compare(mavl_features(enc, [dec[case]]), ref_feats([dec[case]]))
        report("timm", f"{name} {case} (decoded)", cos, diff)
        assert cos >= COS
    for case in ("png8", "jpeg_large"):
        cos, diff = compare(mavl_file_features(enc, [images[case]]), ref_feats([Image.open(images[case])]))
        report("timm", f"{name} {case} (file)", cos, diff)
        assert cos >= (COS if case == "png8" else COS_LARGE_FILE)
    cos, diff = compare(mavl_file_features(enc, [images["png8"]]), ref_feats([Image.open(images["png8"])]))
    assert diff < 1e-4  # same decode, same resize: equal up to float rounding


def test_timm_spatial_map_pools_to_features(timm_folder):
    import torch

    name, args, folder = timm_folder
    enc = build_image_encoder(f"timm:{name}", weights=str(folder), pooling="mean")
    x = torch.randn(2, *enc.input_size)
    with torch.inference_mode():
        fmap = enc.spatial(x)
        assert fmap.ndim == 4 and fmap.shape[:2] == (2, enc.dim)
        if name.startswith("vit"):
            assert fmap.shape[2:] == (args["img_size"] // args["patch_size"],) * 2
        np.testing.assert_allclose(enc.pool_spatial(fmap).numpy(), enc(x).numpy(), rtol=1e-4, atol=1e-5)
        tokens = enc.net.forward_features(x)
        if tokens.ndim == 3:  # ViT: the map is the patch tokens (prefix dropped), CLS pooling is token 0
            np.testing.assert_allclose(fmap.flatten(2).transpose(1, 2).numpy(), tokens[:, enc.net.num_prefix_tokens:].numpy())
            cls = build_image_encoder(f"timm:{name}", weights=str(folder), pooling="cls")
            np.testing.assert_allclose(cls(x).numpy(), tokens[:, 0].numpy(), rtol=1e-5, atol=1e-6)
        else:  # CNN: timm's own global average pooling of the same map is the default feature
            default = build_image_encoder(f"timm:{name}", weights=str(folder))
            assert default.spatial_pools
            np.testing.assert_allclose(default(x).numpy(), fmap.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)


def test_timm_folder_as_id(timm_folder):
    name, args, folder = timm_folder
    enc = build_image_encoder(f"timm:{folder}")
    assert enc.name == name and enc.spec.weights == str(folder)


# ----------------------------------------------------------------------------- hf (transformers)


def _hf_tiny(kind: str, folder):
    """A tiny random transformers vision model + its image processor, both saved with save_pretrained."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "dinov2":  # RAD-DINO's layout: Dinov2Model + BitImageProcessor (short side, centre crop)
        model = T.Dinov2Model(T.Dinov2Config(**small, image_size=28, patch_size=7))
        proc = T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                                   image_mean=[0.53, 0.53, 0.53], image_std=[0.26, 0.26, 0.26])
    elif kind == "dinov2_registers":
        model = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**small, image_size=28, patch_size=7,
                                                                       num_register_tokens=4))
        proc = T.BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    elif kind == "vit":  # google/vit-*: ViTImageProcessor squashes to a fixed size
        model = T.ViTModel(T.ViTConfig(**small, image_size=32, patch_size=8))
        proc = T.ViTImageProcessor(size={"height": 32, "width": 32})
    elif kind == "convnext":  # ConvNextImageProcessor: short side to size / crop_pct, then crop
        model = T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
        proc = T.ConvNextImageProcessor(size={"shortest_edge": 48}, crop_pct=0.875)
    elif kind == "swin":
        model = T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                         window_size=4))
        proc = T.ViTImageProcessor(size={"height": 32, "width": 32})
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


HF_KINDS = ("dinov2", "vit", "convnext", "swin", "dinov2_registers")


@pytest.fixture(scope="module", params=HF_KINDS)
def hf_folder(request, tmp_path_factory):
    return request.param, _hf_tiny(request.param, tmp_path_factory.mktemp(f"hf_{request.param}"))


def test_hf_matches_autoimageprocessor(hf_folder, images):
    """mavl vs transformers' own AutoModel + AutoImageProcessor (the backend from_pretrained picks)."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    kind, folder = hf_folder
    ref = AutoModel.from_pretrained(folder).eval()
    proc = AutoImageProcessor.from_pretrained(folder)
    enc = build_image_encoder(f"hf:{folder}")
    cls_model = kind in ("dinov2", "vit", "dinov2_registers")
    assert enc.pooling == ("cls" if cls_model else "default")
    dec = decoded(images)

    def ref_feats(ims):
        with torch.inference_mode():
            # as a user would: RGB in (ViTImageProcessor does not convert gray itself; Bit's convert is the same)
            out = ref(**proc(images=[im.convert("RGB") for im in ims], return_tensors="pt"))
        return (out.last_hidden_state[:, 0] if cls_model else out.pooler_output.flatten(1)).numpy()

    for case in images:
        cos, diff = compare(mavl_features(enc, [dec[case]]), ref_feats([dec[case]]))
        report("hf", f"{kind} {case} (decoded)", cos, diff)
        assert cos >= COS and diff < 1e-4
    for case in ("png8", "jpeg_large"):
        cos, diff = compare(mavl_file_features(enc, [images[case]]), ref_feats([Image.open(images[case])]))
        report("hf", f"{kind} {case} (file)", cos, diff)
        assert cos >= (COS if case == "png8" else COS_LARGE_FILE)
    if kind == "dinov2":  # DINOv2's pooler_output is the normed CLS token: what RAD-DINO's card uses
        with torch.inference_mode():
            out = ref(**proc(images=[dec["png8"]], return_tensors="pt"))
        np.testing.assert_allclose(out.pooler_output.numpy(), ref_feats([dec["png8"]]), atol=1e-6)


def test_hf_mean_pooling_and_spatial_map(hf_folder):
    import torch
    from transformers import AutoModel

    kind, folder = hf_folder
    enc = build_image_encoder(f"hf:{folder}", pooling="mean")
    ref = AutoModel.from_pretrained(folder).eval()
    x = torch.randn(2, *enc.input_size)
    with torch.inference_mode():
        fmap = enc.spatial(x)
        hidden = ref(pixel_values=x).last_hidden_state
    assert fmap.ndim == 4 and fmap.shape[:2] == (2, enc.dim)
    if hidden.ndim == 3:
        prefix = {"dinov2": 1, "vit": 1, "dinov2_registers": 5, "swin": 0}[kind]
        assert fmap.shape[2] * fmap.shape[3] == hidden.shape[1] - prefix
        np.testing.assert_allclose(fmap.flatten(2).transpose(1, 2).numpy(), hidden[:, prefix:].numpy())
    with torch.inference_mode():
        np.testing.assert_allclose(enc(x).numpy(), fmap.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)


def test_hf_refusals(tmp_path, hf_folder):
    import json
    import shutil

    kind, folder = hf_folder
    if kind != "dinov2":
        pytest.skip("one model is enough")
    remote = tmp_path / "remote"
    shutil.copytree(folder, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_x.XModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MavlError, match="--trust-remote-code"):
        build_image_encoder(f"hf:{remote}")
    bare = tmp_path / "no_processor"
    shutil.copytree(folder, bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(MavlError, match="image processor"):
        build_image_encoder(f"hf:{bare}")
    with pytest.raises(MavlError, match="HF_HUB_OFFLINE"):
        build_image_encoder("hf:someone/not-cached-model")
    with pytest.raises(MavlError, match="pooling"):
        build_image_encoder(f"hf:{folder}", pooling="max")


# ----------------------------------------------------------------------------- open_clip

TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_CLIP_PRE = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic", "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A tiny CLIP in open_clip's hub layout (open_clip_config.json + safetensors), and as an OpenAI-style
    state dict (.pt of plain tensors, OpenAI's key names) with its architecture in a model-config JSON."""
    import json

    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = CLIP(**TINY_CLIP_CFG)
    folder = root / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": TINY_CLIP_PRE}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    cfg_file = root / "mavl-tiny-clip.json"
    cfg_file.write_text(json.dumps(TINY_CLIP_CFG))
    state = dict(model.state_dict())
    state["input_resolution"] = torch.tensor(32)  # as in OpenAI's checkpoints; not a model tensor
    torch.save(state, root / "openai_style.pt")
    return {"folder": folder, "config": cfg_file, "pt": root / "openai_style.pt"}


@pytest.mark.parametrize("layout", ["hub_folder", "openai_state_dict"])
def test_open_clip_matches_open_clip_preprocess(clip_files, images, layout):
    """mavl vs open_clip.create_model_and_transforms(...) -> encode_image(preprocess(img)), image and text."""
    import open_clip
    import torch
    from PIL import Image

    if layout == "hub_folder":
        spec = f"open_clip:{clip_files['folder']}"
        enc = build_image_encoder(spec)
        ref, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_files['folder']}")
        tok = open_clip.get_tokenizer(f"local-dir:{clip_files['folder']}")
    else:
        enc = build_image_encoder(f"open_clip:{clip_files['config']}", weights=str(clip_files["pt"]))
        open_clip.add_model_config(str(clip_files["config"]))
        state = {k: v for k, v in torch.load(clip_files["pt"], weights_only=True).items() if k != "input_resolution"}
        ref, _, preprocess = open_clip.create_model_and_transforms("mavl-tiny-clip")
        ref.load_state_dict(state)
        tok = open_clip.get_tokenizer("mavl-tiny-clip")
    ref.eval()
    assert enc.has_text and enc.dim == 16
    dec = decoded(images)

    def ref_feats(ims):
        with torch.inference_mode():
            return ref.encode_image(torch.stack([preprocess(im) for im in ims])).numpy()

    for case in images:
        cos, diff = compare(mavl_features(enc, [dec[case]]), ref_feats([dec[case]]))
        report("open_clip", f"{layout} {case} (decoded)", cos, diff)
        assert cos >= COS and diff < 1e-4
    for case in ("png8", "jpeg_large"):
        cos, diff = compare(mavl_file_features(enc, [images[case]]), ref_feats([Image.open(images[case])]))
        report("open_clip", f"{layout} {case} (file)", cos, diff)
        assert cos >= (COS if case == "png8" else COS_LARGE_FILE)
    texts = ["left pleural effusion", "no acute cardiopulmonary process"]
    with torch.inference_mode():
        mine = enc.text_encoder().encode(texts).numpy()
        theirs = ref.encode_text(tok(texts)).numpy()
    cos, diff = compare(mine, theirs)
    report("open_clip", f"{layout} text tower", cos, diff)
    assert cos >= COS and diff < 1e-5


def test_open_clip_spatial_map(clip_files):
    import torch

    enc = build_image_encoder(f"open_clip:{clip_files['folder']}")
    x = torch.randn(2, *enc.input_size)
    with torch.inference_mode():
        fmap = enc.spatial(x)
        enc.net.output_tokens = True
        try:
            _, tokens = enc.net(x)  # open_clip's own patch tokens after ln_post
        finally:
            enc.net.output_tokens = False
    assert fmap.shape == (2, 32, 4, 4) and enc.spatial_dim == 32
    np.testing.assert_allclose(fmap.flatten(2).transpose(1, 2).numpy(), tokens.numpy(), rtol=1e-5, atol=1e-6)


def test_open_clip_refusals(clip_files, tmp_path):
    with pytest.raises(MavlError, match="no open_clip_config.json"):
        build_image_encoder(f"open_clip:{tmp_path}")
    with pytest.raises(MavlError, match="unknown open_clip model"):
        build_image_encoder("open_clip:No-Such-Net")
    with pytest.raises(MavlError, match="HF_HUB_OFFLINE"):
        build_image_encoder("open_clip:hf-hub:someone/not-cached-clip")
    with pytest.raises(MavlError, match="weights do not fit"):
        build_image_encoder("open_clip:ViT-B-32", weights=str(clip_files["pt"]))


# ----------------------------------------------------------------------------- xrv (torchxrayvision)

TINY_DENSENET = {"growth_rate": 8, "block_config": [2, 2], "num_init_features": 16}


@pytest.fixture(scope="module")
def xrv_weights(tmp_path_factory):
    """State dicts as torchxrayvision users save them: a tiny DenseNet (the DenseNet-121 code path with
    fewer layers) and a ResNet-50 in the layout of xrv's own file (the inner torchvision model's state dict)."""
    import torch
    import torchxrayvision as xrv

    from mavl_cli.encoders.xrv import _bare

    root = tmp_path_factory.mktemp("xrv")
    torch.manual_seed(0)
    tiny = xrv.models.DenseNet(num_classes=18, **{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_DENSENET.items()})
    torch.save(tiny.state_dict(), root / "tiny.pt")
    torch.save(_bare("resnet50-res512-all", {}, None).model.state_dict(), root / "resnet50.pt")  # xrv's own file layout
    return root


def _xrv_reference(arr: np.ndarray, resolution: int) -> np.ndarray:
    """torchxrayvision's README pipeline on an 8-bit image array."""
    import torchxrayvision as xrv

    img = xrv.datasets.normalize(arr, 255)
    if img.ndim == 3:
        img = img.mean(2)
    img = img[None, ...]
    img = xrv.datasets.XRayCenterCrop()(img)
    return xrv.datasets.XRayResizer(resolution)(img)


@pytest.mark.parametrize("arch", ["tiny", "resnet50"])
def test_xrv_matches_torchxrayvision_transforms(xrv_weights, images, arch):
    """mavl vs torchxrayvision's own transforms (normalize, XRayCenterCrop, XRayResizer) and features."""
    import skimage.io
    import torch
    import torchxrayvision as xrv

    name = "resnet50-res512-all" if arch == "resnet50" else "densenet121-res224-all"
    opts = TINY_DENSENET if arch == "tiny" else {}
    enc = build_image_encoder(f"xrv:{name}", weights=str(xrv_weights / f"{arch}.pt"), options=opts)
    assert enc.input_size == ((1, 512, 512) if arch == "resnet50" else (1, 224, 224))
    if arch == "resnet50":
        ref = xrv.models.ResNet.__new__(xrv.models.ResNet)
        from mavl_cli.encoders.xrv import _bare

        ref = _bare(name, {}, None)
        ref.model.load_state_dict(torch.load(xrv_weights / "resnet50.pt", weights_only=True))
    else:
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
        ref = xrv.models.DenseNet(num_classes=18, **kw)
        ref.load_state_dict(torch.load(xrv_weights / f"{arch}.pt", weights_only=True))
    ref.eval()

    def ref_feats(arrs):
        x = torch.from_numpy(np.stack([_xrv_reference(a, enc.input_size[1]) for a in arrs]))
        with torch.inference_mode():
            return (ref.features(x) if arch == "resnet50" else ref.features2(x)).numpy()

    dec = decoded(images)
    cases = list(images) if arch == "tiny" else ["dicom_m1"]  # ResNet-50 at 512 px is slow on CPU: one case
    for case in cases:
        cos, diff = compare(mavl_features(enc, [dec[case]]), ref_feats([np.asarray(dec[case])]))
        report("xrv", f"{arch} {case} (decoded)", cos, diff)
        assert cos >= COS and diff < 1e-3 * max(1.0, float(np.abs(ref_feats([np.asarray(dec[case])])).max()))
    for case in ("png8", "jpeg_large") if arch == "tiny" else ():
        cos, diff = compare(mavl_file_features(enc, [images[case]]), ref_feats([skimage.io.imread(images[case])]))
        report("xrv", f"{arch} {case} (file)", cos, diff)
        assert cos >= (COS if case == "png8" else COS_LARGE_FILE)


def test_xrv_preprocessing_range_and_spatial(xrv_weights, images):
    import torch

    from mavl_cli.encoders.preprocess import preprocess_images

    enc = build_image_encoder("xrv:densenet121-res224-all", weights=str(xrv_weights / "tiny.pt"), options=TINY_DENSENET)
    x = preprocess_images([decoded(images)["png8"]], enc.preprocessing)
    assert x.shape == (1, 1, 224, 224) and -1024 <= float(x.min()) < -500 and 500 < float(x.max()) <= 1024
    with torch.inference_mode():
        fmap = enc.spatial(x)
        assert fmap.shape[:2] == (1, enc.dim) and fmap.shape[2:] == (28, 28)  # /4 stem, /2 transition
        np.testing.assert_allclose(enc(x).numpy(), enc.net.features2(x).numpy(), rtol=1e-5, atol=1e-5)


def test_xrv_refusals(xrv_weights):
    with pytest.raises(MavlError, match="unknown torchxrayvision model"):
        build_image_encoder("xrv:densenet999")
    with pytest.raises(MavlError, match="weights do not fit"):
        build_image_encoder("xrv:densenet121-res224-all", weights=str(xrv_weights / "tiny.pt"))
    with pytest.raises(MavlError, match="not downloaded|cannot get its weights"):
        build_image_encoder("xrv:densenet121-res224-nih")


# ----------------------------------------------------------------------------- text families

TEXTS = ["Cardiomegaly", "the heart is enlarged with a cardiothoracic ratio above one half",
         "fluid in the pleural space blunting the costophrenic angle"]


@pytest.fixture(scope="module")
def st_folders(tmp_path_factory, tiny_bert):
    """sentence-transformers folders saved by sentence-transformers itself: mean+Normalize, cls+Dense."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    root = tmp_path_factory.mktemp("st")
    torch.manual_seed(0)
    out = {}
    word = models.Transformer(str(tiny_bert), max_seq_length=12)
    SentenceTransformer(modules=[word, models.Pooling(32, "mean"), models.Normalize()]).save(str(root / "mean_norm"))
    out["mean_norm"] = root / "mean_norm"
    word = models.Transformer(str(tiny_bert), max_seq_length=64)
    dense = models.Dense(64, 8, activation_function=torch.nn.Tanh())
    SentenceTransformer(modules=[word, models.Pooling(32, pooling_mode_cls_token=True, pooling_mode_mean_tokens=True,
                                                    pooling_mode_max_tokens=False), dense]).save(str(root / "cls_dense"))
    out["cls_dense"] = root / "cls_dense"
    return out


@pytest.mark.parametrize("kind", ["mean_norm", "cls_dense"])
def test_sentence_transformers_folder_matches_its_library(st_folders, kind):
    from sentence_transformers import SentenceTransformer

    from mavl_cli.encoders.text import load_text

    folder = st_folders[kind]
    ref = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    enc = load_text(str(folder))
    got = enc.encode(TEXTS)
    cos, diff = compare(got.vectors, ref)
    report("text", f"sentence-transformers {kind}", cos, diff)
    assert cos >= COS and diff < 1e-5
    if kind == "mean_norm":
        np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)
        assert any(t["kept"] == 12 for t in got.truncated)  # its max_seq_length, reported


def test_hf_text_and_remote_code_refusal(tiny_bert, tmp_path):
    import json
    import shutil

    import torch
    from transformers import AutoModel, AutoTokenizer

    from mavl_cli.encoders.text import load_text

    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = ((hidden * m).sum(1) / m.sum(1)).numpy()
    for spec in (str(tiny_bert), f"hf:{tiny_bert}"):
        got = load_text(spec).encode(TEXTS).vectors
        cos, diff = compare(got, ref)
        assert cos >= COS and diff < 1e-5
    remote = tmp_path / "remote"
    shutil.copytree(tiny_bert, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_x.XModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MavlError, match="--trust-remote-code"):
        load_text(str(remote))
    with pytest.raises(MavlError, match="image encoders only"):
        load_text("xrv:densenet121-res224-all")


def test_open_clip_text_spec(clip_files):
    import open_clip
    import torch

    from mavl_cli.encoders.text import load_text

    enc = load_text(f"open_clip:{clip_files['folder']}")
    ref, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_files['folder']}")
    tok = open_clip.get_tokenizer(f"local-dir:{clip_files['folder']}")
    with torch.inference_mode():
        theirs = ref.eval().encode_text(tok(TEXTS)).numpy()
    got = enc.encode(TEXTS)
    cos, diff = compare(got.vectors, theirs)
    report("text", "open_clip text tower (spec)", cos, diff)
    assert cos >= COS and diff < 1e-5
    long = enc.encode([" ".join(TEXTS * 3)])  # longer than context_length 24: reported, not hidden
    assert long.truncated and long.truncated[0]["kept"] == 24 and long.truncated[0]["tokens"] > 24
