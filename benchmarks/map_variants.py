"""Explore explanation-map variants in-process, scored by the pointing game on VALIDATION films.

Loads the pointing-game benchmark's model (``benchmarks/pointing_game.py --work DIR``
trains it as the demo does) and the EfficientNet-Lite0 encoder once, runs each
validation film once per input geometry, caches the feature maps and the
gradients of every finding's logit, and scores many map variants from the cache.
Choosing a variant here never looks at the test films.

    python benchmarks/map_variants.py --work /tmp/mavl-pointing [--films val] [--extra DIR]

``--extra DIR``: another phantom set (``mavl phantoms DIR --masks --seed 1``) whose
films (all of them) are added to the validation films.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def films(folder: Path, split: str | None) -> list[tuple[Path, dict[str, np.ndarray]]]:
    """(film, {label: mask}) for every film of a split (or all films) that has at least one mask."""
    from PIL import Image

    from mavl_cli.explain.maps import label_slug

    csv_name = f"{split}.csv" if split else "labels.csv"
    with open(folder / csv_name, newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = [c for c in rows[0] if c not in ("Path", "Patient")]
    out = []
    for r in rows:
        p = folder / r["Path"]
        masks = {}
        for lab in labels:
            m = folder / "masks" / f"{p.stem}.{label_slug(lab)}.png"
            if m.exists():
                masks[lab] = np.asarray(Image.open(m)) > 0
        out.append((p, masks))
    return out


def stage_forward(net, x, leaf: int = 4):
    """EfficientNet forward_features keeping every stage's output; stage ``leaf``'s output is a
    leaf that requires grad (the part after it has a graph)."""
    import torch

    outs = []
    with torch.no_grad():
        h = net.bn1(net.conv_stem(x))
        for b in net.blocks[: leaf + 1]:
            h = b(h)
            outs.append(h)
    h = h.detach().requires_grad_(True)
    outs[-1] = h
    for b in net.blocks[leaf + 1:]:
        h = b(h)
        outs.append(h)
    return outs, net.bn2(net.conv_head(h))


def extended(geom, pad: int):
    """The crop geometry of an input padded by ``pad`` pixels on every side."""
    from dataclasses import replace

    return replace(geom, left=geom.left - pad, top=geom.top - pad, crop_w=geom.crop_w + 2 * pad, crop_h=geom.crop_h + 2 * pad)


def cam_maps(act, grads, kind: str):
    """act [C, h, w], grads [L, C, h, w] -> [L, h, w]."""
    import torch

    if kind == "gradcam":
        w = grads.mean(dim=(2, 3))
        return torch.relu(torch.einsum("lc,chw->lhw", w, act))
    if kind == "gradcam_pos":
        w = torch.relu(grads).mean(dim=(2, 3))
        return torch.einsum("lc,chw->lhw", w, act)
    if kind == "hirescam":
        return torch.relu((grads * act[None]).sum(1))
    if kind == "gxa":
        return (grads * act[None]).sum(1)
    if kind == "gradcampp":
        g2, g3 = grads ** 2, grads ** 3
        denom = 2 * g2 + (act[None] * g3).sum(dim=(2, 3), keepdim=True)
        alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
        w = (alpha * torch.relu(grads)).sum(dim=(2, 3))
        return torch.relu(torch.einsum("lc,chw->lhw", w, act))
    raise ValueError(kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mavl-pointing")
    ap.add_argument("--films", default="val", help="split of the benchmark's phantoms: val (default) or test")
    ap.add_argument("--extra", type=Path, default=None)
    ap.add_argument("--max-films", type=int, default=0)
    ap.add_argument("--pads", default="0")
    ap.add_argument("--diag", default="", help="a variant whose misses are described")
    ap.add_argument("--only", default="", help="comma-separated substrings: score only variants containing one")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shipped", action="store_true", help="also score mavl's own --heatmap-method implementations")
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from mavl_cli.encoders.preprocess import normalize_batch, stack_batch
    from mavl_cli.explain.heatmaps import build_map_model, image_input
    from mavl_cli.explain.maps import to_original
    from mavl_cli.io.mavlfile import MAP_METHODS
    from mavl_cli.models.mavlmodel import image_encoder
    from mavl_cli.models.modelfile import load_model

    torch.set_num_threads(a.threads)
    model = load_model(a.work / "model_tuned.safetensors")
    enc, prep = image_encoder(model.meta)
    mm = build_map_model(model, enc, prep)
    net = mm.adapter.model
    names = list(model.labels)
    L = len(names)
    items = films(a.work / "phantoms", a.films)
    if a.extra:
        items += films(a.extra, None)
    items = [it for it in items if it[1]]
    if a.max_films:
        items = items[: a.max_films]
    pads = [int(p) for p in a.pads.split(",")]
    log(f"{len(items)} films with findings; pads {pads}")

    hits: dict[str, dict[str, list[int]]] = {}

    diag: list = []
    path = None

    def score(variant: str, grid: np.ndarray, geom, masks: dict, positive) -> None:
        full = to_original(grid, geom)
        d = hits.setdefault(variant, {})
        dp = hits.setdefault(variant + " [called+]", {})
        for lab, m in masks.items():
            k = names.index(lab)
            y, x = np.unravel_index(int(np.argmax(full[k])), full[k].shape)
            d.setdefault(lab, []).append(int(m[y, x]))
            if a.diag and variant == a.diag:
                others = [o for o, mo in masks.items() if o != lab and mo[y, x]]
                yy, xx = np.nonzero(m)
                dist = float(np.sqrt(((yy - y) ** 2 + (xx - x) ** 2).min()))
                diag.append((path.stem, lab, int(m[y, x]), dist, ",".join(others), x, y, float(positive[k])))
            if positive[k]:
                dp.setdefault(lab, []).append(int(m[y, x]))

    def norm01(t):
        lo = t.flatten(1).min(1).values[:, None, None]
        hi = t.flatten(1).max(1).values[:, None, None]
        return (t - lo) / (hi - lo).clamp_min(1e-12)

    t0 = time.perf_counter()
    stages = [2, 3, 4, 5]  # s8, s16, s16, s32 stage outputs
    kinds = ("gradcam", "hirescam", "gradcampp")

    def blur(t, sd):
        r = int(np.ceil(2 * sd))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sd) ** 2)
        k = k / k.sum()
        t = t[:, None]
        t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        t = F.conv2d(F.pad(t, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        return t[:, 0]

    def up(t, size):
        return F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0]

    for i, (path, masks) in enumerate(items):
        masks = {k: v for k, v in masks.items() if v.any()}
        _, crop, geom = image_input(path, prep)
        x0 = normalize_batch(stack_batch([crop]), prep).contiguous()
        for pad in pads:
            x = F.pad(x0, (pad,) * 4, mode="replicate") if pad else x0
            g = extended(geom, pad)
            with torch.enable_grad():
                outs, fin = stage_forward(net, x.detach(), leaf=min(stages))
                c = pad // 32
                inner = fin[:, :, c: fin.shape[2] - c, c: fin.shape[3] - c] if c else fin
                pooled = inner.mean(dim=(2, 3))
                logits = mm.logits(pooled)[0]
                targets = [outs[s] for s in stages] + [fin]
                grads = [[] for _ in targets]
                for j in range(L):
                    gr = torch.autograd.grad(logits[j], targets, retain_graph=j < L - 1)
                    for k, t in enumerate(gr):
                        grads[k].append(t[0])
                grads = [torch.stack(gg) for gg in grads]
            positive = (torch.sigmoid(logits.detach()) >= torch.as_tensor(np.asarray(model.thresholds, np.float32))).numpy()
            acts = [t[0].detach() for t in targets]
            fin_d = acts[-1]
            h, w = fin_d.shape[1:]
            with torch.no_grad():
                sim = mm.fusion.similarity(mm.embed(fin_d.permute(1, 2, 0).reshape(h * w, -1)), mm.text, mm.mask).T.reshape(L, h, w)
                mix = {}
                loc = fin_d.permute(1, 2, 0).reshape(h * w, -1)
                for al in (0.1, 0.3):
                    mix[f"mix{al}"] = mm.logits(pooled.detach() + al * (loc - pooled.detach())).T.reshape(L, h, w)
            tag = f"p{pad}"
            allm = {"sim": sim, **mix}
            names_t = [f"s{s}" for s in stages] + ["fin"]
            for nm, act, gr in zip(names_t, acts, grads):
                for k in kinds:
                    allm[f"{k}@{nm}"] = cam_maps(act, gr, k)
            size16 = acts[stages.index(4)].shape[1:]
            size8 = acts[0].shape[1:]
            allm["hires@s4*s3"] = norm01(allm["hirescam@s4"]) * norm01(allm["hirescam@s3"])
            allm["hires@s4+s3+s2"] = norm01(up(allm["hirescam@s4"], size8)) + norm01(up(allm["hirescam@s3"], size8)) + norm01(allm["hirescam@s2"])
            allm["hires@s4*s2"] = norm01(up(allm["hirescam@s4"], size8)) * norm01(allm["hirescam@s2"])
            allm["hires@s5*s4"] = norm01(up(allm["hirescam@s5"], size16)) * norm01(allm["hirescam@s4"])
            allm["sim*hires@s4"] = norm01(up(sim, size16)) * norm01(allm["hirescam@s4"])
            allm["sim*hires@s3"] = norm01(up(sim, size16)) * norm01(allm["hirescam@s3"])
            allm["gradcam*hires@s4"] = norm01(up(allm["gradcam@fin"], size16)) * norm01(allm["hirescam@s4"])
            allm["sim*gradcam"] = norm01(sim) * norm01(allm["gradcam@fin"])
            hi = allm["hirescam@s4"]
            for sd in (0.5, 1.0, 2.0):
                b = blur(hi, sd)
                allm[f"blur{sd}(hires@s4)"] = b
                allm[f"sim*blur{sd}(hires@s4)"] = norm01(up(sim, size16)) * norm01(b)
                allm[f"gradcam*blur{sd}(hires@s4)"] = norm01(up(allm["gradcam@fin"], size16)) * norm01(b)
            allm["sim+hires@s4"] = norm01(up(sim, size16)) + norm01(hi)
            allm["sim*hires@s4*hires@s5"] = norm01(up(sim, size16)) * norm01(hi) * norm01(up(allm["hirescam@s5"], size16))
            allm["sim*hires@s4*gradcam"] = norm01(up(sim, size16)) * norm01(hi) * norm01(up(allm["gradcam@fin"], size16))
            allm["sim*hires@s4*hires@s3"] = norm01(up(sim, size16)) * norm01(hi) * norm01(allm["hirescam@s3"])
            allm["sim^.5*hires@s4"] = norm01(up(sim, size16)) ** 0.5 * norm01(hi)
            allm["sim^2*hires@s4"] = norm01(up(sim, size16)) ** 2 * norm01(hi)
            for res in (288, 320):
                with torch.no_grad():
                    fb = net.forward_features(F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False))[0]
                    hb, wb = fb.shape[1:]
                    simb = mm.fusion.similarity(mm.embed(fb.permute(1, 2, 0).reshape(hb * wb, -1)), mm.text, mm.mask).T.reshape(L, hb, wb)
                allm[f"sim{res}"] = simb
                allm[f"sim{res}*hires@s4"] = norm01(up(simb, size16)) * norm01(hi)
            if pad == 0:  # the outer ring of cells ignored (set to the map's minimum)
                for k in ("sim", "gradcam@fin", "hirescam@s4", "sim*hires@s4"):
                    mp = allm[k].detach().clone()
                    lo = mp.flatten(1).min(1).values
                    mp[:, 0, :] = lo[:, None]
                    mp[:, -1, :] = lo[:, None]
                    mp[:, :, 0] = lo[:, None]
                    mp[:, :, -1] = lo[:, None]
                    allm[f"ring({k})"] = mp
                if a.shipped:  # the methods as mavl ships them (heatmaps.MapModel.maps)
                    for meth in MAP_METHODS:
                        with torch.enable_grad():
                            allm[f"shipped:{meth}"] = torch.from_numpy(mm.maps(x0, meth, list(range(L))))
            for k, mp in allm.items():
                if a.only and not any(o in f"{tag}/{k}" for o in a.only.split(",")):
                    continue
                mp = mp.detach().numpy()
                if pad:
                    cc = pad * mp.shape[1] // x.shape[2]
                    score(f"{tag}/{k}/crop", mp[:, cc: mp.shape[1] - cc, cc: mp.shape[2] - cc], geom, masks, positive)
                else:
                    score(f"{tag}/{k}", mp, g, masks, positive)
        if (i + 1) % 20 == 0:
            log(f"{i + 1}/{len(items)} films, {time.perf_counter() - t0:.0f} s")

    if diag:
        import collections

        for lab in sorted({d[1] for d in diag}):
            rows = [d for d in diag if d[1] == lab]
            miss = [d for d in rows if not d[2]]
            inother = collections.Counter(o for d in miss for o in d[4].split(",") if o)
            dists = np.array([d[3] for d in miss]) if miss else np.zeros(1)
            print(f"{lab}: {len(rows)} cases, {len(miss)} misses; miss distance px median {np.median(dists):.0f} "
                  f"(<=8: {np.mean(dists <= 8):.2f}, <=15: {np.mean(dists <= 15):.2f}); miss peaks inside: {dict(inother)}")
    order = sorted(names)
    print(f"{'variant':<34}" + "".join(f"{n[:10]:>11}" for n in order) + f"{'min':>7}{'mean':>7}")
    rows = []
    for v, d in hits.items():
        rates = [np.mean(d[n]) if n in d else float("nan") for n in order]
        rows.append((v, rates, np.nanmin(rates), np.nanmean(rates)))
    for v, rates, mn, me in sorted(rows, key=lambda r: -r[2]):
        print(f"{v:<34}" + "".join(f"{r:>11.2f}" for r in rates) + f"{mn:>7.2f}{me:>7.2f}")
    for v in list(hits)[:2]:
        print(v, "cases:", {k: len(c) for k, c in hits[v].items()})


if __name__ == "__main__":
    main()
