"""Patient-grouped train/val/test split of the 64 px NIH ChestX-ray14 set, as CSVs.

No image is copied: each CSV's ``path`` column is relative to the dataset's
``images/`` folder, so the chain reads the images in place with
``mavl embed-images DATA/images --labels OUT/train.csv``.

Patients are shuffled with the seed, then each goes whole to the split that is
furthest below its share of *images* (60/20/20 by default). Filling by images
rather than counting patients matters here: one patient has 66 of the 749
films, so a split by patient count alone lands far from 60/20/20 in images.

    python benchmarks/nih_split.py [DATA] -o OUT [--seed 0]

DATA defaults to ``$MAVL_SHARED_DATA/nih-cxr14-64px`` (``/work/shared/data``
when the variable is unset). Writes train.csv, val.csv, test.csv (columns
``path``, ``Patient ID``, then the 14 findings and ``No Finding``) and
split.json (images, patients and positives per finding in each split).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


def default_data() -> Path:
    return Path(os.environ.get("MAVL_SHARED_DATA") or "/work/shared/data") / "nih-cxr14-64px"


def assign_patients(sizes: dict[str, int], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Patient -> split; whole patients, image counts close to ``fractions``."""
    fr = np.asarray(fractions, float)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    fr = fr / fr.sum()
    patients = sorted(sizes)
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    total = sum(sizes.values())
    filled = np.zeros(3)
    out: dict[str, str] = {}
    for p in order:
        k = int(np.argmax(fr * total - filled))  # furthest below its target
        out[p] = SPLITS[k]
        filled[k] += sizes[p]
    return out


def make_split(data: Path, out: Path, seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> dict:
    """Write the three CSVs and split.json into ``out``; returns the summary."""
    import pandas as pd

    data, out = Path(data), Path(out)
    labels = pd.read_csv(data / "labels.csv")
    meta = pd.read_csv(data / "metadata.csv", usecols=["path", "patient_id"])
    df = labels.merge(meta, on="path", how="left", validate="one_to_one")
    if df["patient_id"].isna().any():
        missing = df.loc[df["patient_id"].isna(), "path"].head(3).tolist()
        raise SystemExit(f"{data}/metadata.csv has no patient_id for {missing} ...")
    df["patient_id"] = df["patient_id"].astype(int).astype(str)
    assign = assign_patients(df.groupby("patient_id").size().to_dict(), fractions, seed)
    df["split"] = df["patient_id"].map(assign)
    findings = [c for c in labels.columns if c != "path"]
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"data": str(data), "seed": seed, "fractions": list(fractions), "splits": {}}
    for name in SPLITS:
        part = df[df["split"] == name]
        cols = ["path", "patient_id", *findings]
        part[cols].rename(columns={"patient_id": "Patient ID"}).to_csv(out / f"{name}.csv", index=False)
        summary["splits"][name] = {
            "images": int(len(part)), "patients": int(part["patient_id"].nunique()),
            "positives": {f: int(part[f].sum()) for f in findings},
        }
    (out / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", type=Path, default=None, help="nih-cxr14-64px folder (labels.csv, metadata.csv, images/)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="folder for train/val/test CSVs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data = args.data or default_data()
    if not (data / "labels.csv").exists():
        print(f"{data}: no labels.csv here (pass the nih-cxr14-64px folder or set MAVL_SHARED_DATA)", file=sys.stderr)
        return 2
    s = make_split(data, args.out, args.seed)
    for name, v in s["splits"].items():
        print(f"{name}: {v['images']} images, {v['patients']} patients, "
              + ", ".join(f"{k} {n}" for k, n in v["positives"].items() if k != "No Finding"))
    print(f"wrote {args.out}/train.csv, val.csv, test.csv, split.json (paths relative to {data / 'images'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
