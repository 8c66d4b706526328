"""Does the OOD flag catch images unlike the training data, without flagging ordinary ones? Measured.

Two models, both on real pretrained encoders installed as packages (ImageNet
EfficientNet-Lite0 for images, MiniLM-L6 for text), both scored through the
same code as ``mavl predict`` (``embed_images_stage`` -> ``LoadedModel.to_fusion_input``
-> ``ood.assess_model``, default ``--ood-threshold`` 99):

1. **The demo's model** (``mavl demo``: 600 phantoms, seed 0; OOD reference =
   its 110 validation phantoms). False-positive rate on the held-out test
   phantoms; detection rate on the real NIH films, and on inverted, rotated
   (90 degrees), blank, noise, natural-photo and corner-crop images made from
   the phantoms and scikit-learn's sample photos.
2. **A model trained on the 64 px NIH films** (``benchmarks/nih_split.py``
   patient split, seed 0; train-lrf + fuse with the validation split, labels
   with at least 5 training positives). False-positive rate on the NIH test
   split; detection of inverted, rotated, blank, noise, natural and phantom images.

Goal: at most 5% false positives on in-distribution test images, at least
95% detection per out-of-distribution kind.

    python benchmarks/ood.py [--data DATA] [--work DIR] [--out results.json]

DATA is the shared data folder (``$MAVL_SHARED_DATA``, default ``/work/shared/data``);
without the NIH films the NIH parts are skipped and said so. Embeddings are
cached in ``--work``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BACKBONE = "tf_efficientnet_lite0"
N_SYNTH = 40  # blank, noise and natural images per kind
MIN_POS = 5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ image sets


def _gray(p: Path) -> np.ndarray:
    return np.asarray(Image.open(p).convert("L"))


def _save_all(folder: Path, arrays: list[tuple[str, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays:
        Image.fromarray(a.astype(np.uint8)).save(folder / name)
    (folder / ".done").write_text("ok\n")
    return folder


def derived(folder: Path, sources: list[Path], fn: Callable[[np.ndarray], np.ndarray]) -> Path:
    if not (folder / ".done").exists():
        _save_all(folder, [(f"{i:04d}_{p.stem}.png", fn(_gray(p))) for i, p in enumerate(sources)])
    return folder


def corner(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    return np.asarray(Image.fromarray(a[: h // 3, : w // 3]).resize((w, h), Image.Resampling.BILINEAR))


def blank_images(folder: Path, size: int) -> Path:
    if not (folder / ".done").exists():
        levels = np.linspace(0, 255, N_SYNTH)
        _save_all(folder, [(f"blank_{i:03d}.png", np.full((size, size), v)) for i, v in enumerate(levels)])
    return folder


def noise_images(folder: Path, size: int, seed: int = 0) -> Path:
    if not (folder / ".done").exists():
        rng = np.random.default_rng(seed)
        out = []
        for i in range(N_SYNTH):
            if i % 2:  # uniform white noise
                a = rng.integers(0, 256, (size, size))
            else:  # gaussian noise around a random grey
                a = np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (size, size)), 0, 255)
            out.append((f"noise_{i:03d}.png", a))
        _save_all(folder, out)
    return folder


def natural_images(folder: Path, size: int, seed: int = 0) -> Path:
    """Random square crops of scikit-learn's two sample photos (china.jpg, flower.jpg), in colour."""
    if not (folder / ".done").exists():
        from sklearn.datasets import load_sample_images

        rng = np.random.default_rng(seed)
        photos = load_sample_images().images
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(N_SYNTH):
            img = photos[i % len(photos)]
            h, w = img.shape[:2]
            s = int(rng.integers(min(h, w) // 3, min(h, w)))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            Image.fromarray(img[y : y + s, x : x + s]).resize((size, size), Image.Resampling.BILINEAR).save(folder / f"natural_{i:03d}.png")
        (folder / ".done").write_text("ok\n")
    return folder


# ------------------------------------------------------------------ models


def demo_model(work: Path, n: int, epochs: int, seed: int, weights: Path, text_model: Path) -> Path:
    """The demo's chain (``mavl_cli.stages.demo.demo_steps``, the stages ``mavl demo`` runs), resumable."""
    from mavl_cli.stages.demo import demo_steps, phantoms_step, run_step

    d = work / "demo"
    model = d / "model_tuned.safetensors"
    if model.exists():
        return model
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "phantoms" / "test.csv").exists():
        run_step(phantoms_step(d / "phantoms", n, seed, 256))
    for step in demo_steps(d, weights, text_model, epochs, seed):
        cmd = step.argv
        out = Path(cmd[cmd.index("-o") + 1]) if "-o" in cmd else None
        if cmd[0] == "evaluate" or (out is not None and out.exists()):
            continue
        run_step(step)
    return model


def split_rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def nih_model(work: Path, data: Path, weights: Path, text_model: Path, seed: int) -> tuple[Path, Path, list[Path]]:
    """Train-lrf + fuse on the NIH train split (validation: the val split). Returns (model, test embeddings, test images)."""
    from nih_split import make_split

    from mavl_cli.core.options import (
        ImageList,
        LabelOptions,
        RunOptions,
        TextSpec,
        Validation,
    )
    from mavl_cli.datasets.reader import read_labels
    from mavl_cli.encoders.spec import EncoderSpec
    from mavl_cli.stages.demo import descriptions_path
    from mavl_cli.stages.embed import embed_images_stage
    from mavl_cli.stages.text import embed_text_stage
    from mavl_cli.stages.train import fuse_stage, train_lrf_stage
    from mavl_cli.training.train import FusionConfig, LRFConfig

    nih = data / "nih-cxr14-64px"
    split = work / "nih_split_s0"
    if not (split / "test.csv").exists():
        make_split(nih, split, seed=0)
    emb = {}
    for s in ("train", "val", "test"):
        emb[s] = work / f"nih_{s}_img.safetensors"
        if not emb[s].exists():
            log(f"embedding NIH {s}")
            embed_images_stage(ImageList([str(nih / "images")], str(split / f"{s}.csv")), str(emb[s]), EncoderSpec.parse(BACKBONE, weights))
    tr = read_labels(split / "train.csv", uncertain="zeros")
    desc = json.loads(descriptions_path("nih14.json").read_text())
    keep = [lab for lab in desc if lab in tr.names and (tr.y[:, tr.names.index(lab)] * tr.mask[:, tr.names.index(lab)]).sum() >= MIN_POS]
    src = work / "nih_desc.json"
    src.write_text(json.dumps({lab: desc[lab] for lab in keep}, indent=1))
    text = work / "nih_text.safetensors"
    if not text.exists():
        embed_text_stage(str(src), str(text), TextSpec(str(text_model)), RunOptions(device="cpu"))
    lrf, model = work / "nih_lrf.safetensors", work / "nih_model.safetensors"
    if not model.exists():
        log(f"training the NIH model on {len(keep)} labels: {', '.join(keep)}")
        validation = Validation(str(emb["val"]), str(split / "val.csv"))
        train_lrf_stage(str(emb["train"]), str(split / "train.csv"), str(lrf), LRFConfig(seed=seed), label_opts=LabelOptions(only=keep),
                        validation=validation)
        fuse_stage(str(emb["train"]), str(text), str(split / "train.csv"), str(model), FusionConfig(seed=seed), lrf=str(lrf),
                   validation=validation)
    tests = [nih / "images" / r["path"] for r in split_rows(split / "test.csv")]
    return model, emb["test"], tests


# ------------------------------------------------------------------ measuring


def embed_folder(folder: Path, out: Path, weights: Path) -> Path:
    from mavl_cli.encoders.spec import EncoderSpec
    from mavl_cli.stages.embed import embed_images_stage

    if not out.exists():
        t0 = time.perf_counter()
        embed_images_stage([str(folder)], str(out), EncoderSpec.parse(BACKBONE, weights))
        log(f"embedded {folder.name} in {time.perf_counter() - t0:.0f} s")
    return out


def flag_rate(model_path: Path, emb_paths: Path | list[Path], percentile: float | None = None) -> dict[str, Any]:
    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.models.modelfile import load_model
    from mavl_cli.trust import ood

    model = load_model(model_path)
    files = [read_file(p, expect="image-embeddings") for p in (emb_paths if isinstance(emb_paths, list) else [emb_paths])]
    x = np.concatenate([model.to_fusion_input(f) for f in files])
    a = ood.assess_model(model, x, percentile)
    if a is None:
        raise SystemExit(f"{model_path}: no OOD statistics")
    return {"n": int(len(a.flag)), "flagged": int(a.flag.sum()), "rate": float(a.flag.mean()),
            "median_score": float(np.median(a.score)), "cutoff": a.cutoff}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mavl_cli.core.home import mavl_home
    from mavl_cli.encoders.weights import ensure_demo_backbone, minilm_folder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    weights = ensure_demo_backbone(mavl_home() / "weights" / BACKBONE)
    text_model = minilm_folder()
    data: Path = args.data
    have_nih = (data / "nih-cxr14-64px" / "labels.csv").exists()
    if not have_nih:
        log(f"{data}: no nih-cxr14-64px here; the NIH rows are skipped")
    sets = work / "sets"
    results: dict[str, Any] = {"percentile": 99.0, "models": {}}

    # ---- 1. the demo's model
    model = demo_model(work, args.n, args.epochs, args.seed, weights, text_model)
    demo = work / "demo"
    ph_test = [demo / "phantoms" / r["Path"] for r in split_rows(demo / "phantoms" / "test.csv")]
    size = _gray(ph_test[0]).shape[0]
    kinds: dict[str, Path] = {
        "inverted": derived(sets / "phantom_inverted", ph_test, lambda a: 255 - a),
        "rotated 90°": derived(sets / "phantom_rotated", ph_test, lambda a: np.rot90(a).copy()),
        "blank": blank_images(sets / "blank", size),
        "noise": noise_images(sets / "noise", size),
        "natural photos": natural_images(sets / "natural", size),
        "corner crops": derived(sets / "phantom_corner", ph_test, corner),
    }
    emb: dict[str, Any] = {k: embed_folder(v, work / f"emb_{v.name}.safetensors", weights) for k, v in kinds.items()}
    nih = nih_model(work, data, weights, text_model, args.seed) if have_nih else None
    if nih is not None:  # the real NIH films: all 749, i.e. the three split files the NIH model is trained from
        emb = {"real NIH films": [work / f"nih_{s}_img.safetensors" for s in ("train", "val", "test")], **emb}
    r1: dict[str, Any] = {"model": str(model), "in_distribution": {"held-out phantoms (test split)": flag_rate(model, demo / "test_img.safetensors")}}
    r1["out_of_distribution"] = {k: flag_rate(model, e) for k, e in emb.items()}
    results["models"]["demo (phantoms)"] = r1

    # ---- 2. a model trained on NIH films (blank, noise and photos: the same images as above)
    if nih is not None:
        nmodel, ntest_emb, ntest = nih
        nemb = {
            "inverted": embed_folder(derived(sets / "nih_inverted", ntest, lambda a: 255 - a), work / "emb_nih_inverted.safetensors", weights),
            "rotated 90°": embed_folder(derived(sets / "nih_rotated", ntest, lambda a: np.rot90(a).copy()), work / "emb_nih_rotated.safetensors", weights),
            **{k: emb[k] for k in ("blank", "noise", "natural photos")},
            "phantoms (test split)": demo / "test_img.safetensors",
        }
        r2: dict[str, Any] = {"model": str(nmodel), "in_distribution": {"NIH test split": flag_rate(nmodel, ntest_emb)}}
        r2["out_of_distribution"] = {k: flag_rate(nmodel, e) for k, e in nemb.items()}
        results["models"]["NIH 64 px"] = r2
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| model | images | kind | n | flagged | rate | goal | met |", "| --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
    for name, r in results["models"].items():
        for k, v in r["in_distribution"].items():
            lines.append(f"| {name} | {k} | in-distribution (false positives) | {v['n']} | {v['flagged']} | {100 * v['rate']:.1f}% | <= 5% | {'yes' if v['rate'] <= 0.05 else 'no'} |")
        for k, v in r["out_of_distribution"].items():
            lines.append(f"| {name} | {k} | out-of-distribution (detection) | {v['n']} | {v['flagged']} | {100 * v['rate']:.1f}% | >= 95% | {'yes' if v['rate'] >= 0.95 else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MAVL_SHARED_DATA") or "/work/shared/data"))
    ap.add_argument("--work", type=Path, default=Path("bench-ood"))
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("-n", type=int, default=600, help="phantoms in the demo")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
