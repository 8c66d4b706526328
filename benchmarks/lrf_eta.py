"""Does the LRFL regulariser do what it claims, and does it help? Measured, with CIs.

``mavl train-lrf`` adds ``eta * sum(sv[keep:])`` of the batch's low-rank
feature matrix Z = ReLU(W LN(x)) to the BCE loss. This script trains LRF heads
with ``train-lrf``'s own code (``stages.train_lrf_stage``) on cached
EfficientNet-Lite0 features for several ``eta`` (and ``keep`` at the default
eta), over several seeds, and reports for each setting:

1. the spectrum of Z = head.embed(test features) in eval mode: tail share
   ``sum(sv[keep:]) / sum(sv)`` (beyond 8 and 16), effective rank
   ``exp(entropy(sv / sum(sv)))`` of Z and of column-centred Z (Z >= 0, so its
   top singular vector is mostly the mean), how many of the r ReLU units are
   alive (non-zero on some test image), the scale ``sum(sv)``, and the first
   epoch at which the training penalty was ~0;
2. test macro AUROC of the head's own classifier and of the full chain
   (``fuse`` defaults on the LRF embeddings; MiniLM-L6 text of the aspect
   descriptions phantoms6.json / nih14.json), with 95% patient-bootstrap CIs
   (seed 0), mean +- sd over seeds, and the paired difference vs ``eta=0``:
   mean over seeds, sd over seeds, and a 95% CI from resampling test
   patients (the same resample for both settings, seed-averaged).

A control row trains a narrower head (``--ranks``: rank 16, keep 16, eta 0),
to tell "low-rank penalty" apart from "fewer units".

Datasets and caches are those of ``benchmarks/aspects.py`` (600 phantoms,
seed 0, 256 px; the 64 px NIH set with the ``nih_split.py`` split), so an
existing ``--work`` folder is reused and nothing is embedded twice.

    python benchmarks/lrf_eta.py [--work DIR] [--seeds 0,1,2] [--etas 0,1e-4,1e-3,1e-2,1e-1] [--keeps 8]
                                 [--ranks 16] [--min-positive-patients 3] [--no-fuse]

A few minutes on 2 CPU cores once the image features are cached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_ETA, DEFAULT_KEEP, RANK = 1e-3, 16, 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def config_name(eta: float, keep: int, rank: int = 64) -> str:
    return f"eta={eta:g}, keep={keep}" + (f", rank={rank}" if rank != 64 else "")


# ------------------------------------------------------------------ measurements


def spectrum(z: np.ndarray, keep: int) -> dict[str, float]:
    """Singular-value summaries of Z [N, r] (what the penalty acts on) and of centred Z."""

    def erank(sv: np.ndarray) -> float:
        p = sv[sv > 0] / sv.sum() if sv.sum() > 0 else np.ones(1)
        return float(np.exp(-(p * np.log(p)).sum()))

    z = z.astype(np.float64)
    sv = np.linalg.svd(z, compute_uv=False)
    svc = np.linalg.svd(z - z.mean(0), compute_uv=False)
    tot = float(sv.sum())
    share = (lambda k: float(sv[k:].sum() / tot) if tot > 0 else 0.0)
    return {"tail_share_keep": share(keep), "tail_share_8": share(8), "tail_share_16": share(16),
            "erank": erank(sv), "erank_centred": erank(svc), "alive_units": int((z.max(0) > 0).sum()),
            "sv_sum": tot, "top1_share": float(sv[0] / tot) if tot > 0 else 0.0,
            "sv": [float(v) for v in sv[:24]]}


def boot_weights(groups: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, n_images] patient-resample multiplicities, shared by every setting (paired)."""
    from mavl_cli.evaluation.metrics import resample_weights

    _, inverse = np.unique(groups, return_inverse=True)
    return resample_weights(np.random.default_rng(seed), n_boot, inverse.ravel(), int(inverse.max()) + 1)


def boot_macro_auroc(w: np.ndarray, y: np.ndarray, s: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Macro AUROC per resample (labels lacking a class in a resample are left out, as evaluate does)."""
    import warnings

    from mavl_cli.evaluation.metrics import weighted_auroc_sorted

    aucs = np.full((w.shape[0], y.shape[1]), np.nan)
    for j in range(y.shape[1]):
        rows = np.flatnonzero(m[:, j])
        order = rows[np.argsort(s[rows, j], kind="stable")]
        ss = s[order, j]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(ss)) + 1))
        aucs[:, j] = weighted_auroc_sorted(w[:, order], y[order, j].astype(bool), starts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(aucs, axis=1)


def paired_diff(w: np.ndarray, te: Any, scores: dict[int, np.ndarray], base: dict[int, np.ndarray],
                point: dict[int, float], point_base: dict[int, float]) -> dict[str, Any]:
    """Seed-averaged AUROC difference vs the baseline, with a paired patient-bootstrap 95% CI."""
    seeds = sorted(set(scores) & set(base))
    d = np.array([point[s] - point_base[s] for s in seeds])
    per = np.mean([boot_macro_auroc(w, te.y, scores[s], te.mask) - boot_macro_auroc(w, te.y, base[s], te.mask)
                   for s in seeds], axis=0)
    per = per[np.isfinite(per)]
    lo, hi = np.percentile(per, [2.5, 97.5])
    return {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else None, "per_seed": d.tolist(),
            "ci": [float(lo), float(hi)], "p_le_0": float((per <= 0).mean())}


# ------------------------------------------------------------------ one dataset


def run_dataset(ds: Any, work: Path, text: Path | None, configs: list[tuple[float, int, int]], seeds: list[int],
                boot: int) -> dict[str, Any]:
    import aspects as A
    import torch

    from mavl_cli.core.options import LabelOptions, Validation
    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.models.lrf import head_from_tensors, lrf_embed
    from mavl_cli.stages.evaluate import score_labelled
    from mavl_cli.stages.train import fuse_stage, train_lrf_stage
    from mavl_cli.training.train import FusionConfig, LRFConfig

    runs = work / "lrf_eta"
    (runs / "runs").mkdir(parents=True, exist_ok=True)
    te = A.labelled(ds, "test")
    x_tr = A.labelled(ds, "train").x
    groups = np.asarray(te.groups) if te.groups is not None else np.arange(len(te.ids)).astype(str)
    w = boot_weights(groups, boot)
    out: dict[str, Any] = {"_init": {"alive_units_test": {}}}
    from mavl_cli.core.runtime import set_seed
    from mavl_cli.models.lrf import LRFHead

    for seed in seeds:  # the untrained head, as train_lrf builds it: how many ReLU units start alive?
        set_seed(seed)
        h0 = LRFHead(te.x.shape[1], RANK, len(ds.labels)).eval()
        with torch.no_grad():
            z0 = h0.embed(torch.from_numpy(te.x)).numpy()
        out["_init"]["alive_units_test"][seed] = int((z0.max(0) > 0).sum())
    scores: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for eta, keep, rank in configs:
        name = config_name(eta, keep, rank)
        rec: dict[str, Any] = {"eta": eta, "keep": keep, "rank": rank, "seeds": {}}
        for seed in seeds:
            t0 = time.perf_counter()
            tag = f"{ds.name}_eta{eta:g}_k{keep}_r{rank}_s{seed}"
            lrf = runs / "runs" / f"{tag}_lrf.safetensors"
            res = train_lrf_stage(str(ds.emb["train"]), str(ds.splits["train"]), str(lrf),
                                  LRFConfig(eta=eta, keep=keep, rank=rank, seed=seed), label_opts=LabelOptions(only=ds.labels),
                                  validation=Validation(str(ds.emb["val"]), str(ds.splits["val"])))
            hist = res.table
            head = read_file(str(lrf), expect="lrf-head").tensors
            z = lrf_embed(head, te.x)
            sp = spectrum(z, keep)
            sp["alive_units_train"] = int((lrf_embed(head, x_tr).max(0) > 0).sum())
            zero = [h["epoch"] for h in hist if h["tnn"] < 1e-3] if eta > 0 else []
            m: dict[str, Any] = {"spectrum": sp, "best_epoch": res.summary["best_epoch"],
                                 "epochs_run": res.summary["epochs_run"],
                                 "train_tnn_epoch1": hist[0]["tnn"] if eta > 0 else None,
                                 "penalty_zero_from_epoch": zero[0] if zero else None}
            with torch.no_grad():
                logits = head_from_tensors(head)(torch.from_numpy(te.x))[0].numpy()
            bs = boot if seed == seeds[0] else 0
            m["head"] = {**A.metrics(ds, logits, ds.labels, bs, te), "val": res.summary["val_macro_auroc"]}
            scores.setdefault(name, {}).setdefault("head", {})[seed] = logits.astype(np.float64)
            if text is not None:
                model = runs / "runs" / f"{tag}_fuse.safetensors"
                fres = fuse_stage(str(ds.emb["train"]), str(text), str(ds.splits["train"]), str(model),
                                  FusionConfig(seed=seed), lrf=str(lrf),
                                  validation=Validation(str(ds.emb["val"]), str(ds.splits["val"])))
                _, sc = score_labelled(str(model), str(ds.emb["test"]), str(ds.splits["test"]), "zeros", None)
                assert sc.names == ds.labels
                m["chain"] = {**A.metrics(ds, sc.scores, sc.names, bs, te), "val": fres.summary["val_macro_auroc"]}
                scores[name].setdefault("chain", {})[seed] = sc.scores.astype(np.float64)
            rec["seeds"][seed] = m
            log(f"{ds.name} {name} seed {seed}: tail {sp['tail_share_keep']:.3f}, erank {sp['erank']:.1f}, "
                f"alive {sp['alive_units']}, head {m['head']['macro_auroc']:.3f}"
                + (f", chain {m['chain']['macro_auroc']:.3f}" if "chain" in m else "")
                + f" ({time.perf_counter() - t0:.1f} s)")
        out[name] = rec
    base = config_name(0.0, DEFAULT_KEEP)
    if base in out:
        for name, rec in out.items():
            if name in (base, "_init"):
                continue
            for what in ("head", "chain"):
                if what not in scores[name]:
                    continue
                pt = {s: rec["seeds"][s][what]["macro_auroc"] for s in seeds}
                pb = {s: out[base]["seeds"][s][what]["macro_auroc"] for s in seeds}
                rec[f"{what}_vs_eta0"] = paired_diff(w, te, scores[name][what], scores[base][what], pt, pb)
    return out


# ------------------------------------------------------------------ output


def ms(vals: list[float], digits: int = 3) -> str:
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


def spectrum_table(res: dict[str, Any], seeds: list[int]) -> str:
    cols = ["setting", "tail share sv[keep:]/Σsv", "tail beyond 8", "tail beyond 16", "eff. rank of Z",
            "eff. rank (centred Z)", "alive units /rank (test)", "Σsv (scale)", "top-1 share",
            "penalty ~0 from epoch", "best epoch / run"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for name, rec in res.items():
        if name.startswith("_"):
            continue
        per = [rec["seeds"][s] for s in seeds]
        sp = [p["spectrum"] for p in per]
        zero = [p["penalty_zero_from_epoch"] for p in per]
        zcell = "n/a (eta 0)" if rec["eta"] == 0 else ", ".join("never" if z is None else str(z) for z in zero)
        row = [name, ms([x["tail_share_keep"] for x in sp]), ms([x["tail_share_8"] for x in sp]),
               ms([x["tail_share_16"] for x in sp]), ms([x["erank"] for x in sp], 1),
               ms([x["erank_centred"] for x in sp], 1), ms([x["alive_units"] for x in sp], 1),
               ms([x["sv_sum"] for x in sp], 0), ms([x["top1_share"] for x in sp], 2), zcell,
               ", ".join(f"{p['best_epoch']}/{p['epochs_run']}" for p in per)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def auroc_table(res: dict[str, Any], seeds: list[int], what: str) -> str:
    from aspects import fmt

    s0 = seeds[0]
    cols = ["setting", f"val macro AUROC ({what}, mean ± sd)", f"test macro AUROC seed {s0} [95% CI]",
            f"mean ± sd (seeds {','.join(map(str, seeds))})", "Δ vs eta=0: mean ± sd over seeds",
            "Δ 95% CI (paired patient bootstrap, seed-averaged)", "P(Δ ≤ 0)"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for name, rec in res.items():
        if name.startswith("_"):
            continue
        per = [rec["seeds"][s] for s in seeds]
        if what not in per[0]:
            continue
        first = per[0][what]
        ci = first.get("ci")
        d = rec.get(f"{what}_vs_eta0")
        row = [name, ms([p[what]["val"] for p in per]),
               f"{fmt(first['macro_auroc'])} [{fmt(ci[0])}–{fmt(ci[1])}]" if ci else fmt(first["macro_auroc"]),
               ms([p[what]["macro_auroc"] for p in per]),
               (f"{d['mean']:+.3f} ± {d['sd']:.3f}" if d["sd"] is not None else f"{d['mean']:+.3f}") if d else "(baseline)",
               f"{d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}" if d else "", f"{d['p_le_0']:.2f}" if d else ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mavl-aspects",
                    help="cache folder shared with benchmarks/aspects.py")
    ap.add_argument("--nih", type=Path, default=None, help="nih-cxr14-64px folder (default $MAVL_SHARED_DATA/nih-cxr14-64px)")
    ap.add_argument("--datasets", default="phantoms,nih")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--etas", default="0,1e-4,1e-3,1e-2,1e-1", help="etas tried at keep 16 (0 is the baseline)")
    ap.add_argument("--keeps", default="8", help="extra keeps tried at the default eta 1e-3")
    ap.add_argument("--ranks", default="16", help="control: narrower heads (rank R, keep R) without the penalty")
    ap.add_argument("--no-fuse", action="store_true", help="skip the full chain (head only)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--min-positives", type=int, default=5, help="drop labels with fewer positive images in train or test")
    ap.add_argument("--min-positive-patients", type=int, default=1,
                    help="also drop labels whose test positives come from fewer patients (1 = keep all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="results file (default WORK/lrf_eta_results.json)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    import aspects as A
    from nih_split import default_data

    from mavl_cli.core.home import mavl_home
    from mavl_cli.encoders.weights import ensure_demo_backbone, minilm_folder

    seeds = [int(s) for s in args.seeds.split(",")]
    etas = [float(e) for e in args.etas.split(",")]
    configs = ([(e, DEFAULT_KEEP, RANK) for e in etas]
               + [(DEFAULT_ETA, int(k), RANK) for k in args.keeps.split(",") if k and int(k) != DEFAULT_KEEP]
               + [(0.0, int(r), int(r)) for r in args.ranks.split(",") if r and int(r) != RANK])
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    weights = ensure_demo_backbone(mavl_home() / "weights" / A.BACKBONE)
    text_model = None if args.no_fuse else minilm_folder()
    print(f"LRF heads: train-lrf code, rank {RANK} unless stated, other settings default (50 epochs, batch 128, AdamW lr 1e-3 wd 1e-4, "
          f"dropout 0.1, early stopping on val macro AUROC, patience 10), on {A.BACKBONE} ImageNet features. "
          f"Chain: fuse defaults (aggregate mean, dim 256, 100 epochs) on MiniLM-L6 aspect descriptions. "
          f"Seeds {seeds}; CIs: {args.bootstrap} patient resamples. Spectrum: Z = head.embed(test features), eval mode.\n")
    out: dict[str, Any] = {"seeds": seeds, "configs": configs, "datasets": {}}
    t_all = time.perf_counter()
    for name in args.datasets.split(","):
        if name == "phantoms":
            ds = A.phantom_dataset(work)
        elif name == "nih":
            data = args.nih or default_data()
            if not (data / "labels.csv").exists():
                print(f"skipping NIH: {data} has no labels.csv (pass --nih or set MAVL_SHARED_DATA)\n")
                continue
            ds = A.nih_dataset(work, data)
        else:
            raise SystemExit(f"unknown dataset {name}")
        A.choose_labels(ds, args.min_positives)
        A.drop_few_patients(ds, args.min_positive_patients)
        A.embed_images(ds, work, weights)
        text = A.text_files(ds, work, text_model)["aspects"] if text_model else None
        res = run_dataset(ds, work, text, configs, seeds, args.bootstrap)
        te = A.labelled(ds, "test")
        out["datasets"][ds.name] = {"labels": ds.labels, "excluded": ds.excluded, "test_images": len(te.ids),
                                    "test_patients": len(set(te.groups or [])), "settings": res}
        print(f"## {ds.name}: {len(ds.labels)} labels, test {len(te.ids)} images / {len(set(te.groups or []))} patients\n")
        if ds.excluded:
            print("Excluded: " + "; ".join(f"{k}: {v}" for k, v in ds.excluded.items()) + "\n")
        print("### 1. Spectrum of Z on the test set (mean ± sd over seeds)\n")
        print(spectrum_table(res, seeds) + "\n")
        init = res["_init"]["alive_units_test"]
        print(f"Alive units of the untrained head (same seeds): {', '.join(str(init[s]) for s in seeds)} of {RANK}.\n")
        print("### 2a. LRF head's own classifier, test macro AUROC\n")
        print(auroc_table(res, seeds, "head") + "\n")
        if text_model:
            print("### 2b. Full chain (fuse defaults on the LRF embeddings), test macro AUROC\n")
            print(auroc_table(res, seeds, "chain") + "\n", flush=True)
        for what in ("head",) + (("chain",) if text_model else ()):
            val = {n: np.mean([r["seeds"][s][what]["val"] for s in seeds]) for n, r in res.items() if not n.startswith("_")}
            best = max(val, key=lambda n: val[n])
            out["datasets"][ds.name][f"best_on_val_{what}"] = best
            print(f"Best setting on validation ({what}, mean over seeds): {best} (val {val[best]:.3f}).")
        print()
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    dest = args.json or work / "lrf_eta_results.json"
    dest.write_text(json.dumps(A.clean(out), indent=1) + "\n")
    print(f"results: {dest} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
