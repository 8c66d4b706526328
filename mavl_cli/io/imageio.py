"""Decoding radiographs from every file format radiology data ships in.

Two entry points share one decoder:

* :func:`load_radiograph` returns an 8-bit PIL image, ``"L"`` for grayscale
  sources and ``"RGB"`` only when the source has real colour. Plain 8-bit
  L/RGB files never leave PIL (no numpy round-trip), which keeps
  ``mavl embed-images`` cheap on 200k-image datasets.
* :func:`load_array` returns float32 intensities in [0, 1] and keeps the full
  precision of 12/16-bit data instead of quantising it to 8 bits.

Intensity conventions (why they are what they are):

* 8-bit data is divided by 255; 16-bit data never is.
* >8-bit PNG/TIFF data has no trustworthy bit-depth metadata: a 16-bit
  container often holds 10-, 12- or 14-bit values, so dividing by 65535
  would give near-black images. Such data gets a per-image window between
  the 0.5th and 99.5th percentiles, like a reading-room display; percentiles
  instead of min/max so a few hot pixels or a burned-in label cannot squash
  the anatomy into a narrow band.
* DICOM follows the standard display pipeline: BitsStored masking (pydicom),
  modality LUT (RescaleSlope/RescaleIntercept), the VOI LUT or
  WindowCenter/WindowWidth when present (else the percentile window above),
  then MONOCHROME1 / inverse presentation inversion so bone is always bright.
* Alpha is composited over black (air), never white.
* Huge JPEGs are decoded at reduced scale by libjpeg (``Image.draft``) and
  every image is downscaled with an antialiasing filter before any float
  copy is made. Images above ``PIL.Image.MAX_IMAGE_PIXELS`` are refused
  (decompression bombs) with a :class:`MavlError`, without touching PIL's
  global settings.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

from mavl_cli.core.errors import MavlError
from mavl_cli.core.limits import MAX_ASPECT

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")

# Colour channels that differ by at most this much are treated as gray: lossy
# codecs can leave +-1 level of chroma noise on gray content saved as RGB.
GRAY_TOLERANCE = 3
# Percentiles of the automatic window for >8-bit data without its own window.
WINDOW_PERCENTILES = (0.5, 99.5)

_HIGH_BIT_PREFIXES = ("I", "F")  # I;16*, I (int32), F (float32)
_DICOM_DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"


# --------------------------------------------------------------------------- public


def is_regular(path: Path | str) -> bool:
    """True for a regular file (following links): FIFOs, devices and sockets are never opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def sniff_head(path: Path | str, n: int) -> bytes | None:
    """The first ``n`` bytes of a regular file, for sniffing its kind; None for anything else (a FIFO
    would block the read without a writer, a device never ends) or a file that cannot be opened."""
    if not is_regular(path):
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return None


def is_dicom(path: Path | str) -> bool:
    """Whether ``path`` is DICOM: a ``.dcm``/``.dicom`` name, the ``DICM`` magic at byte 128, or a
    preamble-less file (as some archives store them) that starts like a DICOM data set and parses.

    The one place DICOM is recognised by name or content; only regular files are ever opened.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    head = sniff_head(path, 132)
    if head is None:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return _starts_like_dicom(head) and _parses_as_dicom(path)


def may_be_dicom_name(name: str) -> bool:
    """Names that folder scans sniff for DICOM content: no suffix, or a numeric one (``1.2.840.113619.2.5``)."""
    suffix = os.path.splitext(name)[1]
    return not suffix or suffix[1:].isdigit()


# Explicit VRs (PS3.5 6.2) a data set's first element can carry.
_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split())


def _starts_like_dicom(head: bytes) -> bool:
    """A preamble-less data set opens with a group 0002 or 0008 element, little endian, explicit or implicit VR."""
    if len(head) < 8:
        return False
    group, element = int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little")
    if group not in (0x0002, 0x0008) or element > 0x0020:
        return False
    return head[4:6] in _VRS or int.from_bytes(head[4:8], "little") < 0x10000


def _parses_as_dicom(path: Path) -> bool:
    try:
        import pydicom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return any(tag.group in (0x0008, 0x0010, 0x0020, 0x0028) for tag in ds.keys())
    except Exception:  # noqa: BLE001 - anything pydicom cannot read is not DICOM here
        return False




def load_radiograph(path: Path | str, target_size: int | None = None) -> Image.Image:
    """Decode any supported file to an 8-bit ``"L"`` or ``"RGB"`` PIL image.

    With ``target_size`` the image is downscaled (never upscaled) so its
    shortest side equals ``target_size``; smaller images come back as they are
    and the model's preprocessing upsamples them.
    """
    im = _decode(Path(path), target_size)
    if im.mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(im, dtype=np.float32)))
    return im


def as_radiograph(im: Any, target_size: int | None = None) -> Image.Image:
    """An in-memory PIL image -> the 8-bit ``"L"``/``"RGB"`` image :func:`load_radiograph` would give for the
    same pixels in a file (16-bit and float windowed, alpha over black, palette expanded, EXIF orientation
    of a JPEG applied, downscaled to ``target_size`` first as a file is), so the Python API scores a PIL
    image exactly as `mavl predict` scores its file."""

    if not isinstance(im, Image.Image):
        raise MavlError(f"expected an image path or a PIL image, got {type(im).__name__}")
    w, h = im.size
    if w < 1 or h < 1:
        raise MavlError(f"the image is empty ({w}x{h} pixels)")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise MavlError(f"the image is {w}x{h} pixels: its sides differ more than {MAX_ASPECT:g}:1, not a radiograph")
    if im.format in ("JPEG", "MPO") and im.getexif().get(0x0112, 1) != 1:
        im = ImageOps.exif_transpose(im)
    out = _normalise_mode(im, target_size)
    if out.mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(out, dtype=np.float32)))
    return out


def load_array(path: Path | str, target_size: int | None = None) -> np.ndarray:
    """Decode to float32 intensities in [0, 1]: ``[H, W]`` for gray, ``[H, W, 3]`` for colour.

    Unlike :func:`load_radiograph` this keeps the full precision of >8-bit data.
    """
    im = _decode(Path(path), target_size)
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
    return np.asarray(im, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------- decoding


def _decode(path: Path, target_size: int | None) -> Image.Image:
    """Decode to mode ``"L"``, ``"RGB"`` (8-bit) or ``"F"`` (gray float in [0, 1])."""
    if target_size is not None and target_size < 1:
        raise ValueError(f"target_size must be a positive integer, got {target_size}")
    if not path.exists():
        raise MavlError(f"{path}: file not found.", path=path)
    if path.is_dir():
        raise MavlError(f"{path}: is a folder, not an image file.", path=path)
    if not is_regular(path):
        raise MavlError(f"{path}: not a regular file (a device, FIFO or socket), not an image file.", path=path)
    if not os.access(path, os.R_OK):
        raise MavlError(f"{path}: cannot read file (permission denied).", path=path)
    try:
        empty = path.stat().st_size == 0
    except OSError as exc:
        raise MavlError(f"{path}: cannot read file ({exc.strerror or exc}).", path=path) from exc
    if empty:
        raise MavlError(f"{path}: cannot decode image (the file is empty).", path=path)
    if is_dicom(path):
        return _decode_dicom(path, target_size)
    return _decode_pil(path, target_size)


warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _open_image(path: Path, target_size: int | None = None) -> Image.Image:
    """Open lazily (header only), refuse decompression bombs, and request a
    reduced-scale JPEG decode via ``draft`` so a 4000 px JPEG never exists at
    full resolution when a 256 px result is wanted."""
    bomb = MavlError(
        f"{path}: refusing to decode image: it claims more than "
        f"{Image.MAX_IMAGE_PIXELS:,} pixels (possible decompression bomb).",
        path=path,
    )
    try:
        # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; the size check below
        # treats 1x as the limit. (No warnings.catch_warnings: decoding runs in
        # threads, and that context manager mutates process-wide state.)
        im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise bomb from exc
    except UnidentifiedImageError as exc:
        raise MavlError(
            f"{path}: cannot decode image (not a recognised image format).", path=path
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise MavlError(f"{path}: cannot decode image ({_reason(exc)}).", path=path) from exc
    if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
        im.close()
        raise bomb
    try:
        check_geometry(path, im.width, im.height)
    except MavlError:
        im.close()
        raise
    if target_size and im.format in ("JPEG", "MPO") and im.mode in ("L", "RGB"):
        w, h = im.size
        if min(w, h) >= 2 * target_size:
            # draft picks the largest 1/2, 1/4, 1/8 scale keeping both sides >= target.
            im.draft(im.mode, (target_size, target_size))
    return im


def check_geometry(path: Path, width: int, height: int) -> None:
    """Refuse, from the header alone, sizes no radiograph has: resizing the short side of a
    1x70000 px strip to 256 would make a 17.9-million-pixel-long image (gigabytes)."""

    if width < 1 or height < 1:
        raise MavlError(f"{path}: the image claims a size of {width}x{height} pixels.", path=path)
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT:
        raise MavlError(
            f"{path}: refusing to decode a {width}x{height} image: its sides differ {ratio:,.0f}-fold "
            f"(at most {MAX_ASPECT:g}; not a radiograph, and resizing it would need huge memory).", path=path)


def _decode_pil(path: Path, target_size: int | None) -> Image.Image:
    im = _open_image(path, target_size)
    try:
        with im:  # closes only the file handle; the loaded pixels stay usable
            im.load()  # PIL decodes lazily: force it here so bad data fails inside the try
            if im.format in ("JPEG", "MPO") and im.getexif().get(0x0112, 1) != 1:
                ImageOps.exif_transpose(im, in_place=True)
            return _normalise_mode(im, target_size)
    except MavlError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise MavlError(f"{path}: cannot decode image ({_reason(exc)}).", path=path) from exc


def _normalise_mode(im: Image.Image, target_size: int | None) -> Image.Image:
    """Bring a loaded PIL image to L / RGB / F (float, windowed), downscaled."""
    mode = im.mode
    if mode.startswith(_HIGH_BIT_PREFIXES):
        arr = np.nan_to_num(np.asarray(im).astype(np.float32, copy=False))
        f = _resize(Image.fromarray(arr), target_size)
        return Image.fromarray(_auto_window(np.asarray(f, dtype=np.float32)))
    if mode == "1":
        im = im.convert("L")
    elif mode == "P" or mode == "PA":
        im = im.convert("RGBA" if (mode == "PA" or "transparency" in im.info) else "RGB")
    elif mode in ("La",):
        im = im.convert("LA")
    elif mode in ("RGBa",):
        im = im.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...
    if im.mode in ("LA", "RGBA"):
        im = _drop_alpha(im)
    im = _resize(im, target_size)
    if im.mode == "RGB" and _is_gray(im):
        im = im.convert("L")
    return im


def _drop_alpha(im: Image.Image) -> Image.Image:
    """Composite over black: transparent background is air, not white film."""
    alpha = im.getchannel("A")
    base = im.convert(im.mode[:-1])  # LA -> L, RGBA -> RGB
    if alpha.getextrema()[0] == 255:
        return base
    return Image.composite(base, Image.new(base.mode, base.size, 0), alpha)


def _is_gray(im: Image.Image) -> bool:
    r, g, b = im.split()
    return (
        ImageChops.difference(r, g).getextrema()[1] <= GRAY_TOLERANCE
        and ImageChops.difference(r, b).getextrema()[1] <= GRAY_TOLERANCE
    )


def _resize(im: Image.Image, target_size: int | None) -> Image.Image:
    """Downscale so the shortest side equals ``target_size``; never upscale."""
    if not target_size:
        return im
    w, h = im.size
    short = min(w, h)
    if short <= target_size:
        return im
    # torchvision's (and so timm's, open_clip's, transformers') rule: long side truncated, so a
    # family transform that resizes to the same short side afterwards has nothing left to do
    long = max(w, h)
    size = (target_size, int(target_size * long / short)) if w <= h else (int(target_size * long / short), target_size)
    # reducing_gap lets PIL box-reduce by an integer factor first: fast, and
    # BICUBIC on the rest keeps proper antialiasing.
    return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def _auto_window(arr: np.ndarray) -> np.ndarray:
    """Map the robust intensity range of >8-bit data to [0, 1] (see module doc)."""
    if arr.size == 0:
        return arr.astype(np.float32)
    lo, hi = np.percentile(arr, WINDOW_PERCENTILES)
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    out = (arr - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _reason(exc: BaseException) -> str:
    """A short, single-line description of a decoder exception."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text.rstrip(".")
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return "truncated file"
    if not text:
        return type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------- DICOM


def _decode_dicom(path: Path, target_size: int | None) -> Image.Image:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:
        raise MavlError(
            f'{path}: reading DICOM files needs pydicom: pip install "mavl[dicom]".', path=path
        ) from exc

    try:
        with warnings.catch_warnings():
            # forced reads of odd files warn per unknown tag; the error below says it once
            warnings.simplefilter("ignore", UserWarning)
            ds = pydicom.dcmread(path, force=True)  # a DICOM name, the magic, or sniffed by is_dicom
    except InvalidDicomError as exc:
        raise MavlError(f"{path}: not a valid DICOM file.", path=path) from exc
    except Exception as exc:  # noqa: BLE001
        raise MavlError(f"{path}: cannot read DICOM file ({_reason(exc)}).", path=path) from exc
    if not any(tag.group in (0x0008, 0x0010, 0x0020, 0x0028, 0x7FE0) for tag in ds.keys()):
        # force=True "reads" any bytes; real DICOM has identification/image elements
        raise MavlError(f"{path}: not a valid DICOM file.", path=path)

    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise MavlError(f"{path}: DICOM file has no pixel data.", path=path)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or cols < 1:
        raise MavlError(f"{path}: DICOM file has no pixel data (no Rows/Columns).", path=path)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and rows * cols > limit:
        raise MavlError(
            f"{path}: refusing to decode a {cols}x{rows} DICOM image "
            f"(more than {limit:,} pixels).",
            path=path,
        )
    check_geometry(path, cols, rows)
    _ensure_transfer_syntax(ds)

    arr = _dicom_first_frame(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if (arr.ndim == 3 and arr.shape[-1] in (3, 4)) or photometric == "PALETTE COLOR":
        return _dicom_colour(ds, arr, photometric, target_size)
    if arr.ndim != 2:
        raise MavlError(
            f"{path}: unsupported DICOM pixel layout (array shape {arr.shape}).", path=path
        )
    try:
        values = _dicom_gray_to_unit(ds, arr, photometric)
    except MavlError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed LUT/window attributes
        raise MavlError(
            f"{path}: cannot apply the DICOM intensity transforms ({_reason(exc)}).", path=path
        ) from exc
    return _resize(Image.fromarray(values), target_size)


def _ensure_transfer_syntax(ds: Any) -> None:
    """Files without a meta header (read with force) still need a transfer syntax to decode."""
    from pydicom import uid
    from pydicom.dataset import FileMetaDataset

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit = True
    if little is None or little:
        little_uid = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
        meta.TransferSyntaxUID = little_uid
    else:
        meta.TransferSyntaxUID = uid.ExplicitVRBigEndian


def _dicom_first_frame(ds: Any, path: Path) -> np.ndarray:
    """Decode only the first frame where pydicom allows it; clear errors for codecs."""
    tsuid = ds.file_meta.TransferSyntaxUID
    try:
        try:
            from pydicom.pixels import (
                pixel_array,  # pydicom >= 3: decodes one frame only
            )
        except ImportError:  # pydicom 2.x
            arr = ds.pixel_array
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            return arr[0] if frames > 1 else arr
        return pixel_array(ds, index=0)
    except Exception as exc:  # noqa: BLE001
        if getattr(tsuid, "is_compressed", False):
            tried = _dicom_decoders(tsuid)
            what = f"{path}: cannot decode DICOM pixel data compressed as {getattr(tsuid, 'name', tsuid)} ({tsuid})"
            if tried:  # decoders are installed, and none of them reads this file: installing more is no advice
                raise MavlError(
                    f"{what}: the installed decoders ({', '.join(tried)}) do not support this file or it is damaged "
                    "(--debug shows their messages)", path=path) from exc
            raise MavlError(f"{what}: no installed decoder supports it; install one: {_DICOM_DECODER_HINT}",
                            path=path) from exc
        raise MavlError(
            f"{path}: cannot decode DICOM pixel data ({_reason(exc)}).", path=path
        ) from exc


def _dicom_decoders(tsuid: Any) -> list[str]:
    """The pydicom decoder plugins installed for this transfer syntax (pydicom 3; [] if unknown)."""
    try:
        from pydicom.pixels.decoders.base import get_decoder

        return list(get_decoder(tsuid).available_plugins)
    except Exception:  # noqa: BLE001 - pydicom 2.x, or a syntax pydicom has no decoder for
        return []


def _dicom_gray_to_unit(ds: Any, arr: np.ndarray, photometric: str) -> np.ndarray:
    """Modality LUT -> VOI (LUT or window) -> polarity, ending in float32 [0, 1]."""
    values = arr.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if "ModalityLUTSequence" in ds:
        values = _pydicom_pixels("apply_modality_lut")(arr, ds).astype(np.float32)
    elif slope != 1 or intercept != 0:
        with np.errstate(over="ignore", invalid="ignore"):
            values = values * np.float32(slope) + np.float32(intercept)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise MavlError(
            f"{ds.filename if isinstance(getattr(ds, 'filename', None), str) else 'DICOM'}: {bad:,} pixel value(s) are "
            f"NaN or infinite after the modality transform (RescaleSlope {ds.get('RescaleSlope', 1)}, "
            f"RescaleIntercept {ds.get('RescaleIntercept', 0)}); the file's intensity attributes are broken",
            path=getattr(ds, "filename", None) if isinstance(getattr(ds, "filename", None), str) else None)

    out: np.ndarray | None = None
    if "VOILUTSequence" in ds:
        out = _apply_voi_lut_sequence(ds, values)
    if out is None:
        window = _window(ds)
        if window is not None:
            out = _apply_window(values, *window, str(ds.get("VOILUTFunction", "LINEAR")))
    if out is None:
        bits = int(ds.get("BitsStored", 16) or 16)
        plain = slope == 1 and intercept == 0 and "ModalityLUTSequence" not in ds
        if bits <= 8 and plain and int(ds.get("PixelRepresentation", 0) or 0) == 0:
            out = values / np.float32(255.0)  # 8-bit data is scaled like an 8-bit PNG
        else:
            out = _auto_window(values)

    inverse = str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
    if (photometric == "MONOCHROME1") != inverse:
        out = 1.0 - out
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _first_number(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _window(ds: Any) -> tuple[float, float] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center = _first_number(ds.WindowCenter)
        width = _first_number(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    if not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        return None
    return center, width


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, output scaled to [0, 1]."""
    function = function.strip().upper()
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        out = (values - center) / width + 0.5
    else:  # LINEAR: the standard's half-pixel offsets; width 1 is a hard threshold
        if width <= 1:
            return (values > center - 0.5).astype(np.float32)
        out = (values - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _apply_voi_lut_sequence(ds: Any, values: np.ndarray) -> np.ndarray | None:
    """Apply the first VOI LUT and scale by the LUT's declared output bit depth."""
    item = ds.VOILUTSequence[0]
    try:
        descriptor = [int(v) for v in item.LUTDescriptor]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(descriptor) != 3:
        return None
    # The LUT is indexed by the modality-transformed values, so pass integers.
    mapped = _pydicom_pixels("apply_voi_lut")(np.rint(values).astype(np.int64), ds, prefer_lut=True)
    mapped = np.asarray(mapped, dtype=np.float32)
    bits = descriptor[2]
    top = float(2**bits - 1) if 1 <= bits <= 16 else 0.0
    if top <= 0 or mapped.max(initial=0) > top:
        return _auto_window(mapped)
    return mapped / np.float32(top)


def _dicom_colour(
    ds: Any, arr: np.ndarray, photometric: str, target_size: int | None
) -> Image.Image:
    """Colour DICOMs (secondary captures): RGB, YBR (pydicom converts) or palette."""
    if photometric == "PALETTE COLOR":
        arr = _pydicom_pixels("apply_color_lut")(arr, ds)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        bits = int(ds.get("BitsStored", 16) or 16)
        if photometric == "PALETTE COLOR":
            bits = 16 if arr.max(initial=0) > 255 else 8
        arr = _float_to_uint8(arr.astype(np.float32) / np.float32(2**bits - 1))
    im = _resize(Image.fromarray(np.ascontiguousarray(arr)), target_size)
    return im.convert("L") if _is_gray(im) else im


def _pydicom_pixels(name: str) -> Any:
    """A pixel helper from pydicom 3 (``pydicom.pixels``) or 2.x (``pixel_data_handlers.util``)."""
    try:
        import pydicom.pixels as module
    except ImportError:  # pydicom 2.x
        import pydicom.pixel_data_handlers.util as module  # type: ignore[no-redef]
    return getattr(module, name)
