"""The Python half of ``benchmarks/device_check.sh``: one check per call, one summary line each.

  python benchmarks/device_check.py precision [--dry-run]   bf16/fp16 features vs fp32 (mean cosine >= 0.999)
  python benchmarks/device_check.py finetune  [--dry-run]   finetune-lrf, one epoch, bf16, on phantoms

``--dry-run`` runs the same code on CPU with a tiny ViT (fp32 only: half precision is refused on
CPU), to check the script without a GPU. Exit status 0 = PASS.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = '{"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}'


def _mavl(args: list[str]) -> None:
    from mavl_cli.cli.app import app

    try:
        app([str(a) for a in args], standalone_mode=True)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise SystemExit(f"`mavl {' '.join(map(str, args))}` failed with exit {exc.code}") from None


def _model(dry: bool) -> list[str]:
    return ["--backbone", "vit_tiny_patch16_224", "--random-init", "--model-args", TINY] if dry else \
        ["--backbone", "vit_base_patch16_224", "--random-init"]


def precision(dry: bool) -> bool:
    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.synthetic.phantoms import generate_phantoms

    dev = "cpu" if dry else "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        ps = generate_phantoms(t / "ph", n=24 if dry else 256, seed=0, size=64 if dry else 256)
        feats = {}
        for prec in (["fp32"] if dry else ["fp32", "bf16", "fp16"]):
            _mavl(["embed-images", ps.root / "images", *_model(dry), "--device", dev, "--precision", prec,
                   "-o", t / f"{prec}.st"])
            feats[prec] = read_file(t / f"{prec}.st").tensors["features"]
    ref = feats["fp32"]
    parts, ok = [], True
    for prec, f in feats.items():
        if prec == "fp32":
            continue
        cos = float(((f * ref).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1))).mean())
        ok &= cos >= 0.999
        parts.append(f"{prec} mean cosine {cos:.5f}")
    print(f"precision: {'PASS' if ok else 'FAIL'}: " + ("; ".join(parts) if parts else
          f"dry run: fp32 only on CPU, {ref.shape[0]} images x {ref.shape[1]}"))
    return ok


def finetune(dry: bool) -> bool:
    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.synthetic.phantoms import generate_phantoms

    dev, prec = ("cpu", "fp32") if dry else ("cuda", "bf16")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        ps = generate_phantoms(t / "ph", n=40 if dry else 600, seed=0, size=64 if dry else 256)
        t0 = time.perf_counter()
        _mavl(["finetune-lrf", ps.root, "--labels", ps.splits["train"], "--val-labels", ps.splits["val"], "-o", t / "h.st",
               "--backbone-out", t / "bb", *_model(dry), "--rank", "16", "--keep", "4", "--epochs", "1",
               "--batch-size", "8" if dry else "64", "--device", dev, "--precision", prec])
        secs = time.perf_counter() - t0
        head = read_file(t / "h.st")
    h = head.meta["history"][0]
    ok = bool(np.isfinite(h["bce"])) and head.meta["train_precision"] == prec
    print(f"finetune-lrf: {'PASS' if ok else 'FAIL'}: 1 epoch {prec} on {dev}, {head.meta['train_images']} phantoms, "
          f"bce {h['bce']:.4f}, val AUROC {h.get('val_auroc', float('nan')):.3f}, {secs:.0f}s")
    return ok


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("check", choices=["precision", "finetune"])
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    sys.exit(0 if {"precision": precision, "finetune": finetune}[a.check](a.dry_run) else 1)
