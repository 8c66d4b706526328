"""The GPU fast path of embed-images, exercised on CPU (the same code with device="cpu"),
plus the GPU-only checks (marked `gpu`; they skip without CUDA and run in benchmarks/device_check.sh)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mavl_cli.io.mavlfile import MavlFile, read_file

VIT = "vit_tiny_patch16_224"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")


def _film(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 80 * np.sin(xx / (w / 3.0)) * np.cos(yy / (h / 2.5))
    return np.clip(base + rng.normal(0, 6, (h, w)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fast")
    png, jpg = d / "png", d / "jpg"
    png.mkdir()
    jpg.mkdir()
    for k in range(6):
        Image.fromarray(_film(k, 78, 64)).save(png / f"g{k}.png")
        Image.fromarray(_film(10 + k, 78, 64)).save(jpg / f"g{k}.jpg", quality=95)
    rgb = np.dstack([_film(20, 60, 70), _film(21, 60, 70), _film(22, 60, 70)])
    Image.fromarray(rgb, "RGB").save(png / "colour.png")
    Image.fromarray(rgb, "RGB").save(jpg / "colour.jpg", quality=95)
    return {"png": png, "jpg": jpg}


def _embed(cli, folder: Path, out: Path, tiny_vit: Path, *extra: str) -> MavlFile:
    r = cli(["embed-images", str(folder), "--backbone", VIT, "--weights", str(tiny_vit), "--batch-size", "3",
             "--threads", "1", "-o", str(out), *extra])
    assert r.exit_code == 0, r.stderr
    return read_file(out)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_cpu_default_is_todays_threads_pipeline(cli, folders, tiny_vit, tmp_path):
    auto = _embed(cli, folders["png"], tmp_path / "a.st", tiny_vit, "--device", "cpu")
    threads = _embed(cli, folders["png"], tmp_path / "t.st", tiny_vit, "--device", "cpu", "--pipeline", "threads")
    assert auto.meta["pipeline"] == {"kind": "threads", "jpeg_decode": "cpu", "resize": "cpu", "channels_last": False,
                                     "compile": False, "notes": []}
    assert auto.tensors["features"].tobytes() == threads.tensors["features"].tobytes()


def test_device_pipeline_on_cpu_equals_threads_for_png(cli, folders, tiny_vit, tmp_path):
    """PNG/DICOM go through DataLoader worker processes with the same preprocessing: the same features."""
    ref = _embed(cli, folders["png"], tmp_path / "t.st", tiny_vit, "--device", "cpu", "--pipeline", "threads")
    dev = _embed(cli, folders["png"], tmp_path / "d.st", tiny_vit, "--device", "cpu", "--pipeline", "device", "--workers", "2")
    assert dev.meta["pipeline"]["kind"] == "device" and dev.meta["pipeline"]["resize"] == "device"
    assert dev.ids() == ref.ids()
    assert dev.tensors["features"].tobytes() == ref.tensors["features"].tobytes()


def test_device_pipeline_jpeg_decode_and_resize_match_pil_closely(cli, folders, tiny_vit, tmp_path):
    ref = _embed(cli, folders["jpg"], tmp_path / "t.st", tiny_vit, "--device", "cpu", "--pipeline", "threads")
    dev = _embed(cli, folders["jpg"], tmp_path / "d.st", tiny_vit, "--device", "cpu", "--pipeline", "device", "--workers", "0")
    assert dev.ids() == ref.ids()
    cos = _cos(dev.tensors["features"], ref.tensors["features"])
    assert cos.min() >= 0.999, cos


def test_resize_crop_geometry_and_pixels_follow_the_eval_transform(folders):
    import torch

    from mavl_cli.encoders.fastpath import resize_crop
    from mavl_cli.encoders.preprocess import prepare_image

    for dc in ({"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic"},
               {"input_size": (3, 48, 40), "crop_pct": 1.0, "interpolation": "bilinear"}):
        img = Image.open(folders["png"] / "g1.png")
        want = prepare_image(img, dc).astype(np.float32)
        got = resize_crop(torch.from_numpy(np.array(img)).unsqueeze(0), dc)[0].numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).mean() < 1.5  # grey levels: two bicubic kernels, same geometry
        assert np.abs(got - want).max() <= 12


def test_choices_and_fallbacks_are_recorded(cli, folders, tiny_vit, tmp_path, monkeypatch):
    import torch

    from mavl_cli.core.errors import MavlError
    from mavl_cli.encoders.fastpath import choose_pipeline, nvjpeg_available

    cpu = torch.device("cpu")
    assert nvjpeg_available(cpu) == (False, "not a CUDA device")
    with pytest.raises(MavlError, match="--pipeline"):
        choose_pipeline("fast", cpu, torch.nn.Linear(2, 2))
    ref = _embed(cli, folders["png"], tmp_path / "e.st", tiny_vit, "--device", "cpu")

    def broken_compile(model, *a, **k):  # what a missing compiler toolchain looks like at the first call
        def run(x):
            raise RuntimeError("inductor: no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    f = _embed(cli, folders["png"], tmp_path / "c.st", tiny_vit, "--device", "cpu", "--compile")
    assert f.meta["pipeline"]["compile"] is False
    assert "--compile failed" in f.meta["pipeline"]["notes"][0]
    assert f.tensors["features"].tobytes() == ref.tensors["features"].tobytes()


def test_an_unreadable_jpeg_in_the_device_pipeline_is_reported_like_on_the_cpu(cli, folders, tiny_vit, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for p in sorted(folders["jpg"].iterdir())[:3]:
        (d / p.name).write_bytes(p.read_bytes())
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = cli(["embed-images", str(d), "--backbone", VIT, "--weights", str(tiny_vit), "--device", "cpu",
             "--pipeline", "device", "-o", str(tmp_path / "x.st")])
    assert r.exit_code == 2 and "broken.jpg" in r.stderr and "--skip-bad" in r.stderr
    f = _embed(cli, d, tmp_path / "y.st", tiny_vit, "--device", "cpu", "--pipeline", "device", "--skip-bad")
    assert len(f.ids()) == 3 and [s["id"] for s in f.meta["skipped"]] == ["broken.jpg"]


# --------------------------------------------------------------------------- GPU only


@gpu
@needs_cuda
def test_gpu_nvjpeg_pipeline_matches_the_cpu_features(cli, folders, tiny_vit, tmp_path):
    ref = _embed(cli, folders["jpg"], tmp_path / "t.st", tiny_vit, "--device", "cpu")
    dev = _embed(cli, folders["jpg"], tmp_path / "g.st", tiny_vit, "--device", "cuda")
    assert dev.meta["pipeline"]["kind"] == "device"
    assert dev.meta["pipeline"]["jpeg_decode"] in ("nvjpeg", "cpu")
    assert _cos(dev.tensors["features"], ref.tensors["features"]).min() >= 0.999


@gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_half_precision_features_match_fp32(cli, folders, tiny_vit, tmp_path, precision):
    ref = _embed(cli, folders["png"], tmp_path / "f.st", tiny_vit, "--device", "cuda")
    half = _embed(cli, folders["png"], tmp_path / "h.st", tiny_vit, "--device", "cuda", "--precision", precision)
    assert half.meta["precision"] == precision
    assert _cos(half.tensors["features"], ref.tensors["features"]).mean() >= 0.999


@gpu
@needs_cuda
def test_gpu_finetune_bf16_one_epoch(phantom_set, tiny_vit, tmp_path, cli):
    r = cli(["finetune-lrf", str(phantom_set.root), "--labels", str(phantom_set.splits["train"]), "-o", str(tmp_path / "h.st"),
             "--backbone-out", str(tmp_path / "bb"), "--backbone", VIT, "--weights", str(tiny_vit), "--rank", "16",
             "--keep", "4", "--epochs", "1", "--batch-size", "8", "--device", "cuda", "--precision", "bf16"])
    assert r.exit_code == 0, r.stderr
    head = read_file(tmp_path / "h.st")
    assert head.meta["train_precision"] == "bf16" and np.isfinite(head.meta["history"][0]["bce"])
