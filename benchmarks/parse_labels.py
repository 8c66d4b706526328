"""Time read_labels on the real CheXpert and NIH ChestX-ray14 label files.

Usage: python benchmarks/parse_labels.py [--data DIR] [--repeat N]

DIR defaults to $MAVL_SHARED_DATA, else ../shared/data beside the repository.
The target is under 2 s per file; the script skips (exit 0) when files are absent,
so it is safe to run from a fresh clone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mavl_cli.datasets.reader import read_labels

FILES = ("chexpert_train.csv.gz", "nih_data_entry_2017_v2020.csv.gz")
TARGET_S = 2.0


def default_data_dir() -> Path:
    env = os.environ.get("MAVL_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="shared data folder holding labels/ (default: $MAVL_SHARED_DATA or ../shared/data)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per file; the best is reported")
    args = ap.parse_args(argv)
    data = args.data or default_data_dir()
    label_dir = data / "labels"

    found = [label_dir / f for f in FILES if (label_dir / f).is_file()]
    if not found:
        print(f"skipped: no label files under {label_dir} (pass --data or set MAVL_SHARED_DATA)")
        return 0
    for f in FILES:
        if not (label_dir / f).is_file():
            print(f"skipped {f}: not found under {label_dir}")

    slow = False
    for path in found:
        times = []
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            table = read_labels(path, uncertain="ignore")
            times.append(time.perf_counter() - t0)
        best = min(times)
        slow |= best >= TARGET_S
        positives = table.y.sum(axis=0)
        uncertain = int((~table.mask).sum())
        print(f"{path.name}: {best:.2f} s best of {len(times)} (first {times[0]:.2f} s), "
              f"{len(table.ids):,} rows, {len(table.names)} labels, source={table.source}, "
              f"{uncertain:,} uncertain entries, groups={'yes' if table.groups else 'no'}")
        for name, pos in zip(table.names, positives):
            print(f"    {name:<28s} {int(pos):>8,d} positive")
    print(f"target: under {TARGET_S:.0f} s per file: {'MISSED' if slow else 'met'}")
    return 1 if slow else 0


if __name__ == "__main__":
    raise SystemExit(main())
