"""Compressed DICOMs as archives hold them: JPEG 2000, JPEG-LS, RLE, with MONOCHROME1 and no preamble.

Each file is generated here (pydicom's encoders), decoded through mavl's loader and compared
with the same pixels stored uncompressed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from mavl_cli.io.imageio import load_array, load_radiograph


def _pixels() -> np.ndarray:
    """A 12-bit chest-like gradient with a bright 'spine' and a dark 'lung'."""
    y, x = np.mgrid[0:192, 0:160]
    img = 600 + 8 * y + 3 * x
    img[:, 70:90] += 1500
    img[40:140, 20:60] -= 500
    return np.clip(img, 0, 4095).astype(np.uint16)


def _dataset(arr: np.ndarray, photometric: str = "MONOCHROME2") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    return ds


def _write(tmp: Path, name: str, syntax, photometric: str = "MONOCHROME2", preamble: bool = True) -> Path:
    arr = _pixels()
    ds = _dataset(arr, photometric)
    if syntax is not None:
        ds.compress(syntax, arr)
    path = tmp / name
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return path


def _encoder_available(syntax) -> bool:
    try:
        _dataset(_pixels()).compress(syntax, _pixels())
        return True
    except Exception:
        return False


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless], ids=["jpeg2000", "jpegls", "rle"])
def test_lossless_compressed_dicom_decodes_like_uncompressed(tmp_path, syntax):
    if not _encoder_available(syntax):
        pytest.skip(f"no encoder installed for {syntax.name}")
    plain = load_array(_write(tmp_path, "plain.dcm", None))
    packed = load_array(_write(tmp_path, "packed.dcm", syntax))
    np.testing.assert_allclose(packed, plain, atol=1e-6)
    assert packed.max() > 0.9 and packed.min() < 0.1  # the 12-bit range is used, not divided by 65535


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless], ids=["jpeg2000", "jpegls"])
def test_compressed_monochrome1_is_inverted(tmp_path, syntax):
    if not _encoder_available(syntax):
        pytest.skip(f"no encoder installed for {syntax.name}")
    m2 = load_array(_write(tmp_path, "m2.dcm", syntax, "MONOCHROME2"))
    m1 = load_array(_write(tmp_path, "m1.dcm", syntax, "MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_compressed_dicom_without_preamble_decodes(tmp_path):
    if not _encoder_available(JPEG2000Lossless):
        pytest.skip("no JPEG 2000 encoder")
    path = _write(tmp_path, "nopreamble.dcm", JPEG2000Lossless, preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    img = load_radiograph(path, target_size=64)
    assert img.mode == "L" and min(img.size) == 64
