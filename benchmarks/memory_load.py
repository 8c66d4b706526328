"""Peak memory of `embed-images` and `evaluate` as the input grows.

Run: ``python benchmarks/memory_load.py [--images 1000,5000] [--rows 40000,200000]``.

Each measurement runs ``python -m mavl_cli ...`` in a fresh child of a small
wrapper process, which reports the child's peak resident set size
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``), so numbers never mix.
Inputs are generated in a temporary folder: random-blob 64 px PNGs embedded
with a 2-layer ViT (32 px input), and a scores file plus labels CSV for
``evaluate --scores``. Memory is bounded if the peak barely moves when N
grows five-fold; the script prints the peaks and the growth per 1,000 items.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumonia", "Pneumothorax",
          "Lung Opacity", "Lung Lesion", "Fracture", "Support Devices", "Enlarged Cardiomediastinum", "Pleural Other",
          "No Finding"]
VIT_ARGS = {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}
REPO = Path(__file__).resolve().parents[1]

_WRAPPER = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
if r.returncode:
    sys.stderr.write(r.stderr.decode(errors="replace")[-2000:])
    sys.exit(r.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mib(args: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of ``python -m mavl_cli ARGS`` run in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MAVL_HOME": str(cwd / "home"),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, "-m", "mavl_cli", *args],
                         capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode:
        raise SystemExit(f"mavl {' '.join(args[:2])} failed:\n{out.stderr}")
    return int(out.stdout.strip()) / 1024, time.perf_counter() - t0  # ru_maxrss is KiB on Linux


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` distinct 64 px gray PNGs (a few soft blobs on noise), written once and reused."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(len(list(folder.glob("*.png"))), n):
        img = rng.normal(90, 12, (64, 64))
        for _ in range(3):
            cy, cx, r = rng.uniform(8, 56), rng.uniform(8, 56), rng.uniform(4, 14)
            img += 80 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(folder / f"img{i:06d}.png", optimize=False)
    return folder


def make_vit(folder: Path) -> Path:
    import timm
    import torch

    from mavl_cli.encoders.timm import save_local_backbone

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_ARGS)
    return save_local_backbone(model, "vit_tiny_patch16_224", folder, VIT_ARGS)


def make_scores(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """A scores file and a CheXpert-style labels CSV with ``n`` rows (about 20% uncertain or blank)."""
    from mavl_cli.io.mavlfile import write_file

    rng = np.random.default_rng(seed)
    ids = [f"patient{i // 3:06d}/study{i % 3 + 1}/view1_frontal.jpg" for i in range(n)]
    y = (rng.random((n, len(LABELS))) < 0.15).astype(np.float32)
    scores = np.clip(0.35 * y + rng.random((n, len(LABELS))) * 0.65, 0, 1).astype(np.float32)
    sf = folder / f"scores_{n}.st"
    write_file(sf, "scores", {"scores": scores, "thresholds": np.full(len(LABELS), 0.5, np.float32)},
                        {"ids": ids, "labels": LABELS, "command": "benchmark"})
    cells = np.where(y == 1, "1.0", "0.0").astype(object)
    cells[rng.random(cells.shape) < 0.1] = "-1.0"
    cells[rng.random(cells.shape) < 0.1] = ""
    csv = folder / f"labels_{n}.csv"
    with open(csv, "w") as fh:
        fh.write("Path," + ",".join(LABELS) + "\n")
        for i in range(n):
            fh.write(ids[i] + "," + ",".join(cells[i]) + "\n")
    return sf, csv


def _growth(points: list[tuple[int, float]]) -> str:
    (n0, m0), (n1, m1) = points[0], points[-1]
    return f"{(m1 - m0) / ((n1 - n0) / 1000):+.3f} MiB per 1,000 ({m1 / m0:.2f}x peak for {n1 / n0:.0f}x items)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="1000,5000", help="comma-separated image counts for embed-images")
    ap.add_argument("--rows", default="40000,200000", help="comma-separated row counts for evaluate --scores")
    ap.add_argument("--workdir", default=None, help="keep generated inputs here (default: a temporary folder)")
    args = ap.parse_args()
    image_counts = [int(x) for x in args.images.split(",") if x]
    row_counts = [int(x) for x in args.rows.split(",") if x]
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, list] = {"embed-images": [], "evaluate": []}

    vit = make_vit(work / "vit")
    for n in image_counts:
        t0 = time.perf_counter()
        imgs = make_images(work / f"images_{n}", n)
        gen = time.perf_counter() - t0
        peak, secs = peak_rss_mib(["embed-images", str(imgs), "--backbone", "vit_tiny_patch16_224", "--weights", str(vit),
                                   "--device", "cpu", "--batch-size", "64", "-o", str(work / f"emb_{n}.st")], work)
        results["embed-images"].append((n, peak))
        print(f"embed-images {n:>7,} images: peak RSS {peak:7.1f} MiB, {secs:6.1f} s ({n / secs:6.1f} img/s incl. start-up;"
              f" inputs made in {gen:.1f} s)", flush=True)
    for n in row_counts:
        sf, csv = make_scores(work, n)
        peak, secs = peak_rss_mib(["evaluate", "--scores", str(sf), "--labels", str(csv), "--json"], work)
        results["evaluate"].append((n, peak))
        print(f"evaluate     {n:>7,} rows:   peak RSS {peak:7.1f} MiB, {secs:6.1f} s", flush=True)
    for name, pts in results.items():
        if len(pts) > 1:
            print(f"{name}: growth {_growth(pts)}")
    print(json.dumps(results))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
