"""Small data-set trees in each release's exact layout and column names, with phantom films.

Tests (and anyone trying a command before downloading 500 GB) get a MIMIC-CXR,
PadChest or VinDr-CXR folder whose files are named, placed and headed like the
real release, with :mod:`mavl_cli.synthetic.phantoms` films as the images, so the
adapters are exercised on the same code paths as on real data. Labels are the
phantom's true findings (names of the data set's own vocabulary).
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mavl_cli.datasets import chexpert
from mavl_cli.synthetic.phantoms import UNCERTAIN_BELOW, draw_findings, render_phantom

# CheXpert-labeler column order of mimic-cxr-2.0.0-chexpert.csv.gz
MIMIC_LABEL_COLUMNS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                       "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                       "Pneumonia", "Pneumothorax", "Support Devices")
MIMIC_METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                          "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                          "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")


@dataclass
class Layout:
    root: Path
    labels: Path
    files: dict[str, Path] = field(default_factory=dict)  # side files by role
    images: list[Path] = field(default_factory=list)
    truth: dict[str, dict[str, float]] = field(default_factory=dict)  # image id -> label -> value


def _film(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, float]]:
    findings = draw_findings(rng)
    arr, _ = render_phantom(rng, findings, size=size)
    return arr, findings


def _save(path: Path, arr: np.ndarray, uid: str | None = None) -> Path:

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".dcm", ".dicom") or uid is not None:
        write_dicom(path, arr, uid or path.stem)
    else:
        fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        path.write_bytes(buf.getvalue())
    return path


def write_dicom(path: Path, arr: np.ndarray, seed: str) -> Path:
    """An uncompressed 8-bit MONOCHROME2 DICOM file (with preamble); UIDs derived from ``seed``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[seed])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(header)
    wr.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def _value(findings: dict[str, float], name: str) -> float:
    if name not in findings:
        return 0.0
    return -1.0 if findings[name] < UNCERTAIN_BELOW else 1.0


# --------------------------------------------------------------------------- MIMIC-CXR


def write_mimic(root: Path, patients: int = 4, studies: int = 2, size: int = 32, seed: int = 0,
                dicom: bool = False, label_file: str = "mimic-cxr-2.0.0-chexpert.csv.gz") -> Layout:
    """MIMIC-CXR-JPG (or, with ``dicom``, MIMIC-CXR) under ``root``: files/pXX/pSUBJECT/sSTUDY/DICOM.jpg
    plus the chexpert (or negbio), metadata and split files, all gzipped, beside ``files/``.

    Each study has a PA (or, every third study, AP) film and a LATERAL film; the
    first patients are train, the last two validate and test.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    suffix = ".dcm" if dicom else ".jpg"
    label_rows, meta_rows, split_rows = [], [], []
    out = Layout(root=root, labels=root / label_file)
    names = ("train",) * max(1, patients - 2) + ("validate", "test")
    for p in range(patients):
        subject = 10000032 + 997 * p + (1_000_000 if p % 2 else 0)
        split = names[min(p, len(names) - 1)]
        for s in range(studies):
            study = 50000000 + 7919 * (p * studies + s)
            findings: dict[str, float] = {}
            views = ("AP" if (p * studies + s) % 3 == 2 else "PA", "LATERAL")
            for v, view in enumerate(views):
                arr, f = _film(rng, size)
                findings = findings or f  # one study, one set of findings
                dicom_id = f"{rng.integers(0, 16**8):08x}-{rng.integers(0, 16**8):08x}-{p:02d}{s:02d}{v:04d}"
                rel = f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom_id}{suffix}"
                out.images.append(_save(root / rel, arr))
                meta_rows.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, size, size,
                                  21800506, 213014.531, "CHEST (PA AND LAT)",
                                  "postero-anterior" if view == "PA" else "lateral", "Erect"])
                split_rows.append([dicom_id, study, subject, split])
                out.truth[rel] = {}
            values = {n: _value(findings, n) for n in MIMIC_LABEL_COLUMNS}
            values["No Finding"] = 1.0 if not findings else float("nan")
            for rel in [r for r in out.truth if f"/s{study}/" in r]:
                out.truth[rel] = values
            label_rows.append([subject, study, *("" if np.isnan(values[n]) else f"{values[n]:.1f}"
                                                 for n in MIMIC_LABEL_COLUMNS)])
    _write_csv(out.labels, ["subject_id", "study_id", *MIMIC_LABEL_COLUMNS], label_rows)
    out.files["metadata"] = _write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", list(MIMIC_METADATA_COLUMNS), meta_rows)
    out.files["split"] = _write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
                                    split_rows)
    return out


# --------------------------------------------------------------------------- PadChest

PADCHEST_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
PADCHEST_COLUMNS = ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
                    "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM", "ReportID",
                    "Report", "MethodLabel", "Labels", "Localizations", "LabelsLocalizationsBySentence", "labelCUIS",
                    "LocalizationsCUIS")
_TO_PADCHEST = {"Cardiomegaly": "cardiomegaly", "Pleural Effusion": "pleural effusion", "Pneumothorax": "pneumothorax",
                "Consolidation": "consolidation", "Edema": "pulmonary edema", "Atelectasis": "atelectasis"}


def write_padchest(root: Path, images: int = 8, size: int = 32, seed: int = 0) -> Layout:
    """PadChest: ``{ImageDir}/{ImageID}.png`` under ``root`` and the labels CSV (gzipped) beside the folders.

    Two images per patient (PA and lateral ``L``; every third patient AP); findings
    in PadChest's lower-case words, ``normal`` when there are none, and a
    PadChest-only finding (``aortic elongation``) on some images.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    out = Layout(root=root, labels=root / PADCHEST_FILE)
    rows = []
    for k in range(images):
        patient = 100000 + k // 2
        projection = ("AP" if (k // 2) % 3 == 2 else "PA") if k % 2 == 0 else "L"
        arr, findings = _film(rng, size)
        words = [_TO_PADCHEST[f] for f in findings]
        if k % 3 == 1:
            words.append("aortic elongation")
        image_id = f"{rng.integers(10**17, 10**18)}{k:04d}_{'abcdef'[k % 6]}x{k:02d}.png"
        image_dir = str(k % 2)
        rel = f"{image_dir}/{image_id}"
        out.images.append(_save(root / rel, arr))
        out.truth[rel] = {w: 1.0 for w in (words or ["normal"])}
        rows.append([image_id, image_dir, 20150101 + k, f"st{patient}", f"pt{patient}", 1950, "M", projection,
                     projection, "Manual review of DICOM fields", "No", "CR", 1000 + k, "informe", "Physician",
                     repr(words or ["normal"]), "[]", "[]", "[]", "[]"])
    _write_csv(out.labels, list(PADCHEST_COLUMNS), rows)
    return out


# --------------------------------------------------------------------------- VinDr-CXR

VINDR_FINDINGS = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                  "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                  "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
                  "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion",
                  "COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
_TO_VINDR = {"Pleural Effusion": "Pleural effusion"}


def write_vindr(root: Path, train: int = 4, test: int = 2, size: int = 32, seed: int = 0) -> Layout:
    """VinDr-CXR: ``annotations/image_labels_{train,test}.csv`` and ``{train,test}/{image_id}.dicom`` under ``root``.

    Three radiologists per training image; reader ``k`` misses a true finding
    on image ``k`` (so ``--vote any`` and ``majority`` differ where it matters)
    and reader R9 adds Calcification to the first image. ``truth`` holds the
    majority vote for train images and the consensus row for test images.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    out = Layout(root=root, labels=root / "annotations" / "image_labels_train.csv")
    header = ["image_id", "rad_id", *VINDR_FINDINGS]
    rows: dict[str, list] = {"train": [], "test": []}
    for split, n in (("train", train), ("test", test)):
        for k in range(n):
            arr, findings = _film(rng, size)
            image_id = f"{rng.integers(16**14, 16**15):015x}{k:016x}"
            rel = f"{split}/{image_id}.dicom"
            out.images.append(_save(root / rel, arr))
            marks = {_TO_VINDR.get(f, f) for f in findings}
            truth = {f: float(f in marks) for f in VINDR_FINDINGS}
            truth["No finding"] = float(not marks)
            out.truth[rel] = truth
            readers = [f"R{r}" for r in (8, 9, 10)] if split == "train" else [None]
            for r, rad in enumerate(readers):
                mine = dict(truth)
                if split == "train" and r == k % 3 and marks:
                    mine[sorted(marks)[0]] = 0.0  # one reader misses one finding
                if split == "train" and k == 0 and rad == "R9":
                    mine["Calcification"] = 1.0
                cells = [int(mine[f]) for f in VINDR_FINDINGS]
                rows[split].append([image_id, rad, *cells] if split == "train" else [image_id, *cells])
    _write_csv(out.labels, header, rows["train"])
    out.files["test"] = _write_csv(root / "annotations" / "image_labels_test.csv",
                                   [h for h in header if h != "rad_id"], rows["test"])
    return out


__all__ = ["Layout", "write_mimic", "write_padchest", "write_vindr", "write_dicom", "chexpert"]
