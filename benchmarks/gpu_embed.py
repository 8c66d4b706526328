"""GPU embedding throughput: the bare bf16 forward against mavl end to end, in one run.

Generates N CheXpert-small-like grayscale JPEGs (about 390x320, film-like
texture and grain so they compress like radiographs) once into a cache
folder, then measures on the same GPU:

  (a) bare:  the backbone's forward under bf16 autocast and ``inference_mode``
             on one random batch, repeated (no data at all: the ceiling);
  (b) mavl:  ``embed_images_stage`` end to end on the N files (listing, nvJPEG
             decode, resize and normalise on the GPU, forward, output file);
             images/s over the embedding loop, and over the whole stage call.

and prints images/s for both and their ratio. Goals for ``vit_base_patch16_224``
on one H100/H200-class GPU: (b) >= 0.85 x (a) and >= 5,000 images/s.
Weights are random (throughput does not depend on them).

Run: ``python benchmarks/gpu_embed.py`` (defaults: 20,000 images, vit_base_patch16_224, bf16,
batch 256, cache in $MAVL_BENCH_CACHE or /tmp/mavl-gpu-embed)
     ``python benchmarks/gpu_embed.py --dry-run`` (CPU, 48 images, a tiny ViT, fp32: checks the script itself)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}


def _film(k: int, w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(k)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w * (0.5 + 0.05 * rng.standard_normal()), h * 0.55
    lungs = np.exp(-(((xx - cx * 0.62) / (w * 0.17)) ** 2 + ((yy - cy) / (h * 0.3)) ** 2))
    lungs += np.exp(-(((xx - cx * 1.38) / (w * 0.17)) ** 2 + ((yy - cy) / (h * 0.3)) ** 2))
    body = 70 + 110 * np.exp(-(((xx - cx) / (w * 0.45)) ** 4)) - 60 * lungs
    ribs = 12 * np.sin(yy / (h / 28.0) + 0.3 * np.sin(xx / 23.0)) * lungs
    img = body + ribs + rng.normal(0, 7, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def _write(args: tuple[int, str, int, int]) -> None:
    from PIL import Image

    k, folder, w, h = args
    Image.fromarray(_film(k, w, h)).save(Path(folder) / f"view{k:06d}_frontal.jpg", quality=90)


def make_images(folder: Path, n: int, w: int, h: int) -> Path:
    """N grayscale JPEGs in ``folder`` (kept: later runs reuse them)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("view*_frontal.jpg")))
    if have < n:
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(_write, [(k, str(folder), w, h) for k in range(have, n)], chunksize=256))
    for extra in sorted(folder.glob("view*_frontal.jpg"))[n:]:
        extra.unlink()
    return folder


def bare_forward(model_name: str, model_args: dict, device: str, batch: int, precision: str, seconds: float = 8.0) -> float:
    """Images/s of the bare forward on one random batch, repeated for about ``seconds``."""
    import torch

    from mavl_cli.encoders.timm import create_backbone

    model, info = create_backbone(model_name, pretrained=False, model_args=model_args)
    dev = torch.device(device)
    model = model.to(dev).eval()
    x = torch.randn(batch, *info.data_config["input_size"], device=dev)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def run() -> None:
        if half is not None:
            with torch.autocast(dev.type, dtype=half):
                model(x)
        else:
            model(x)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            run()
        sync()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            run()
            n += 1
        sync()
        return n * batch / (time.perf_counter() - t0)


def mavl_end_to_end(folder: Path, model_name: str, model_args: dict, device: str, batch: int, precision: str,
                    workers: int | None) -> dict:
    from mavl_cli.core.options import RunOptions
    from mavl_cli.encoders.spec import EncoderSpec
    from mavl_cli.stages.embed import embed_images_stage

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "feats.safetensors")
        t0 = time.perf_counter()
        res = embed_images_stage([str(folder)], out, EncoderSpec.parse(model_name, pretrained=False, options=model_args),
                                 RunOptions(device=device, batch_size=batch, workers=workers, precision=precision))
        wall = time.perf_counter() - t0
        from mavl_cli.io.mavlfile import read_file

        meta = read_file(out).meta
    return {"images": res.summary["images"], "loop_images_per_s": res.summary["images_per_s"],
            "wall_images_per_s": res.summary["images"] / wall, "pipeline": meta.get("pipeline")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", default="320x390", help="WIDTHxHEIGHT of the generated JPEGs")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--cache", default=os.environ.get("MAVL_BENCH_CACHE") or str(Path(tempfile.gettempdir()) / "mavl-gpu-embed"))
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line too")
    ap.add_argument("--dry-run", action="store_true", help="CPU, 48 images, a tiny ViT, fp32: check the script, not the GPU")
    a = ap.parse_args()
    model_args: dict = {}
    if a.dry_run:
        a.images, a.model, a.batch_size, a.precision, a.device = min(a.images, 48), "vit_tiny_patch16_224", 16, "fp32", "cpu"
        a.cache = str(Path(a.cache) / "dry-run")
        model_args = TINY
    import torch

    if a.dry_run:
        torch.set_num_threads(1)  # the loop's tuned count on a shared CPU; the dry run checks the script, not speed
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_embed: no CUDA GPU here (use --dry-run to check the script on CPU)")
    w, h = (int(v) for v in a.size.lower().split("x"))
    t0 = time.perf_counter()
    folder = make_images(Path(a.cache) / f"{w}x{h}", a.images, w, h)
    gen_s = time.perf_counter() - t0
    bare = bare_forward(a.model, model_args, a.device, a.batch_size, a.precision, seconds=2.0 if a.dry_run else 8.0)
    e2e = mavl_end_to_end(folder, a.model, model_args, a.device, a.batch_size, a.precision, a.workers)
    ratio = e2e["loop_images_per_s"] / bare if bare else float("nan")
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    goal = ratio >= 0.85 and e2e["loop_images_per_s"] >= 5000
    print(f"gpu_embed: {a.model} {a.precision} batch {a.batch_size} on {name}, {e2e['images']} JPEGs {w}x{h} "
          f"(generated/reused in {gen_s:.0f}s): bare forward {bare:,.0f} img/s; mavl end to end {e2e['loop_images_per_s']:,.0f} img/s "
          f"(whole stage {e2e['wall_images_per_s']:,.0f} img/s); ratio {ratio:.2f}; "
          f"pipeline {e2e['pipeline']['kind']}/{e2e['pipeline']['jpeg_decode']}; "
          + ("dry run" if a.dry_run else ("goals met" if goal else "goals (>= 0.85, >= 5,000 img/s) NOT met")))
    if a.json:
        print(json.dumps({"model": a.model, "precision": a.precision, "device": name, "bare_images_per_s": bare, **e2e,
                          "ratio": ratio, "goal_met": bool(goal)}))


if __name__ == "__main__":
    main()
