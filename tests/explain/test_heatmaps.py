"""Explanation maps: coordinates back to the original film, both methods on each spatial family, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import run_cli
from tests.encoder_files import write_dicom
from PIL import Image

from mavl_cli.encoders.geometry import CropGeometry
from mavl_cli.explain.maps import crop_geometry, peak, to_original
from mavl_cli.io.mavlfile import read_file

LABELS = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax"]
DC_224 = {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.875}
DC_32 = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.9}


def _spot(w: int, h: int, x0: int, y0: int, sigma: float, dark: bool = False) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    g = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
    img = 40 + 180 * g
    return (255 - img if dark else img).astype(np.uint8)


def _write_dicom(path: Path, arr8: np.ndarray, photometric: str) -> Path:
    """12-bit stored values (8-bit x 16) with a full-range window."""
    import pydicom

    write_dicom(path, arr8.astype(np.uint16) * 16, photometric, 12, WindowCenter=2048, WindowWidth=4096)
    assert pydicom.dcmread(path).PhotometricInterpretation == photometric
    return path


@pytest.mark.parametrize("fmt", ["png", "dicom-mono2", "dicom-mono1"])
@pytest.mark.parametrize("dc", [DC_224, DC_32], ids=["224-crop0.875", "32-crop0.9"])
@pytest.mark.parametrize("shape", [(400, 300, 230, 170), (300, 520, 120, 300)], ids=["landscape", "portrait"])
def test_bright_spot_peak_lands_on_its_original_pixel(tmp_path: Path, fmt: str, dc: dict, shape: tuple) -> None:
    """The model's input crop, taken as a map and mapped back, peaks where the spot is on the film."""
    from mavl_cli.explain.heatmaps import image_input

    w, h, x0, y0 = shape
    sigma = 0.04 * min(w, h)
    if fmt == "png":
        path = tmp_path / "spot.png"
        Image.fromarray(_spot(w, h, x0, y0, sigma)).save(path)
    else:  # MONOCHROME1 stores the spot dark; displayed (and fed to the model) inverted, so bright
        mono1 = fmt == "dicom-mono1"
        path = _write_dicom(tmp_path / "spot.dcm", _spot(w, h, x0, y0, sigma, dark=mono1), "MONOCHROME1" if mono1 else "MONOCHROME2")
    film, crop, geom = image_input(path, dc)
    assert film.size == (w, h) and crop.shape == tuple(dc["input_size"][1:])
    fx, fy = peak(np.asarray(film))  # displayed as the user sees it: not flipped, not inverted
    assert abs(fx - x0) <= 2 and abs(fy - y0) <= 2
    maps = to_original(crop.astype(np.float32)[None], geom)
    assert maps.shape == (1, h, w) and maps.dtype == np.float32
    px, py = peak(maps[0])
    tol = 1.0 + min(w, h) / min(dc["input_size"][1:])  # one input pixel, in original pixels
    assert abs(px - x0) <= tol and abs(py - y0) <= tol, ((px, py), (x0, y0), tol)


def test_geometry_matches_the_preprocessing_and_cut_away_pixels_never_peak() -> None:
    g = crop_geometry((400, 300), (400, 300), DC_224)
    assert (g.resized_w, g.resized_h, g.crop_w, g.crop_h) == (341, 256, 224, 224) and (g.left, g.top) == (58, 16)
    assert g.to_crop(199.5, 149.5) == pytest.approx((341 / 2 - 58, 128 - 16))
    from PIL import Image as PILImage

    from mavl_cli.encoders.preprocess import prepare_image

    ramp = PILImage.fromarray(np.tile(np.arange(400) * 255 // 399, (300, 1)).astype(np.uint8))
    crop = prepare_image(ramp, DC_224).astype(float)  # the real preprocessing agrees on where column 112 came from
    src = (112 + 0.5 + g.left) * 400 / g.resized_w - 0.5
    assert crop[112, 112] == pytest.approx(src * 255 / 399, abs=1.5)
    # a map hottest at its left edge: pixels left of the crop take the map's minimum, so the peak stays inside
    grid = np.tile(np.linspace(1.0, 0.0, 7, dtype=np.float32), (7, 1))
    out = to_original(grid, g)
    assert out[0, :, :40].max() == pytest.approx(0.0)
    x, _ = peak(out[0])
    assert g.to_crop(x, 0)[0] >= 0.0 and x < 80
    same = CropGeometry(8, 8, 8, 8, 0, 0, 8, 8)
    m = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(to_original(m, same), m, rtol=1e-6)  # no resize, no crop: the map itself


# ------------------------------------------------------------------ tiny models of each spatial family


def _backbone(kind: str, tmp: Path) -> tuple[str, Path, dict]:
    import timm
    import torch

    from mavl_cli.encoders.timm import save_local_backbone

    torch.manual_seed(0)
    if kind == "vit":
        name, args = "vit_tiny_patch16_224", {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}
    elif kind == "vit-avg":
        name, args = "vit_tiny_patch16_224", {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8,
                                              "global_pool": "avg", "fc_norm": True}
    elif kind == "cnn":
        name, args = "resnet10t", {}
    else:  # the demo's image encoder family
        name, args = "tf_efficientnet_lite0", {}
    model = timm.create_model(name, pretrained=False, num_classes=0, **args)
    return name, save_local_backbone(model, name, tmp / kind, args), args


_BACKBONES: dict[str, tuple] = {}


def _model_file(tmp: Path, kind: str, aggregate: str = "mean") -> Path:
    from tests.heatmap_families import write_fused_model

    from mavl_cli.encoders.timm import create_backbone

    if kind not in _BACKBONES:
        name, folder, args = _backbone(kind, tmp)
        _BACKBONES[kind] = (name, folder, args, create_backbone(name, weights=folder, model_args=args)[1])
    name, folder, args, info = _BACKBONES[kind]
    return write_fused_model(tmp / f"{kind}-{aggregate}.model.safetensors", info.dim, name, info.to_meta(), aggregate,
                             extra_meta={"backbone_weights": str(folder)})


_CACHE: dict[Path, tuple] = {}


def _whole(net, mm):
    """The timm network and the map model's head as one module returning logits (what the grad-cam package hooks)."""
    import torch

    class Whole(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, inp):
            return mm.logits(net.forward_head(net.forward_features(inp), pre_logits=True))

    return Whole()


def _map_model(path: Path):
    if path not in _CACHE:
        _CACHE[path] = _build_map_model(path)
    return _CACHE[path]


def _build_map_model(path: Path):
    from mavl_cli.explain.heatmaps import build_map_model
    from mavl_cli.models.mavlmodel import image_encoder
    from mavl_cli.models.modelfile import load_model

    model = load_model(path)
    enc, prep = image_encoder(model.meta)
    return model, enc.net, build_map_model(model, enc, prep)


def _film(tmp: Path, seed: int = 0, size: int = 80) -> Path:
    from mavl_cli.synthetic.phantoms import render_phantom

    arr, _ = render_phantom(np.random.default_rng(seed), {"Cardiomegaly": 0.9, "Pleural Effusion": 0.8}, size)
    p = tmp / f"film{seed}.png"
    Image.fromarray(arr).save(p)
    return p


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hm_models")
    out = {k: _model_file(tmp, k) for k in ("vit", "vit-avg", "cnn", "effnet")}
    out["effnet-max"] = _model_file(tmp, "effnet", "max")
    out["vit-none"] = _model_file(tmp, "vit", "none")
    out["film"] = _film(tmp)
    return out


def _input(mm, path: Path):
    from mavl_cli.encoders.preprocess import normalize_batch, stack_batch
    from mavl_cli.explain.heatmaps import image_input

    _, crop, _ = image_input(path, mm.data_config)
    return normalize_batch(stack_batch([crop]), mm.data_config).contiguous()


@pytest.mark.parametrize("kind", ["vit", "vit-avg", "cnn", "vit-none"])
def test_adapter_pools_to_the_models_own_scores(models: dict, kind: str) -> None:
    """The spatial pass's pooled features give exactly the scores `mavl predict` gives."""
    import torch

    from mavl_cli.core.options import RunOptions
    from mavl_cli.stages.predict import predict_stage

    model, net, mm = _map_model(models[kind])
    x = _input(mm, models["film"])
    sp = mm.adapter.run(x, grad=True)
    with torch.no_grad():
        ours = torch.sigmoid(mm.logits(sp.pooled))[0].numpy()
        direct = net(x)[0]
    np.testing.assert_allclose(sp.pooled[0].detach().numpy(), direct.numpy(), rtol=1e-4, atol=1e-5)
    pred, _ = predict_stage([str(models["film"])], str(models[kind]), run=RunOptions(device="cpu"))
    np.testing.assert_allclose(ours, pred.scores[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "cnn", "effnet-max", "vit-none"])
def test_similarity_map_is_each_locations_aggregated_aspect_cosine(models: dict, kind: str) -> None:
    """Recomputed by hand from the backbone's own feature map, the head and projector weights, with numpy."""
    import torch

    model, net, mm = _map_model(models[kind])
    x = _input(mm, models["film"])
    if "vit" not in kind:
        x = x[:, :, 48:176, 48:176]
    with torch.no_grad():
        feats = net.forward_features(x)
    if feats.ndim == 3:  # ViT: drop the class token, reshape to the patch grid
        g = int(round((feats.shape[1] - net.num_prefix_tokens) ** 0.5))
        loc = feats[0, net.num_prefix_tokens:].reshape(g, g, -1).numpy()
    else:
        loc = feats[0].permute(1, 2, 0).numpy()
    t = {k: v for k, v in model.file.tensors.items()}
    v = loc.astype(np.float64)
    v = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5) * t["lrf.norm.weight"] + t["lrf.norm.bias"]
    z = np.maximum(v @ t["lrf.proj.weight"].T, 0.0)

    def mlp(a, p):
        h = a @ t[f"fusion.{p}.0.weight"].T + t[f"fusion.{p}.0.bias"]
        h = 0.5 * h * (1 + np.vectorize(__import__("math").erf)(h / np.sqrt(2)))
        return h @ t[f"fusion.{p}.2.weight"].T + t[f"fusion.{p}.2.bias"]

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    mask = t["text.mask"].astype(bool)
    agg = model.meta["fusion"]["aggregate"]
    img = unit(mlp(z, "img_proj"))  # [h, w, d]
    if agg == "none":
        txt = (t["text.embeddings"] * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        want = np.einsum("hwd,ld->lhw", img, unit(mlp(txt, "txt_proj")))
    else:
        cos = np.einsum("hwd,lad->lahw", img, unit(mlp(t["text.embeddings"].astype(np.float64), "txt_proj")))
        m4 = mask[:, :, None, None]
        want = np.where(m4, cos, -np.inf).max(1) if agg == "max" else (cos * m4).sum(1) / m4.sum(1)
    got = mm.maps(x, "similarity", [0, 1, 2])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_gradcam_matches_the_grad_cam_package_on_a_cnn(models: dict) -> None:
    """Where the `grad-cam` package applies cleanly (a CNN's last map), it gives the same map."""
    import cv2
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, net, mm = _map_model(models["effnet"])
    x = _input(mm, models["film"])[:, :, 48:176, 48:176]  # a CNN takes any size; 128 px keeps the test quick


    ours = mm.maps(x, "gradcam", [0, 1, 2])
    requires = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(True)  # the package backpropagates to the input
    def scaled(a):
        a = a - a.min()
        return a / (1e-7 + a.max())

    with GradCAM(model=_whole(net, mm), target_layers=[net.bn2]) as cam:
        for j in (0, 2):
            theirs = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(j)])[0]
            m = scaled(cv2.resize(scaled(ours[j]), (x.shape[3], x.shape[2])))  # the package rescales after resizing
            np.testing.assert_allclose(m, theirs, atol=1e-4)
            assert ours[j].max() > 0
    for p, r in zip(net.parameters(), requires):
        p.requires_grad_(r)


@pytest.mark.parametrize("kind", ["vit", "vit-avg"])
def test_vit_gradcam_equals_the_gradient_through_the_whole_network(models: dict, kind: str) -> None:
    """Re-running only the last block gives the gradient the full forward pass gives."""
    import torch

    model, net, mm = _map_model(models[kind])
    x = _input(mm, models["film"])
    got = mm.maps(x, "gradcam", [0, 2])
    held = {}

    def grab(_mod, args):
        args[0].retain_grad()
        held["x"] = args[0]

    x = x.clone().requires_grad_(True)
    h = net.blocks[-1].register_forward_pre_hook(grab)
    logits = mm.logits(net.forward_head(net.forward_features(x), pre_logits=True))[0]
    h.remove()
    npt, g = net.num_prefix_tokens, 4
    act = held["x"][0, npt:].detach().reshape(g, g, -1)
    for k, j in enumerate([0, 2]):
        (grad,) = torch.autograd.grad(logits[j], held["x"], retain_graph=True)
        w = grad[0, npt:].reshape(g, g, -1).mean((0, 1))
        want = torch.relu((act * w).sum(-1)).numpy()
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-6)
    assert got.shape == (2, 4, 4) and np.abs(got).sum() > 0


@pytest.mark.parametrize("kind, stage", [("effnet", "blocks.4"), ("cnn", "layer3")])
def test_hirescam_matches_the_grad_cam_package_at_the_stride16_stage(models: dict, kind: str, stage: str) -> None:
    """HiResCAM on the last stride-16 stage (timm's feature_info) equals the package's HiResCAM on that layer."""
    import cv2
    from pytorch_grad_cam import HiResCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, net, mm = _map_model(models[kind])
    assert mm.adapter.cam_stage() is net.get_submodule(stage)
    x = _input(mm, models["film"])[:, :, 48:176, 48:176]  # 128 px: an 8x8 stride-16 grid
    ours = mm.maps(x, "hirescam", [0, 1, 2])
    assert ours.shape == (3, 8, 8)


    requires = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(True)

    def scaled(a):
        a = a - a.min()
        return a / (1e-7 + a.max())

    try:
        with HiResCAM(model=_whole(net, mm), target_layers=[net.get_submodule(stage)]) as cam:
            for j in (0, 2):
                theirs = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(j)])[0]
                m = scaled(cv2.resize(scaled(ours[j]), (x.shape[3], x.shape[2])))
                np.testing.assert_allclose(m, theirs, atol=1e-4)
                assert ours[j].max() > 0
    finally:
        for p, r in zip(net.parameters(), requires):
            p.requires_grad_(r)


def test_hirescam_gradient_varies_over_cells_unlike_the_final_maps(models: dict) -> None:
    """Under average pooling the final map's gradient is the same in every cell (HiResCAM there = Grad-CAM);
    at the stride-16 stage it is not, which is what makes the finer map more than an upsampled Grad-CAM.
    The stage pass (a leaf swapped in by a hook) gives the very logits of the plain pass."""
    import torch

    _, _, mm = _map_model(models["effnet"])
    x = _input(mm, models["film"])[:, :, 48:176, 48:176]
    sp, st = mm.adapter.run(x, grad=True), mm.adapter.run_stage(x)
    np.testing.assert_allclose(mm.logits(st.pooled).detach().numpy(), mm.logits(sp.pooled).detach().numpy(), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(mm.logits(sp.pooled)[0, 0], sp.act)
    (g16,) = torch.autograd.grad(mm.logits(st.pooled)[0, 0], st.act)
    assert g.shape[-2:] == (4, 4) and g16.shape[-2:] == (8, 8)
    torch.testing.assert_close(g, g[..., :1, :1].expand_as(g))
    assert (g16 - g16[..., :1, :1]).abs().amax() > 1e-3 * g16.abs().amax()


def test_similarity_hirescam_is_the_product_of_the_two_unit_ranged_maps(models: dict) -> None:
    import cv2

    _, _, mm = _map_model(models["effnet"])
    x = _input(mm, models["film"])[:, :, 48:176, 48:176]
    sim = mm.maps(x, "similarity", [0, 2])  # 4x4 at stride 32
    hi = mm.maps(x, "hirescam", [0, 2])  # 8x8 at stride 16
    got = mm.maps(x, "similarity-hirescam", [0, 2])
    assert sim.shape == (2, 4, 4) and got.shape == hi.shape == (2, 8, 8)

    def unit(a):
        return (a - a.min()) / (a.max() - a.min())

    for k in range(2):  # cv2's bilinear resize keeps pixel centres (half-pixel rule), as the maps do
        want = unit(cv2.resize(sim[k].astype(np.float64), (8, 8), interpolation=cv2.INTER_LINEAR)) * unit(hi[k])
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-5)
        assert got[k].max() <= 1.0 + 1e-6 and (got[k][hi[k] == 0] == 0).all()


def test_vit_hirescam_is_gradient_times_the_tokens_entering_the_last_block(models: dict) -> None:
    """Average-pooled ViT: the tokens also reach the logit through the residual path, so the product does not cancel."""
    import torch

    _, net, mm = _map_model(models["vit-avg"])
    x = _input(mm, models["film"])
    got = mm.maps(x, "hirescam", [1, 2])
    held = {}

    def grab(_mod, args):
        args[0].retain_grad()
        held["x"] = args[0]

    h = net.blocks[-1].register_forward_pre_hook(grab)
    logits = mm.logits(net.forward_head(net.forward_features(x.clone().requires_grad_(True)), pre_logits=True))[0]
    h.remove()
    npt = net.num_prefix_tokens
    for k, j in enumerate([1, 2]):
        (grad,) = torch.autograd.grad(logits[j], held["x"], retain_graph=True)
        want = torch.relu((grad[0, npt:] * held["x"][0, npt:].detach()).sum(-1)).reshape(4, 4).numpy()
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-6)
    assert got.max() > 0


def test_class_token_vit_hirescam_cancels_and_says_so(models: dict) -> None:
    """A class-token ViT's patch tokens reach the logit only through the last block's LayerNorm: gradient x
    activation sums to ~0 at every token (checked by hand), and the method says so in one line."""
    import torch

    from mavl_cli.core.errors import MavlError

    _, net, mm = _map_model(models["vit"])
    x = _input(mm, models["film"])
    sp = mm.adapter.run(x, grad=True)
    (g,) = torch.autograd.grad(mm.logits(sp.pooled)[0, 0], sp.act)
    terms = (g * sp.act)[0, net.num_prefix_tokens:].detach()
    assert terms.sum(-1).abs().sum() < 1e-4 * terms.abs().sum()
    with pytest.raises(MavlError, match="HiResCAM is zero at every location.*LayerNorm"):
        mm.maps(x, "hirescam", [0, 1])


def test_family_without_a_spatial_map_gives_one_clear_line() -> None:

    from timm.models.mlp_mixer import MlpMixer

    from mavl_cli.core.errors import MavlError
    from mavl_cli.explain.heatmaps import SpatialAdapter

    mixer = MlpMixer(num_classes=0, img_size=32, patch_size=16, num_blocks=1, embed_dim=32)
    with pytest.raises(MavlError, match=r"gives \(1, 4, 32\) features, not a spatial map"):
        SpatialAdapter(mixer.eval(), "mixer_s16_224", (3, 32, 32))


# ------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("method", ["similarity", "gradcam", "similarity-hirescam"])
def test_predict_heatmap_writes_overlays_maps_file_and_json_peaks(models: dict, tmp_path: Path, method: str) -> None:
    out = tmp_path / "maps"
    film = models["film"]
    model = models["cnn" if "hirescam" in method else "vit"]  # HiResCAM cancels on a class-token ViT (own test)
    r = run_cli(["predict", film, "--model", model, "--heatmap", out, "--heatmap-labels", "all",
                 "--heatmap-method", method, "--json"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)["images"][0]
    f = read_file(out / "film0.maps.safetensors", expect="maps")
    w, h = Image.open(film).size
    assert f.tensors["maps"].shape == (3, h, w) and f.tensors["maps"].dtype == np.float32
    assert f.labels() == LABELS and f.meta["method"] == method and f.meta["image_size"] == [w, h]
    for k, lab in enumerate(LABELS):
        ov = Image.open(out / f"film0.{lab.replace(' ', '_')}.png")
        assert ov.size == (w, h) and ov.mode == "RGB"
        x, y = peak(f.tensors["maps"][k])
        item = next(i for i in rec["findings"] if i["label"] == lab)
        assert item["peak"] == {"x": x, "y": y} and f.meta["peaks"][k] == [x, y]
    info = run_cli(["info", out / "film0.maps.safetensors"])
    assert info.exit_code == 0 and "maps" in info.stdout and "[3, 80, 80] float32" in info.stdout and method in info.stdout


def test_predict_heatmap_positive_only_by_default(models: dict, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    r = run_cli(["predict", models["film"], "--model", models["cnn"], "--heatmap", out, "--json"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)["images"][0]
    overlays = sorted(p.name for p in out.glob("*.png"))
    assert overlays == sorted(f"film0.{lab.replace(' ', '_')}.png" for lab in rec["positive"])
    assert all(("peak" in i) == i["positive"] for i in rec["findings"])


@pytest.mark.parametrize("args, message", [
    (["--heatmap-labels", "Cardiomegaly,Fracture"], "--heatmap-labels: unknown label(s) Fracture"),
    (["--heatmap-method", "saliency"], "--heatmap-method must be one of similarity, gradcam, hirescam, similarity-hirescam"),
])
def test_predict_heatmap_bad_options_one_line_nothing_written(models: dict, tmp_path: Path, args: list, message: str) -> None:
    out = tmp_path / "maps"
    r = run_cli(["predict", models["film"], "--model", models["vit"], "--heatmap", out, *args])
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert not out.exists()


def test_mapping_back_a_big_film_holds_one_float32_copy():
    """A 3000 x 2500 film with 14 labels: the result is 420 MB; mapping back must not hold float64 copies of it."""
    import tracemalloc

    g = CropGeometry(3000, 2500, 268.8, 224.0, 22.4, 0.0, 224, 224)
    m = np.random.default_rng(0).random((14, 14, 14)).astype(np.float32)
    tracemalloc.start()
    try:
        out = to_original(m, g)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (14, 2500, 3000) and out.dtype == np.float32
    assert peak_bytes < 1.3 * out.nbytes
    # cut-away columns (left of the crop) hold each map's minimum; inside, values stay within the grid's range
    assert np.allclose(out[:, :, 0], m.reshape(14, -1).min(1)[:, None])
    assert out.max() <= m.max() + 1e-6
