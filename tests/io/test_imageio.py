"""Decoding of every supported radiograph format, on files the tests generate."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.inputs import list_images
from mavl_cli.io import imageio
from mavl_cli.io.imageio import is_dicom, load_array, load_radiograph

REPO = Path(__file__).resolve().parents[2]


def _gray_ramp(h: int = 32, w: int = 64) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))


def _save(arr_or_im, path: Path, **kw) -> Path:
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    im.save(path, **kw)
    return path


# --------------------------------------------------------------------------- 8-bit formats


def test_png_l_exact(tmp_path):
    ramp = _gray_ramp()
    p = _save(ramp, tmp_path / "a.png")
    im = load_radiograph(p)
    assert im.mode == "L" and im.size == (64, 32)
    assert np.array_equal(np.asarray(im), ramp)
    arr = load_array(p)
    assert arr.dtype == np.float32 and arr.shape == (32, 64)
    assert np.allclose(arr, ramp / 255.0)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".bmp", ".tif", ".tiff"])
def test_other_8bit_containers(tmp_path, suffix):
    ramp = _gray_ramp()
    p = _save(ramp, tmp_path / f"a{suffix}")
    im = load_radiograph(p)
    assert im.mode == "L"
    assert np.abs(np.asarray(im, dtype=int) - ramp).max() <= 6  # JPEG is lossy


def test_rgb_with_equal_channels_becomes_l(tmp_path):
    ramp = _gray_ramp()
    for name in ("g.png", "g.jpg"):
        p = _save(np.stack([ramp] * 3, -1), tmp_path / name)
        im = load_radiograph(p)
        assert im.mode == "L"
        assert np.abs(np.asarray(im, dtype=int) - ramp).max() <= 6


def test_real_colour_stays_rgb(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[8:, :, 2] = 90
    p = _save(rgb, tmp_path / "c.png")
    im = load_radiograph(p)
    assert im.mode == "RGB"
    assert np.array_equal(np.asarray(im), rgb)
    arr = load_array(p)
    assert arr.shape == (16, 16, 3) and np.allclose(arr, rgb / 255.0)


def test_rgba_equal_channels_matches_l(tmp_path):
    ramp = _gray_ramp()
    rgba = np.dstack([ramp, ramp, ramp, np.full_like(ramp, 255)])
    p_rgba = _save(rgba, tmp_path / "rgba.png")
    p_l = _save(ramp, tmp_path / "l.png")
    a, b = load_radiograph(p_rgba), load_radiograph(p_l)
    assert a.mode == b.mode == "L"
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_alpha_is_composited_over_black(tmp_path):
    rgba = np.full((8, 8, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:4, :, 3] = 0  # top half fully transparent
    rgba[4:6, :, 3] = 128  # half transparent
    out = np.asarray(load_radiograph(_save(rgba, tmp_path / "t.png")), dtype=int)
    assert (out[:4] == 0).all()  # black, not white
    assert np.abs(out[4:6] - 100).max() <= 1
    assert (out[6:] == 200).all()

    la = Image.merge("LA", [Image.fromarray(rgba[..., 0]), Image.fromarray(rgba[..., 3])])
    out_la = load_radiograph(_save(la, tmp_path / "la.png"))
    assert out_la.mode == "L"
    assert np.array_equal(np.asarray(out_la), out.astype(np.uint8))


def test_palette_gray_and_colour(tmp_path):
    idx = np.array([[0, 1], [2, 3]], np.uint8)
    gray = Image.fromarray(idx, mode="P")
    levels = [10, 90, 170, 250]
    gray.putpalette([v for lv in levels for v in (lv, lv, lv)])
    out = load_radiograph(_save(gray, tmp_path / "p.png"))
    assert out.mode == "L"
    assert np.asarray(out).tolist() == [[10, 90], [170, 250]]

    colour = Image.fromarray(idx, mode="P")
    colour.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    out = load_radiograph(_save(colour, tmp_path / "pc.png"))
    assert out.mode == "RGB"
    assert np.asarray(out)[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(out)[1, 1].tolist() == [9, 9, 9]


def test_palette_with_transparency(tmp_path):
    im = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    im.putpalette([100, 100, 100, 200, 200, 200])
    im.info["transparency"] = 0
    out = load_radiograph(_save(im, tmp_path / "pt.png", transparency=0))
    assert np.asarray(out).tolist() == [[0, 200]]


def test_bilevel_and_cmyk(tmp_path):
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    out = load_radiograph(_save(bits, tmp_path / "b.png"))
    assert out.mode == "L" and np.asarray(out).tolist() == [[0, 255], [255, 0]]

    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))  # white
    cmyk.paste((0, 0, 0, 255), (0, 0, 2, 4))  # black left half
    for name in ("k.tif", "k.jpg"):
        out = np.asarray(load_radiograph(_save(cmyk, tmp_path / name)), dtype=int)
        assert out.ndim == 2
        assert out[:, 0].max() < 20 and out[:, 3].min() > 235


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((20, 40), np.uint8)
    arr[:, :10] = 255  # bright strip on the left
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    p = tmp_path / "o.jpg"
    im.save(p, exif=exif.tobytes(), quality=95)
    out = np.asarray(load_radiograph(p))
    assert out.shape == (40, 20)
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # strip now on top


# --------------------------------------------------------------------------- >8-bit data


def _png16(arr: np.ndarray, path: Path) -> Path:
    im = Image.fromarray(arr.astype(np.uint16))
    assert im.mode.startswith("I;16")
    im.save(path)
    return path


@pytest.mark.parametrize("top", [65535, 4095])
def test_16bit_ramp_spans_range(tmp_path, top):
    ramp = np.tile(np.linspace(0, top, 512).round(), (8, 1))
    p = _png16(ramp, tmp_path / f"r{top}.png")
    with Image.open(p) as src:
        assert src.mode.startswith("I")
    out = np.asarray(load_radiograph(p), dtype=int)
    # neither black (12-bit data / 65535) nor saturated (16-bit data / 255)
    assert out.min() <= 5 and out.max() >= 250
    assert (np.diff(out[0]) >= 0).all()  # still a ramp
    assert len(np.unique(out[0])) > 200
    arr = load_array(p)
    assert arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    assert len(np.unique(arr[0])) > 400  # full precision kept, not quantised to 8 bits


def test_16bit_outliers_do_not_squash_anatomy(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(1000, 3000, (64, 64))
    img[0, :3] = 65535  # a few hot pixels
    out = np.asarray(load_radiograph(_png16(img, tmp_path / "hot.png")), dtype=int)
    assert out[1:].std() > 50


def test_16bit_tiff_and_resize(tmp_path):
    ramp = np.tile(np.linspace(0, 60000, 600).astype(np.uint16), (300, 1))
    p = tmp_path / "r.tif"
    Image.fromarray(ramp).save(p)
    out = load_radiograph(p, target_size=100)
    assert out.mode == "L" and out.size == (200, 100)
    assert np.asarray(out).max() >= 250


# --------------------------------------------------------------------------- sizes


def test_target_size_downscales_but_never_upscales(tmp_path):
    p = _save(np.zeros((300, 500), np.uint8), tmp_path / "big.png")
    # torchvision's rule (timm, open_clip, transformers resize the same way): the long side is truncated
    assert load_radiograph(p, target_size=100).size == (166, 100)
    assert load_array(p, target_size=100).shape == (100, 166)
    small = _save(np.zeros((50, 60), np.uint8), tmp_path / "small.png")
    assert load_radiograph(small, target_size=224).size == (60, 50)


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory) -> Path:
    h, w = 3000, 4000
    arr = (np.add.outer(np.arange(h) // 12, np.arange(w) // 16) % 256).astype(np.uint8)
    p = tmp_path_factory.mktemp("large") / "large.jpg"
    Image.fromarray(arr).save(p, quality=85)
    return p


def test_large_jpeg_uses_draft(large_jpeg):
    with imageio._open_image(large_jpeg, 256) as im:
        assert im.size == (500, 375)  # libjpeg decodes at 1/8 scale, before any pixel is loaded
    out = load_radiograph(large_jpeg, target_size=256)
    assert out.mode == "L"
    assert min(out.size) == 256 and max(out.size) < 4000
    assert out.size == (341, 256)


def test_decompression_bomb_is_refused(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)
    p = tmp_path / "bomb.png"
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(MavlError, match="bomb") as info:
        load_radiograph(p)
    assert str(p) in str(info.value)


def test_warning_zone_is_refused_too(tmp_path, monkeypatch):
    p = _save(np.zeros((40, 40), np.uint8), tmp_path / "mid.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: PIL would only warn
    with pytest.raises(MavlError, match="mid.png"):
        load_radiograph(p)


# --------------------------------------------------------------------------- broken files


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(tmp_path: Path, suffix: str) -> Path:
    rng = np.random.default_rng(1)
    p = _save(rng.integers(0, 256, (64, 64), dtype=np.uint8), tmp_path / f"full{suffix}")
    data = p.read_bytes()
    out = tmp_path / f"cut{suffix}"
    out.write_bytes(data[: len(data) // 2])
    return out


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: _write(d / "empty.png", b""), "empty"),
        (lambda d: _write(d / "text.png", b"hello, not a picture"), "not a recognised"),
        (lambda d: _truncated(d, ".png"), "cannot decode image"),
        (lambda d: _truncated(d, ".jpg"), "truncated"),
    ],
)
def test_unreadable_files_raise_mavl_error(tmp_path, make, expected):
    p = make(tmp_path)
    for fn in (load_radiograph, load_array):
        with pytest.raises(MavlError, match=expected) as info:
            fn(p)
        assert str(p) in str(info.value)
        assert "cannot decode image" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(MavlError, match="not found"):
        load_radiograph(tmp_path / "nope.png")


# --------------------------------------------------------------------------- DICOM


def _dicom(path: Path, arr: np.ndarray, *, bits_stored: int = 12, photometric: str = "MONOCHROME2",
           ts: str | None = None, pixel_bytes: bytes | None = None, preamble: bool = True,
           **attrs) -> Path:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts or ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    frames = arr.shape[0] if arr.ndim == 3 and not (arr.shape[-1] == 3) else 1
    rgb = arr.ndim == 3 and arr.shape[-1] == 3
    ds.Rows, ds.Columns = arr.shape[-3:-1] if rgb else arr.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if arr.dtype == np.uint8 else 16
    ds.BitsStored = 8 if arr.dtype == np.uint8 else bits_stored
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    if pixel_bytes is not None or arr.size:
        little = arr.astype(arr.dtype.newbyteorder("<"))
        ds.PixelData = pixel_bytes if pixel_bytes is not None else little.tobytes()
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.preamble = None
        pydicom.dcmwrite(path, ds, enforce_file_format=False)
    return path


def _ramp12(w: int = 256) -> np.ndarray:
    return np.tile(np.linspace(0, 4095, w).round().astype(np.uint16), (4, 1))


def test_dicom_12bit_without_window_spans_range(tmp_path):
    raw = _ramp12() | np.uint16(0xF000)  # junk above BitsStored must be ignored
    p = _dicom(tmp_path / "a.dcm", raw)
    assert is_dicom(p)
    out = np.asarray(load_radiograph(p), dtype=int)
    assert out.shape == (4, 256)
    assert out.min() <= 5 and out.max() >= 250 and (np.diff(out[0]) >= 0).all()
    arr = load_array(p)
    assert arr.dtype == np.float32 and len(np.unique(arr[0])) > 200


def test_dicom_monochrome1_inverted(tmp_path):
    ramp = _ramp12()
    m2 = load_array(_dicom(tmp_path / "m2.dcm", ramp))
    m1 = load_array(_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1"))
    assert m1[0, -1] < 0.02 and m1[0, 0] > 0.98  # brightest stored value is darkest
    assert np.allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_rescale_then_window(tmp_path):
    # stored 0..4095 with slope 2, intercept -1000 -> -1000..7190; window 1000 +- 500
    p = _dicom(tmp_path / "w.dcm", _ramp12(), RescaleSlope="2", RescaleIntercept="-1000",
               WindowCenter="1000", WindowWidth="1000")
    arr = load_array(p)[0]
    stored = _ramp12()[0].astype(float)
    hu = stored * 2 - 1000
    assert (arr[hu < 500] == 0).all() and (arr[hu > 1500] == 1).all()  # windowing clips
    mid = np.argmin(np.abs(hu - 1000))
    assert abs(arr[mid] - 0.5) < 0.02  # the window centre is in rescaled (modality) units


def test_dicom_window_multivalue_and_sigmoid(tmp_path):
    p = _dicom(tmp_path / "mv.dcm", _ramp12(), WindowCenter=[2048, 100], WindowWidth=[4096, 50],
               VOILUTFunction="SIGMOID")
    arr = load_array(p)[0]
    x = _ramp12()[0].astype(float)
    assert np.allclose(arr, 1 / (1 + np.exp(-4 * (x - 2048) / 4096)), atol=1e-5)  # first pair only


def test_dicom_voi_lut_sequence(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    lut = (np.arange(4096) >= 2048).astype(np.uint16) * 4095  # 12-bit threshold LUT
    item.LUTData = lut.astype("<u2").tobytes()
    p = _dicom(tmp_path / "lut.dcm", _ramp12(), VOILUTSequence=[item])
    arr = load_array(p)[0]
    stored = _ramp12()[0]
    assert np.array_equal(arr, (stored >= 2048).astype(np.float32))


def test_dicom_8bit_and_rgb(tmp_path):
    ramp8 = _gray_ramp(4, 32)
    out = np.asarray(load_radiograph(_dicom(tmp_path / "8.dcm", ramp8)))
    assert np.array_equal(out, ramp8)
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 1] = 180
    im = load_radiograph(_dicom(tmp_path / "rgb.dcm", rgb))
    assert im.mode == "RGB" and np.asarray(im)[0, 0].tolist() == [0, 180, 0]


def test_dicom_multiframe_takes_first(tmp_path):
    frames = np.stack([_ramp12(), _ramp12()[:, ::-1]])
    arr = load_array(_dicom(tmp_path / "mf.dcm", frames))
    assert arr.shape == (4, 256) and arr[0, 0] < arr[0, -1]


def test_dicom_without_preamble(tmp_path):
    p = _dicom(tmp_path / "np.dcm", _ramp12(), preamble=False)
    assert p.read_bytes()[128:132] != b"DICM"
    assert load_radiograph(p).size == (256, 4)


def test_dicom_without_any_meta_header(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    p = _dicom(tmp_path / "src.dcm", _ramp12())
    ds = pydicom.dcmread(p)
    del ds.file_meta
    ds.preamble = None
    out = tmp_path / "bare.dcm"
    pydicom.dcmwrite(out, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert np.asarray(load_radiograph(out)).max() >= 250


def test_dicom_extensionless_detected_by_magic(tmp_path):
    p = _dicom(tmp_path / "IM0001", _ramp12())
    assert is_dicom(p)
    assert not is_dicom(_save(_gray_ramp(), tmp_path / "x.png"))
    assert load_radiograph(p).mode == "L"


def test_dicom_without_pixel_data(tmp_path):
    p = _dicom(tmp_path / "sr.dcm", np.zeros((0, 0), np.uint16))
    with pytest.raises(MavlError, match="has no pixel data") as info:
        load_radiograph(p)
    assert str(p) in str(info.value)


def test_dicom_compressed_undecodable(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    junk = encapsulate([b"\x00\x01junk, not a codestream" * 4])
    p = _dicom(tmp_path / "j2k.dcm", _ramp12(), ts=JPEG2000Lossless, pixel_bytes=junk)
    with pytest.raises(MavlError) as info:
        load_radiograph(p)
    msg = str(info.value)
    assert str(p) in msg and "JPEG 2000" in msg
    # installed decoders are named (advice to install them again would be wrong); none: how to get one
    from pydicom.pixels.decoders.base import get_decoder

    tried = get_decoder(JPEG2000Lossless).available_plugins
    assert (f"installed decoders ({', '.join(tried)})" in msg) if tried else ("pip install pylibjpeg" in msg)


def test_not_a_dicom(tmp_path):
    p = tmp_path / "fake.dcm"
    p.write_bytes(b"just some text, no tags at all")
    with pytest.raises(MavlError, match="fake.dcm: not a valid DICOM"):
        load_radiograph(p)


def test_pydicom_is_imported_lazily():
    code = "import sys, mavl_cli.io.imageio; print('pydicom' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def test_dicom_without_pydicom(tmp_path, monkeypatch):
    p = tmp_path / "x.dcm"
    p.write_bytes(b"\0" * 200)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(MavlError, match=r'pip install "mavl\[dicom\]"'):
        load_radiograph(p)


# --------------------------------------------------------------------------- listing


def _tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel in ("b.png", "a.JPG", "sub/c.dcm", "sub/deeper/d.tiff", ".hidden/e.png", "._f.png"):
        (root / rel).write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    (root / "sub" / "IM0001").write_bytes(b"\0" * 128 + b"DICM")  # no suffix: listed by its DICM magic (issue 14)


def test_list_folder_recursive_sorted(tmp_path):
    _tree(tmp_path)
    got = [p.relative_to(tmp_path).as_posix() for p in list_images([str(tmp_path)])]
    assert got == ["a.JPG", "b.png", "sub/IM0001", "sub/c.dcm", "sub/deeper/d.tiff"]
    flat = [p.name for p in list_images([str(tmp_path)], recursive=False)]
    assert flat == ["a.JPG", "b.png"]


def test_list_files_globs_and_dedup(tmp_path):
    _tree(tmp_path)
    inputs = [tmp_path / "b.png", tmp_path / "**" / "*.png", tmp_path / "sub" / "IM0001"]
    got = list_images([str(p) for p in inputs])
    assert [p.name for p in got] == ["b.png", "IM0001"]


def test_list_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(MavlError, match="no such file"):
        list_images([str(tmp_path / "missing")])
    with pytest.raises(MavlError, match="no files match"):
        list_images([str(tmp_path / "*.nothing")])
    with pytest.raises(MavlError, match="contains no images") as info:
        list_images([str(tmp_path / "empty")])
    assert "empty" in str(info.value)
    with pytest.raises(MavlError, match="not a supported image"):
        list_images([str(tmp_path / "empty" / "readme.txt")])


# --------------------------------------------------------------------------- real data


def _shared_images(name: str) -> Path | None:
    for base in (REPO.parent / "shared", Path("/work/shared")):
        folder = base / "data" / name / "images"
        if folder.is_dir():
            return folder
    return None


@pytest.mark.parametrize("name", ["nih-cxr14-64px", "nih-cxr14-hires"])
def test_shared_nih_images_all_load(name):
    folder = _shared_images(name)
    if folder is None:
        pytest.skip(f"shared data {name} not present")
    files = list_images([str(folder)])
    assert files
    for f in files:
        with Image.open(f) as src:
            short = min(src.size)
        im = load_radiograph(f, target_size=224)
        assert im.mode == "L"  # NIH RGB/RGBA files have equal gray channels
        assert min(im.size) == min(short, 224)
