"""How close `mavl embed-images` gets to the speed limit, measured in one run.

For each round, interleaved on the same machine (so a busy neighbour slows
all three alike):

  (a) ceiling:  the backbone's bare forward on random tensors under
                ``torch.inference_mode`` (torch's default thread count; also
                with half the threads, and the better of the two is reported);
  (b) mavl:     ``mavl_cli.stages.embed.embed_images_stage`` end to end on real files
                (listing, decoding, preprocessing, forward, output file);
  (c) notebook: the loop most notebooks write: PIL open + convert("RGB"),
                torchvision Resize/CenterCrop/ToTensor/Normalize, a DataLoader
                with batch 16, ``torch.no_grad``.

Prints images/s and the ratios b/a and b/c (medians over rounds). With
``--precision int8`` it also runs mavl in fp32 and prints the int8 speed-up
and the mean cosine between int8 and fp32 features. Weights are random (no
ViT weights exist offline); throughput does not depend on them.

Run: ``python benchmarks/embed_images.py --model vit_small_patch16_224 --images 96``
     ``python benchmarks/embed_images.py --precision int8``
     ``python benchmarks/embed_images.py --large-jpegs 2000x2500 --images 48``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

DEFAULT_SOURCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nih-cxr14-64px" / "images"


def source_images(folder: Path, n: int) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"{folder}: no images")
    return [files[i % len(files)] for i in range(n)]


def make_folder(files: list[Path], dest: Path, large: tuple[int, int] | None) -> Path:
    """The N benchmark images in one folder: links to the sources, or large gray JPEGs made from them."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, f in enumerate(files):
        if large is None:
            os.symlink(f.resolve(), dest / f"{k:05d}{f.suffix}")
            continue
        w, h = large
        im = Image.open(f).convert("L").resize((w, h), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.int16) + rng.integers(-6, 7, (h, w), dtype=np.int16)  # film grain: real entropy
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(dest / f"{k:05d}.jpg", quality=90)
    return dest


def bare_forward(model, data_config: dict, n: int, bs: int, threads: int) -> float:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn(bs, *data_config["input_size"])
    try:
        with torch.inference_mode():
            model(x)  # warm-up
            t = time.perf_counter()
            done = 0
            while done < n:
                model(x)
                done += bs
            return done / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)


def mavl_run(folder: Path, out: Path, model_name: str, weights: Path, precision: str, bs: int | None) -> tuple[float, np.ndarray, list[str]]:
    from mavl_cli.core.options import RunOptions
    from mavl_cli.encoders.spec import EncoderSpec
    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.stages.embed import embed_images_stage

    res = embed_images_stage([str(folder)], str(out), EncoderSpec.parse(model_name, weights),
                             RunOptions(device="cpu", batch_size=bs, precision=precision))
    f = read_file(out)
    out.unlink()
    return res.summary["images"] / res.summary["seconds"], f.tensors["features"], f.ids()


def notebook_run(model, data_config: dict, folder: Path, workers: int) -> tuple[float, np.ndarray]:
    """What a notebook would write (kept deliberately plain)."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    scale = int(data_config["input_size"][1] / data_config["crop_pct"])
    tf = T.Compose([
        T.Resize(scale, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(data_config["input_size"][1:]),
        T.ToTensor(),
        T.Normalize(data_config["mean"], data_config["std"]),
    ])

    class Files(Dataset):
        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return tf(Image.open(self.paths[i]).convert("RGB"))

    paths = sorted(folder.iterdir())
    t = time.perf_counter()
    loader = DataLoader(Files(paths), batch_size=16, num_workers=workers)
    feats = []
    with torch.no_grad():
        for x in loader:
            feats.append(model(x))
    return len(paths) / (time.perf_counter() - t), torch.cat(feats).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


def decode_cost(folder: Path, data_config: dict, k: int = 16) -> tuple[float, float]:
    """Milliseconds per image to decode + preprocess: mavl vs the notebook's transforms (one thread)."""
    from PIL import Image
    from torchvision import transforms as T

    from mavl_cli.encoders.preprocess import load_and_prepare

    scale = int(data_config["input_size"][1] / data_config["crop_pct"])
    tf = T.Compose([T.Resize(scale, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(data_config["input_size"][1:]),
                    T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])])
    paths = sorted(folder.iterdir())[:k]
    t = time.perf_counter()
    for p in paths:
        load_and_prepare(p, data_config)
    a = (time.perf_counter() - t) / len(paths) * 1e3
    t = time.perf_counter()
    for p in paths:
        tf(Image.open(p).convert("RGB"))
    return a, (time.perf_counter() - t) / len(paths) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--source", default=os.environ.get("MAVL_SHARED_DATA") and str(Path(os.environ["MAVL_SHARED_DATA"]) / "nih-cxr14-64px" / "images") or str(DEFAULT_SOURCE))
    ap.add_argument("--images", type=int, default=96, help="images per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--batch-size", type=int, default=None, help="mavl's batch size (default: mavl's own)")
    ap.add_argument("--notebook-workers", type=int, default=0, help="DataLoader num_workers of the notebook loop")
    ap.add_argument("--large-jpegs", default=None, metavar="WxH", help="generate gray JPEGs of this size (e.g. 2000x2500)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import timm
    import torch

    from mavl_cli.encoders.common import quantize_int8
    from mavl_cli.encoders.timm import create_backbone, save_local_backbone

    large = tuple(int(v) for v in args.large_jpegs.lower().split("x")) if args.large_jpegs else None
    tmp = Path(tempfile.mkdtemp(prefix="mavl-bench-"))
    torch.manual_seed(0)
    weights = save_local_backbone(timm.create_model(args.model, pretrained=False), args.model, tmp / "weights")
    model, info = create_backbone(args.model, weights=str(weights))
    dc = info.data_config
    ceiling_model = quantize_int8(model) if args.precision == "int8" else model
    t = time.perf_counter()
    folder = make_folder(source_images(Path(args.source), args.images), tmp / "images", large)
    what = f"{args.images} gray JPEGs of {large[0]}x{large[1]}" if large else f"{args.images} images from {args.source}"
    print(f"{args.model} ({info.dim}-d), {what} (made in {time.perf_counter() - t:.0f} s), "
          f"{os.cpu_count()} cores, torch {torch.__version__} default threads {torch.get_num_threads()}, precision {args.precision}")
    dm, dn = decode_cost(folder, dc)
    print(f"decode+preprocess per image, one thread: mavl {dm:.1f} ms, notebook {dn:.1f} ms")

    top = torch.get_num_threads()
    bs = args.batch_size or 16
    rows: dict[str, list[float]] = {k: [] for k in ("a", "a_half", "b", "c", "b32")}
    cos_nb, cos_q = [], []
    for r in range(args.rounds):
        rows["a"].append(bare_forward(ceiling_model, dc, args.images, bs, top))
        if top > 1:
            rows["a_half"].append(bare_forward(ceiling_model, dc, args.images, bs, max(1, top // 2)))
        rate, feats, _ = mavl_run(folder, tmp / "out.st", args.model, weights, args.precision, args.batch_size)
        rows["b"].append(rate)
        rate_c, nb = notebook_run(model, dc, folder, args.notebook_workers)
        rows["c"].append(rate_c)
        if args.precision == "int8":
            rate32, f32, _ = mavl_run(folder, tmp / "out32.st", args.model, weights, "fp32", args.batch_size)
            rows["b32"].append(rate32)
            cos_q.append(cosine(feats, f32))
            cos_nb.append(cosine(f32, nb))
        else:
            cos_nb.append(cosine(feats, nb))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items() if v) + " img/s", flush=True)

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    best_a = [max(x, y) for x, y in zip(rows["a"], rows["a_half"])] if rows["a_half"] else rows["a"]

    def ratio(num: list[float], den: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(num, den))

    print()
    print(f"(a) bare forward, {top} threads        {med['a']:8.2f} img/s")
    if rows["a_half"]:
        print(f"    bare forward, {max(1, top // 2)} thread(s)       {med['a_half']:8.2f} img/s")
    print(f"(b) mavl end to end ({args.precision})          {med['b']:8.2f} img/s")
    print(f"(c) notebook loop (fp32, workers={args.notebook_workers})   {med['c']:8.2f} img/s")
    print(f"b/a  = {ratio(rows['b'], rows['a']):.2f}   (vs the default-thread forward)")
    print(f"b/a' = {ratio(rows['b'], best_a):.2f}   (vs the better of the two thread settings)")
    print(f"b/c  = {ratio(rows['b'], rows['c']):.2f}")
    if rows["b32"]:
        print(f"mavl fp32 end to end            {med['b32']:8.2f} img/s")
        print(f"int8 / fp32 (mavl, end to end) = {ratio(rows['b'], rows['b32']):.2f}")
        print(f"mean cosine int8 vs fp32 features = {min(cos_q):.4f} (worst round)")
    print(f"mean cosine mavl fp32 vs notebook features = {min(cos_nb):.4f} (same preprocessing: ~1)")


if __name__ == "__main__":
    main()
