"""Time read_labels on MIMIC-CXR-sized label, metadata and split files (synthetic, same columns).

Usage: python benchmarks/parse_mimic.py [--repeat N]

MIMIC-CXR is credentialed data, so the files are generated here at its real size
(227,827 labelled studies, 377,110 images) with its column names, and read the way
`--labels mimic-cxr-2.0.0-chexpert.csv.gz` reads them: the whole join, and the join
with `--split train --views PA,AP`.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mavl_cli.datasets.options import DatasetOptions, LabelSource  # noqa: E402
from mavl_cli.datasets.reader import read_labels
from mavl_cli.synthetic.layouts import MIMIC_LABEL_COLUMNS

STUDIES, IMAGES = 227_827, 377_110


def write_files(d: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    subj = np.sort(rng.integers(10_000_000, 20_000_000, STUDIES))
    study = 50_000_000 + np.arange(STUDIES)
    vals = rng.choice(np.array(["1.0", "0.0", "-1.0", ""]), size=(STUDIES, 14), p=[0.1, 0.2, 0.05, 0.65])
    lab = pd.DataFrame(vals, columns=list(MIMIC_LABEL_COLUMNS))
    lab.insert(0, "study_id", study)
    lab.insert(0, "subject_id", subj)
    k = np.sort(np.concatenate([np.arange(STUDIES), rng.integers(0, STUDIES, IMAGES - STUDIES)]))
    meta = pd.DataFrame({"dicom_id": [f"{i:08x}-{i * 7:08x}-{i * 13:08x}" for i in range(IMAGES)],
                         "subject_id": subj[k], "study_id": study[k],
                         "ViewPosition": rng.choice(["PA", "AP", "LATERAL", "LL", ""], IMAGES)})
    split = pd.DataFrame({"dicom_id": meta.dicom_id, "study_id": meta.study_id, "subject_id": meta.subject_id,
                          "split": rng.choice(["train", "validate", "test"], IMAGES, p=[0.98, 0.01, 0.01])})
    for name, df in (("chexpert", lab), ("metadata", meta), ("split", split)):
        (d / f"mimic-cxr-2.0.0-{name}.csv.gz").write_bytes(gzip.compress(df.to_csv(index=False).encode(), 6))
    return d / "mimic-cxr-2.0.0-chexpert.csv.gz"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        labels = write_files(Path(tmp))
        for opts in (DatasetOptions(), DatasetOptions(split="train", views=("PA", "AP"))):
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                table = read_labels(LabelSource(labels, opts))
                best = min(best, time.perf_counter() - t0)
            print(f"{opts.describe() or 'all images'}: {len(table):,} images x {len(table.names)} labels "
                  f"in {best:.2f} s (best of {args.repeat})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
