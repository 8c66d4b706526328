"""Heatmaps for every encoder family with a spatial map (hf, open_clip, xrv), on tiny models.

- Geometry: each family declares how an image maps into its input (resize rule, crop box) from
  its own preprocessing recipe; checked against the family library's own transform by pushing
  coordinate ramps through it, and by a bright spot on non-square films (PNG and DICOM) whose
  peak must come back to its pixel.
- Adapters: the Grad-CAM pass's pooled features are the encoder's own; similarity's per-location
  features are the library's own tokens/maps taken into the pooled space; class-token Grad-CAM
  equals the gradient through the whole network.
- The CLI: `mavl predict --heatmap` with each method on each family writes overlays and a maps
  file that `mavl info` reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import run_cli
from tests.encoder_files import write_dicom
from tests.heatmap_families import (
    FAMILY_CASES,
    LABELS,
    encoder_spec,
    map_model,
    model_file,
    spot_image,
)
from PIL import Image

from mavl_cli.core.errors import MavlError
from mavl_cli.encoders.preprocess import input_geometry
from mavl_cli.explain.maps import peak, to_original
from mavl_cli.io.mavlfile import read_file

SHAPES = [(200, 150), (150, 201)]  # landscape and portrait: the crop matters; <= 256 px so ramps are exact in 8 bits


def _ramps(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.tile(np.arange(w, dtype=np.uint8), (h, 1)), np.tile(np.arange(h, dtype=np.uint8)[:, None], (1, w)))


def _assert_geometry(g, got_x: np.ndarray, got_y: np.ndarray, border: int = 2) -> None:
    """Each input pixel's source position, as the geometry predicts it, equals what the library's transform
    put there (a linear ramp survives any resampling filter away from the borders; 8-bit rounding: 0.5)."""
    oh, ow = got_x.shape
    jj, ii = np.mgrid[0:oh, 0:ow]
    px = (ii + 0.5 + g.left) * g.orig_w / g.resized_w - 0.5
    py = (jj + 0.5 + g.top) * g.orig_h / g.resized_h - 0.5
    step = max(1.0, g.orig_w / g.resized_w)
    keep = (px > 2 * step) & (px < g.orig_w - 1 - 2 * step) & (py > 2 * step) & (py < g.orig_h - 1 - 2 * step)
    keep[:border], keep[-border:], keep[:, :border], keep[:, -border:] = False, False, False, False
    assert keep.mean() > 0.3, g
    err = max(np.abs(px - got_x)[keep].max(), np.abs(py - got_y)[keep].max())
    assert err <= 0.75, (g.rule, err)  # one input pixel off would be >= 4 source pixels here


# ----------------------------------------------------------------------------- geometry vs the libraries


def _hf_processors():
    import transformers as T

    return {
        "bit-dinov2": T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}),
        "bit-pil": T.BitImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 28, "width": 24}),
        "vit-squash": T.ViTImageProcessor(size={"height": 32, "width": 40}),
        "convnext-crop_pct": T.ConvNextImageProcessor(size={"shortest_edge": 48}, crop_pct=0.875),
        "convnext-large": T.ConvNextImageProcessor(size={"shortest_edge": 384}),
        "bit-crop-larger": T.BitImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 28, "width": 28}),
    }


@pytest.mark.parametrize("name", ["bit-dinov2", "bit-pil", "vit-squash", "convnext-crop_pct", "convnext-large",
                                  "bit-crop-larger"])
def test_hf_geometry_is_what_the_image_processor_does(name: str) -> None:
    from mavl_cli.encoders.hf import processor_record

    proc = _hf_processors()[name]
    cfg = processor_record(proc)
    mean, std = np.array(proc.image_mean)[:, None, None], np.array(proc.image_std)[:, None, None]
    for w, h in SHAPES:
        x, y = _ramps(w, h)
        out = proc(images=Image.fromarray(np.stack([x, y, x], -1)), return_tensors="np")["pixel_values"][0]
        v = (out * std + mean) * 255.0
        g = input_geometry(cfg, (w, h))
        assert (g.crop_h, g.crop_w) == out.shape[1:]
        _assert_geometry(g, v[0], v[1])  # padded parts (bit-crop-larger) predict no source pixel: left out
        if name == "bit-crop-larger":
            assert min(g.left, g.top) < 0


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [32, [40, 32]], ids=["square", "portrait-input"])
def test_open_clip_geometry_is_what_its_preprocess_does(mode: str, size) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pc = {"size": size, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "resize_mode": mode, "fill_color": 0}
    tf = image_transform_v2(PreprocessCfg(**{k: tuple(v) if isinstance(v, list) else v for k, v in pc.items()}), is_train=False)
    th, tw = (size, size) if isinstance(size, int) else size
    cfg = {"kind": "open_clip", "preprocess_cfg": pc, "input_size": [3, th, tw]}
    for w, h in SHAPES:
        x, y = _ramps(w, h)
        out = tf(Image.fromarray(np.stack([x, y, x], -1))).numpy()
        g = input_geometry(cfg, (w, h))
        v = (out * 0.25 + 0.5) * 255.0
        _assert_geometry(g, v[0], v[1])  # longest: the padding predicts no source pixel, left out


def test_xrv_geometry_is_what_its_transforms_do() -> None:
    import torchxrayvision as xrv

    cfg = {"kind": "xrv", "resolution": 64, "maxval": 255, "engine": "skimage", "input_size": [1, 64, 64]}

    def run(a):
        a = xrv.datasets.normalize(a.astype(np.float32), 255)[None]
        return (xrv.datasets.XRayResizer(64)(xrv.datasets.XRayCenterCrop()(a))[0] + 1024) * 255 / 2048

    for w, h in SHAPES:
        x, y = _ramps(w, h)
        _assert_geometry(input_geometry(cfg, (w, h)), run(x), run(y))


def test_a_processor_mavl_cannot_follow_is_one_clear_line() -> None:
    import transformers as T

    from mavl_cli.encoders.hf import processor_record

    cfg = processor_record(T.ViTImageProcessor(size={"height": 32, "width": 32}))
    cfg["processor_class"] = "DonutImageProcessor"  # its own resize (thumbnail + pad)
    cfg["processor"] = {**cfg["processor"], "do_thumbnail": True, "do_pad": True, "size": {"height": 32, "width": 32}}
    with pytest.raises(MavlError, match="cannot map back through the image processor DonutImageProcessor"):
        input_geometry(cfg, (200, 150))


# ----------------------------------------------------------------------------- bright spot, each family


def _preprocessing(case: str) -> dict:
    import transformers as T

    from mavl_cli.encoders.hf import processor_record

    if case == "hf-dinov2":
        return processor_record(T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}))
    if case == "hf-convnext":
        return processor_record(T.ConvNextImageProcessor(size={"shortest_edge": 48}, crop_pct=0.875))
    if case == "hf-vit":
        return processor_record(T.ViTImageProcessor(size={"height": 32, "width": 32}))
    if case == "open_clip-vit":
        return {"kind": "open_clip", "input_size": [3, 32, 32], "preprocess_cfg": {
            "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}}
    return {"kind": "xrv", "resolution": 64, "maxval": 255, "engine": "skimage", "input_size": [1, 64, 64]}


@pytest.mark.parametrize("case, fmt", [("hf-dinov2", "png"), ("hf-dinov2", "dicom-mono1"), ("hf-convnext", "png"),
                                       ("hf-vit", "png"), ("open_clip-vit", "png"), ("xrv", "png"), ("xrv", "dicom-mono1"),
                                       ("xrv", "dicom-mono2")])
@pytest.mark.parametrize("shape", [(240, 160, 165, 60), (160, 250, 60, 170)], ids=["landscape", "portrait"])
def test_bright_spot_peak_lands_on_its_pixel_after_the_familys_resize_and_crop(tmp_path: Path, case: str, fmt: str,
                                                                              shape: tuple) -> None:
    """The family's own prepared input, taken as a map and mapped back, peaks where the spot is on the film."""
    from mavl_cli.explain.heatmaps import image_input

    w, h, x0, y0 = shape
    if fmt == "png":
        path = tmp_path / "spot.png"
        Image.fromarray(spot_image(w, h, x0, y0, 0.05 * min(w, h))).save(path)
    else:  # MONOCHROME1 stores the spot dark; displayed (and fed to the model) bright
        mono1 = fmt == "dicom-mono1"
        arr = spot_image(w, h, x0, y0, 0.05 * min(w, h), dark=mono1).astype(np.uint16) * 16
        path = write_dicom(tmp_path / "spot.dcm", arr, "MONOCHROME1" if mono1 else "MONOCHROME2")
    cfg = _preprocessing(case)
    film, crop, geom = image_input(path, cfg)
    assert film.size == (w, h) and crop.shape[1:] == tuple(cfg["input_size"][1:])
    maps = to_original(crop[:1].astype(np.float32), geom)
    assert maps.shape == (1, h, w)
    px, py = peak(maps[0])
    tol = 1.0 + min(w, h) / min(cfg["input_size"][1:])  # one input pixel, in original pixels
    assert abs(px - x0) <= tol and abs(py - y0) <= tol, ((px, py), (x0, y0), tol, geom.rule)


# ----------------------------------------------------------------------------- adapters on tiny models


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hm_families")
    out = {case: model_file(case, root) for case in FAMILY_CASES}
    film = root / "film.png"  # a textured film (lungs, ribs, noise) with a bright spot: no model sees a flat input
    from tests.encoder_files import film as textured

    arr = 0.6 * textured(90, 120, 5) * 255 + 0.4 * spot_image(120, 90, 80, 30, 6)
    Image.fromarray(arr.round().clip(0, 255).astype(np.uint8)).save(film)
    out["film"] = film
    return out


_MM: dict = {}


def _mm(fam: dict, case: str):
    if case not in _MM:
        _MM[case] = map_model(fam[case])
    return _MM[case]


def _x(mm, path: Path):
    from mavl_cli.encoders.preprocess import normalize_batch, stack_batch
    from mavl_cli.explain.heatmaps import image_input

    return normalize_batch(stack_batch([image_input(path, mm.data_config)[1]]), mm.data_config).contiguous()


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_gradcam_pass_pools_to_the_encoders_own_features(fam: dict, case: str) -> None:
    """The logit Grad-CAM differentiates is the model's own: the pass's pooled features equal forward's."""
    import torch

    model, enc, mm = _mm(fam, case)
    x = _x(mm, fam["film"])
    sp = mm.adapter.run(x, grad=True)
    assert sp.pooled.requires_grad
    with torch.no_grad():
        direct = enc(x)
    np.testing.assert_allclose(sp.pooled.detach().numpy(), direct.numpy(), rtol=1e-4, atol=1e-5)
    logits = mm.logits(sp.pooled)[0]
    (g,) = torch.autograd.grad(logits[1], sp.act)
    assert float(g.abs().sum()) > 0  # the logit reaches the activation
    cams = mm.maps(x, "gradcam", [0, 1, 2])
    assert cams.shape[0] == 3 and cams.min() >= 0 and np.isfinite(cams).all()


def _library_locations(case: str, enc, x):
    """Per-location features in the pooled space, from the family library's own outputs."""
    import torch

    net = enc.net
    with torch.no_grad():
        if case.startswith("timm"):  # timm's own forward_features: ViT tokens after the final norm, or the CNN map
            out = net.forward_features(x)
            if out.ndim == 4:
                return out[0].permute(1, 2, 0)
            tokens = out[0, net.num_prefix_tokens:]
            side = int(round(tokens.shape[0] ** 0.5))
            return tokens.reshape(side, side, -1)
        if case.startswith("hf"):
            hidden = net(pixel_values=x).last_hidden_state
            if hidden.ndim == 4:  # ConvNeXt: the pooler's layer norm, per location
                loc = hidden[0].permute(1, 2, 0)
                return net.layernorm(loc) if case == "hf-convnext" else loc
            prefix = {"hf-dinov2": 1, "hf-dinov2_registers": 5, "hf-vit": 1, "hf-swin": 0}[case]  # CLS (+ 4 registers)
            n = hidden.shape[1] - prefix
            side = int(round(n ** 0.5))
            return hidden[0, prefix:].reshape(side, side, -1)
        if case == "open_clip-vit":
            net.output_tokens = True
            try:
                _, tokens = net(x)  # open_clip's own patch tokens after ln_post
            finally:
                net.output_tokens = False
            side = int(round(tokens.shape[1] ** 0.5))
            return (tokens[0] @ net.proj).reshape(side, side, -1)
        if case == "open_clip-timm":  # timm's own final tokens (trunk.forward_features: after its norm), then the head
            tokens = net.trunk.forward_features(x)[:, net.trunk.num_prefix_tokens:]
            side = int(round(tokens.shape[1] ** 0.5))
            return net.head(tokens[0]).reshape(side, side, -1)
        if case == "open_clip-resnet":  # each location alone through the attention pool's value path
            m = net.forward_intermediates(x, indices=1, intermediates_only=True)["image_intermediates"][-1]
            ap = net.attnpool
            t = m[0].flatten(1).T + ap.positional_embedding[1:]
            v = t @ ap.v_proj.weight.T + ap.v_proj.bias
            out = v @ ap.c_proj.weight.T + ap.c_proj.bias
            return out.reshape(m.shape[2], m.shape[3], -1)
        return torch.relu(net.features(x))[0].permute(1, 2, 0)  # xrv: what features2 pools


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_similarity_uses_the_librarys_own_locations(fam: dict, case: str) -> None:
    import torch

    model, enc, mm = _mm(fam, case)
    x = _x(mm, fam["film"])
    sp = mm.adapter.run(x, grad=False)
    want = _library_locations(case, enc, x)
    np.testing.assert_allclose(sp.local.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    got = mm.maps(x, "similarity", [0, 1, 2])
    h, w, d = want.shape
    with torch.no_grad():
        ref = mm.fusion.similarity(mm.embed(want.reshape(h * w, d)), mm.text, mm.mask).T.reshape(-1, h, w)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)
    assert np.ptp(got) > 0


CLASS_TOKEN_CASES = ("hf-dinov2", "hf-dinov2_registers", "hf-vit", "open_clip-vit", "open_clip-timm", "timm-vit_cls")


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_every_method_runs_on_every_family(fam: dict, case: str) -> None:
    """Each `--heatmap-method` gives a finite map per finding on the family's grid (or a finer one), or, for
    HiResCAM on a class-token ViT, its one line."""
    import torch

    from mavl_cli.explain.heatmaps import needs_grad
    from mavl_cli.io.mavlfile import MAP_METHODS

    model, enc, mm = _mm(fam, case)
    x = _x(mm, fam["film"])
    with torch.no_grad():
        grid = enc.spatial(x).shape[2:]
    for method in MAP_METHODS:
        with torch.enable_grad() if needs_grad(method) else torch.no_grad():
            try:
                m = mm.maps(x, method, [0, 2])
            except MavlError as exc:  # class-token ViTs: gradient x activation cancels (own test below)
                assert "hirescam" in method and case in CLASS_TOKEN_CASES and "HiResCAM is zero" in str(exc), (method, exc)
                continue
        assert m.shape[0] == 2 and m.shape[1] >= grid[0] and m.shape[2] >= grid[1] and np.isfinite(m).all(), method


@pytest.mark.parametrize("case", CLASS_TOKEN_CASES)
def test_class_token_gradcam_equals_the_gradient_through_the_whole_network(fam: dict, case: str) -> None:
    import torch

    model, enc, mm = _mm(fam, case)
    x = _x(mm, fam["film"])
    got = mm.maps(x, "gradcam", [0, 1, 2])
    held = {}
    block = enc.cam_block()
    assert block is not None

    def grab(_mod, args):
        args[0].retain_grad()
        held["x"] = args[0]

    xx = x.clone().requires_grad_(True)
    hook = block.register_forward_pre_hook(grab)
    try:
        logits = mm.logits(enc(xx))[0]
    finally:
        hook.remove()
    act = held["x"][0]
    n = act.shape[0]
    gh, gw = got.shape[1:]
    prefix = n - gh * gw
    for j in range(3):
        (grad,) = torch.autograd.grad(logits[j], held["x"], retain_graph=True)
        wgt = grad[0, prefix:].mean(0)
        want = torch.relu((act[prefix:].detach() * wgt).sum(-1)).reshape(gh, gw).numpy()
        np.testing.assert_allclose(got[j], want, rtol=1e-4, atol=1e-7)
    assert np.abs(got).sum() > 0


def test_open_clip_tower_without_a_map_gives_one_clear_line(tmp_path: Path) -> None:
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    from mavl_cli.encoders import build_image_encoder
    from mavl_cli.explain.heatmaps import EncoderAdapter

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
                                           "attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    folder = tmp_path / "coca-like"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in CLIP(**cfg).state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    enc = build_image_encoder(f"open_clip:{folder}")
    for grad in (False, True):
        with pytest.raises(MavlError, match="gives no spatial feature map mavl can read"):
            EncoderAdapter(enc).run(torch.zeros(1, 3, 32, 32), grad=grad)


# ----------------------------------------------------------------------------- the CLI, each family and method


@pytest.mark.parametrize("method", ["similarity", "gradcam"])
@pytest.mark.parametrize("case", ["hf-dinov2", "hf-convnext", "hf-swin", "open_clip-vit", "open_clip-resnet", "open_clip-timm",
                                  "xrv-densenet", "timm-vit_cls"])
def test_predict_heatmap_on_each_family(fam: dict, tmp_path: Path, case: str, method: str) -> None:
    out = tmp_path / "maps"
    film = fam["film"]
    r = run_cli(["predict", film, "--model", fam[case], "--heatmap", out, "--heatmap-labels", "all",
                 "--heatmap-method", method, "--json"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)["images"][0]
    f = read_file(out / "film.maps.safetensors", expect="maps")
    w, h = Image.open(film).size
    assert f.tensors["maps"].shape == (3, h, w) and f.labels() == LABELS and f.meta["method"] == method
    assert f.meta["geometry"]["rule"].startswith(case.split("-")[0])
    for k, lab in enumerate(LABELS):
        ov = Image.open(out / f"film.{lab.replace(' ', '_')}.png")
        assert ov.size == (w, h) and ov.mode == "RGB"
        x, y = peak(f.tensors["maps"][k])
        item = next(i for i in rec["findings"] if i["label"] == lab)
        assert item["peak"] == {"x": x, "y": y}
    info = run_cli(["info", out / "film.maps.safetensors"])
    assert info.exit_code == 0 and f"[3, {h}, {w}] float32" in info.stdout and method in info.stdout


# ----------------------------------------------------------------------------- zero-shot models


@pytest.fixture(scope="module")
def zero_shot(fam: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hm_zeroshot")
    desc = root / "labels.txt"
    desc.write_text("\n".join(LABELS) + "\n")
    spec = encoder_spec("open_clip-vit", fam["open_clip-vit"].parent)[0]
    out = root / "zs.safetensors"
    r = run_cli(["zero-shot", "--encoder", spec, "--descriptions", desc, "-o", out])
    assert r.exit_code == 0, r.stderr
    return out


def test_zero_shot_similarity_is_each_tokens_zero_shot_score(zero_shot: Path, fam: dict) -> None:
    """Each patch token through the tower's own projection, scored against the label's prompts as the zero-shot
    head scores the image: cos(token, positive prompts) - cos(token, negative prompt)."""
    import torch

    from mavl_cli.explain.heatmaps import ZeroShotMapModel

    model, enc, mm = map_model(zero_shot)
    assert isinstance(mm, ZeroShotMapModel)
    x = _x(mm, fam["film"])
    net = enc.net
    with torch.no_grad():
        net.output_tokens = True
        try:
            pooled, tokens = net(x)
        finally:
            net.output_tokens = False
    t = model.file.tensors
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    loc = unit((tokens[0] @ net.proj).numpy().astype(np.float64))  # [hw, D]
    pos, mask, neg = unit(t["text.embeddings"].astype(np.float64)), t["text.mask"].astype(bool), unit(t["zeroshot.negative"])
    cos = np.einsum("nd,lad->lan", loc, pos)
    want = (cos * mask[..., None]).sum(1) / mask.sum(1, keepdims=True) - np.einsum("nd,ld->ln", loc, neg)
    got = mm.maps(x, "similarity", [0, 1, 2])
    np.testing.assert_allclose(got.reshape(3, -1), want, rtol=1e-4, atol=1e-5)
    # the pooled image embedding through the same head gives predict's logits
    with torch.no_grad():
        np.testing.assert_allclose(mm.logits(pooled).numpy(), mm.logits(enc(x)).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["similarity", "gradcam"])
def test_predict_heatmap_on_a_zero_shot_model(zero_shot: Path, fam: dict, tmp_path: Path, method: str) -> None:
    out = tmp_path / "maps"
    r = run_cli(["predict", fam["film"], "--model", zero_shot, "--heatmap", out, "--heatmap-labels", "all",
                 "--heatmap-method", method, "--json"])
    assert r.exit_code == 0, r.stderr
    f = read_file(out / "film.maps.safetensors", expect="maps")
    assert f.tensors["maps"].shape == (3, 90, 120) and f.meta["aggregate"] == "zero-shot pair"
    assert np.ptp(f.tensors["maps"]) > 0
    info = run_cli(["info", out / "film.maps.safetensors"])
    assert info.exit_code == 0 and "[3, 90, 120] float32" in info.stdout


# ----------------------------------------------------------------------------- HiResCAM on every family


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_hirescam_and_its_product_with_similarity_on_each_family(fam: dict, case: str) -> None:
    """A family without a timm stage gets HiResCAM on its Grad-CAM activation (ReLU of the channel sum of
    gradient x activation) and similarity-hirescam the product of the two [0, 1]-scaled maps; where that
    activation reaches the logit only through a LayerNorm (class-token ViTs) the sum cancels at every
    token, checked by hand here, and the method gives one line instead."""
    import torch

    _, _, mm = _mm(fam, case)
    x = _x(mm, fam["film"])
    sp = mm.adapter.run(x, grad=True)
    logits = mm.logits(sp.pooled)[0]
    act = sp.cam_grid(sp.act).detach()
    want, net, gross = [], 0.0, 0.0
    for j in (0, 2):
        (g,) = torch.autograd.grad(logits[j], sp.act, retain_graph=True)
        terms = sp.cam_grid(g) * act
        net, gross = net + float(terms.sum(-1).abs().sum()), gross + float(terms.abs().sum())
        want.append(torch.relu(terms.sum(-1)).numpy())
    if net < 1e-4 * gross:
        for method in ("hirescam", "similarity-hirescam"):
            with pytest.raises(MavlError, match="HiResCAM is zero at every location"):
                mm.maps(x, method, [0, 2])
        return
    hi = mm.maps(x, "hirescam", [0, 2])
    np.testing.assert_allclose(hi, np.stack(want), rtol=1e-4, atol=1e-6)
    both = mm.maps(x, "similarity-hirescam", [0, 2])
    assert both.shape == hi.shape and np.isfinite(both).all() and both.min() >= 0 and both.max() <= 1 + 1e-6
    assert (both[hi == 0] == 0).all()


def test_hirescam_on_a_zero_shot_vit_is_one_clear_line(zero_shot: Path, fam: dict, tmp_path: Path) -> None:
    """The zero-shot tower is an open_clip ViT (class token): HiResCAM cancels; predict says so, writes nothing."""
    out = tmp_path / "maps"
    r = run_cli(["predict", fam["film"], "--model", zero_shot, "--heatmap", out, "--heatmap-labels", "all",
                 "--heatmap-method", "hirescam"])
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and "HiResCAM is zero at every location" in r.stderr
    assert not list(out.glob("*.maps.safetensors"))
