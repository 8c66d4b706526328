"""MIMIC-CXR-JPG and MIMIC-CXR (DICOM): study-level labels joined with image metadata.

Images live at ``files/p{first two digits of subject_id}/p{subject_id}/s{study_id}/{dicom_id}.jpg``
(``.dcm`` in the DICOM release). Patient: ``subject_id`` (``p10000032`` in paths).
"""

from __future__ import annotations

import re

NAME = "mimic"

_PATIENT = re.compile(r"(?:^|/)p\d{2}/(p\d+)/s\d+/")


def patient(image_id: str) -> str | None:
    m = _PATIENT.search(image_id)
    return m.group(1) if m else None


def image_path(subject_id: int | str, study_id: int | str, dicom_id: str, suffix: str = ".jpg") -> str:
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}/s{study_id}/{dicom_id}{suffix}"
