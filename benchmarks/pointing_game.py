"""Do the explanation maps point at the findings? Pointing game and IoU on held-out phantoms.

The model is the demo's: 600 phantoms (seed 0, 256 px, now with ``--masks``),
ImageNet EfficientNet-Lite0 features, MiniLM-L6 aspect text, ``train-lrf`` +
``fuse`` + ``tune-threshold`` exactly as ``mavl demo`` runs them
(``mavl_cli.stages.demo.demo_commands``). Then, for both methods, the very commands
a user types:

    mavl predict TEST_IMAGES... --model model_tuned.safetensors --heatmap maps/METHOD --heatmap-labels all
    mavl evaluate-maps maps/METHOD --masks phantoms/masks --json

so `mavl evaluate-maps` reproduces every figure here from the written maps.
Every finding drawn in a test film (its mask exists) is one case, whether or
not the model called it positive.

Timing: on ``--time-images`` test films, one pooled forward pass (what a
prediction costs) against the maps of one finding and of all six findings
(their own forward pass, the head, the backward passes, and the mapping back to
original pixels), on CPU, median of runs (``--threads`` torch threads).

Which map variant to ship was chosen on validation films only
(``benchmarks/map_variants.py``); this script reports the test films.

Writes ``--work``/pointing_game.json and, with ``--figure``, a grid of example
overlays (film with the true region outlined, then each method).

    python benchmarks/pointing_game.py [--work DIR] [--n 600] [--epochs 100] [--figure docs/heatmaps.png]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mavl_cli.io.mavlfile import MAP_METHODS as ALL_METHODS

MAP_METHODS = ALL_METHODS  # the ones this run scores (--methods)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(args: list) -> str:
    """Run one mavl command in-process; its stdout."""
    from typer.testing import CliRunner

    from mavl_cli.cli.app import app

    args = [str(a) for a in args]
    log("$ mavl " + " ".join(a if len(a) < 60 else a[:57] + "..." for a in args[:12]) + (" ..." if len(args) > 12 else ""))
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    if r.exit_code != 0:
        raise SystemExit(f"mavl {args[0]} failed: {r.stderr}")
    return r.stdout


def train(work: Path, n: int, epochs: int, seed: int) -> Path:
    from mavl_cli.core.home import mavl_home
    from mavl_cli.encoders.weights import ensure_demo_backbone, minilm_folder
    from mavl_cli.stages.demo import DEMO_BACKBONE, demo_commands

    model = work / "model_tuned.safetensors"
    if model.exists() and (work / "phantoms" / "masks").is_dir():
        log(f"reusing {model}")
        return model
    if not (work / "phantoms" / "masks").is_dir():
        cli(["phantoms", work / "phantoms", "-n", n, "--seed", seed, "--size", 256, "--masks"])
    weights = ensure_demo_backbone(mavl_home() / "weights" / DEMO_BACKBONE)
    for cmd in demo_commands(work, weights, minilm_folder(), epochs, seed):
        if cmd[0] == "evaluate":
            cmd = [c for c in cmd if c not in ("--plot", work / "report.png")]
        elif Path(cmd[cmd.index("-o") + 1]).exists():  # an interrupted run resumes where it stopped
            log(f"reusing {cmd[cmd.index('-o') + 1]}")
            continue
        cli(cmd)
    return model


def test_images(work: Path) -> list[Path]:
    with open(work / "phantoms" / "test.csv", newline="") as fh:
        return [work / "phantoms" / r["Path"] for r in csv.DictReader(fh)]


def timing(model_path: Path, images: list[Path], repeats: int) -> dict:
    import torch

    from mavl_cli.encoders.preprocess import normalize_batch, stack_batch
    from mavl_cli.explain.heatmaps import build_map_model, image_input, needs_grad
    from mavl_cli.explain.maps import to_original
    from mavl_cli.models.mavlmodel import image_encoder
    from mavl_cli.models.modelfile import load_model

    model = load_model(model_path)
    net, prep = image_encoder(model.meta)
    mm = build_map_model(model, net, prep)
    labels = list(range(len(model.labels)))
    t = {"forward": [], **{m: [] for m in MAP_METHODS}, **{f"{m}_one": [] for m in MAP_METHODS}}
    for path in images:
        _, crop, geom = image_input(path, mm.data_config)
        x = normalize_batch(stack_batch([crop]), mm.data_config).contiguous()
        with torch.no_grad():
            net(x)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                mm.logits(net(x))
            t["forward"].append(time.perf_counter() - t0)
            for method in MAP_METHODS:
                for key, which in ((method, labels), (f"{method}_one", labels[:1])):
                    t0 = time.perf_counter()
                    with torch.enable_grad() if needs_grad(method) else torch.no_grad():
                        to_original(mm.maps(x, method, which), geom)
                    t[key].append(time.perf_counter() - t0)
    fwd = float(np.median(t["forward"]))
    out = {"threads": torch.get_num_threads(), "images": len(images), "repeats": repeats, "forward_ms": 1000 * fwd}
    for method in MAP_METHODS:
        for key in (method, f"{method}_one"):
            med = float(np.median(t[key]))
            out[f"{key}_ms"] = 1000 * med
            out[f"{key}_x_forward"] = med / fwd
    return out


def called_positive(work: Path, folder: Path, model_path: Path) -> dict:
    """Hit rate on the cases the model called positive (score >= its tuned threshold): the findings
    `mavl predict --heatmap` maps by default. Peaks and scores come from the maps files' metadata."""
    from PIL import Image

    from mavl_cli.explain.maps import label_slug, read_maps_dir, stem_of
    from mavl_cli.models.modelfile import load_model

    model = load_model(model_path)
    th = dict(zip(model.labels, np.asarray(model.thresholds, float)))
    hits: dict[str, list[int]] = {}
    for f in read_maps_dir(folder):
        for lab, (x, y), score in zip(f.labels(), f.meta["peaks"], f.meta["scores"]):
            mpath = work / "phantoms" / "masks" / f"{stem_of(f)}.{label_slug(lab)}.png"
            if score < th[lab] or not mpath.exists():
                continue
            region = np.asarray(Image.open(mpath)) > 0
            if region.any():
                hits.setdefault(lab, []).append(int(region[y, x]))
    out = {lab: {"cases": len(v), "hit_rate": float(np.mean(v))} for lab, v in sorted(hits.items())}
    allv = [h for v in hits.values() for h in v]
    out["overall"] = {"cases": len(allv), "hit_rate": float(np.mean(allv)) if allv else float("nan")}
    return out


def figure(work: Path, out: Path, per_label: int = 1) -> None:
    """Rows: examples of different findings; columns: film + true region, then each method."""
    from PIL import Image, ImageDraw

    from mavl_cli.explain.maps import label_slug, overlay
    from mavl_cli.io.mavlfile import read_file

    masks = work / "phantoms" / "masks"
    rows = []
    seen: dict[str, int] = {}
    for img in test_images(work):
        for m in sorted(masks.glob(f"{img.stem}.*.png")):
            lab_slug = m.name[len(img.stem) + 1 : -4]
            if seen.get(lab_slug, 0) >= per_label:
                continue
            files = {meth: work / "maps" / meth / f"{img.stem}.maps.safetensors" for meth in MAP_METHODS}
            if not all(f.exists() for f in files.values()):
                continue
            seen[lab_slug] = seen.get(lab_slug, 0) + 1
            rows.append((img, m, lab_slug, files))
    film_size = 256
    label_h = 18
    cols = 1 + len(MAP_METHODS)
    sheet = Image.new("RGB", (cols * film_size, len(rows) * (film_size + label_h) + label_h), "white")
    d = ImageDraw.Draw(sheet)
    for j, title in enumerate(("film, true region outlined", *MAP_METHODS)):
        d.text((j * film_size + 6, 3), title, fill="black")
    for i, (img, mpath, lab_slug, files) in enumerate(rows):
        top = label_h + i * (film_size + label_h)
        film = Image.open(img).convert("L")
        region = np.asarray(Image.open(mpath)) > 0
        edge = region & ~(np.roll(region, 1, 0) & np.roll(region, -1, 0) & np.roll(region, 1, 1) & np.roll(region, -1, 1))
        base = np.stack([np.asarray(film)] * 3, -1).copy()
        base[edge] = (0, 255, 0)
        tiles = [Image.fromarray(base)]
        for meth in MAP_METHODS:
            f = read_file(files[meth], expect="maps")
            k = [label_slug(lab) for lab in f.labels()].index(lab_slug)
            ov = np.asarray(overlay(film, f.tensors["maps"][k])).copy()
            ov[edge] = (0, 255, 0)
            tiles.append(Image.fromarray(ov))
        for j, t in enumerate(tiles):
            sheet.paste(t.resize((film_size, film_size)), (j * film_size, top + label_h))
        d.text((6, top + 3), f"{lab_slug.replace('_', ' ')} - {img.stem}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(out, optimize=True)  # a quarter of the RGB bytes
    log(f"figure -> {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mavl-pointing")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--max-images", type=int, default=0, help="Only the first N test films (0: all).")
    ap.add_argument("--time-images", type=int, default=5)
    ap.add_argument("--time-repeats", type=int, default=3)
    ap.add_argument("--figure", type=Path, default=None)
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated --heatmap-method values")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the timing (0: torch's default)")
    a = ap.parse_args()
    import torch

    global MAP_METHODS
    MAP_METHODS = tuple(m for m in a.methods.split(",") if m)
    if a.threads:
        torch.set_num_threads(a.threads)

    torch.manual_seed(a.seed)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = train(work, a.n, a.epochs, a.seed)
    images = test_images(work)
    if a.max_images:
        images = images[: a.max_images]
    result: dict = {"model": str(model), "test_images": len(images), "methods": {}}
    for method in MAP_METHODS:
        out = work / "maps" / method
        t1 = time.perf_counter()
        if not (out.is_dir() and len(list(out.glob("*.maps.safetensors"))) == len(images)):
            cli(["predict", *images, "--model", model, "--heatmap", out, "--heatmap-labels", "all",
                 "--heatmap-method", method, "--json"])
        rep = json.loads(cli(["evaluate-maps", out, "--masks", work / "phantoms" / "masks", "--json",
                              "--bootstrap", a.bootstrap, "--seed", a.seed]))
        rep["seconds"] = time.perf_counter() - t1
        rep["called_positive"] = called_positive(work, out, model)
        result["methods"][method] = rep
    result["timing"] = timing(model, images[: a.time_images], a.time_repeats)
    result["seconds"] = time.perf_counter() - t0
    (work / "pointing_game.json").write_text(json.dumps(result, indent=2))
    print(f"\n{'finding':<18}" + "".join(f"{m + ' hit':>26}{'IoU':>7}" for m in MAP_METHODS))
    labels = list(result["methods"][MAP_METHODS[0]]["per_label"])
    for lab in labels + ["overall"]:
        cells = []
        for m in MAP_METHODS:
            r = result["methods"][m]["per_label"].get(lab) if lab != "overall" else result["methods"][m]["overall"]
            ci = r.get("hit_rate_ci", [float("nan")] * 2)
            cells.append(f"{r['hit_rate']:.2f} [{ci[0]:.2f},{ci[1]:.2f}]".rjust(26) + f"{r['iou']:.3f}".rjust(7))
        first = result["methods"][MAP_METHODS[0]]
        n = (first["per_label"].get(lab) or first["overall"])["images"]
        print(f"{lab + f' ({n})':<18}" + "".join(cells))
    print("\nhit rate on the cases the model called positive (cases):")
    for lab in labels + ["overall"]:
        print(f"{lab:<18}" + "".join(
            f"{result['methods'][m]['called_positive'].get(lab, {}).get('hit_rate', float('nan')):>12.2f}"
            f" ({result['methods'][m]['called_positive'].get(lab, {}).get('cases', 0)})" for m in MAP_METHODS))
    print(json.dumps(result["timing"], indent=2))
    if a.figure:
        figure(work, a.figure)
    log(f"done in {result['seconds']:.0f} s; {work / 'pointing_game.json'}")


if __name__ == "__main__":
    main()
