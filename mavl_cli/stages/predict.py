"""mavl_cli.stages.predict."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mavl_cli.core.defaults import DEFAULT_THRESHOLD
from mavl_cli.core.errors import MavlError
from mavl_cli.core.invocation import command_args
from mavl_cli.core.options import PredictOptions, RunOptions
from mavl_cli.core.runtime import resolve_device
from mavl_cli.datasets.inputs import collect_inputs
from mavl_cli.encoders.loader import default_batch_size
from mavl_cli.encoders.text_embed import embed_descriptions
from mavl_cli.explain.heatmaps import predict_heatmaps
from mavl_cli.io.descriptions import read_descriptions
from mavl_cli.io.files import (
    atomic_write_bytes,
    check_output_path,
    check_outputs,
    model_inputs,
)
from mavl_cli.io.mavlfile import to_bytes, write_file
from mavl_cli.io.shards import parse_shard, shard_meta, shard_range
from mavl_cli.models.embed import inputs_fingerprint
from mavl_cli.models.mavlmodel import ImageScores, LabelText, score_images
from mavl_cli.models.modelfile import find_model, install_default, load_model
from mavl_cli.models.zeroshot import build_zero_shot, extend_labels
from mavl_cli.stages.evaluate import trust_warnings
from mavl_cli.stages.result import StageResult
from mavl_cli.trust import ood, provenance


@dataclass
class Prediction:
    ids: list[str]
    names: list[str]
    scores: np.ndarray
    thresholds: np.ndarray
    aspects: list[str] = field(default_factory=list)
    aspect_cos: np.ndarray | None = None  # [N, L, A]
    aspect_mask: np.ndarray | None = None
    new_labels: list[str] = field(default_factory=list)
    peaks: dict[str, dict[str, tuple[int, int]]] | None = None  # --heatmap: image id -> label -> (x, y) original pixels
    model_info: dict[str, Any] = field(default_factory=dict)  # provenance of the model (provenance.model_provenance)
    ood: Any = None  # ood.Assessment, None when the model has no OOD statistics
    warnings: list[str] = field(default_factory=list)


def predict_stage(
    images: list[str], model_path: str | None = None, opts: PredictOptions | None = None, run: RunOptions | None = None,
    progress: Callable[[str, int, str], Any] | None = None,
) -> tuple[Prediction, list[dict[str, str]]]:
    """Score images through the whole model (:class:`mavl_cli.models.mavlmodel.MavlModel`).

    ``opts.heatmap``: a :class:`mavl_cli.explain.heatmaps.HeatmapOptions` to also write explanation maps."""
    o, r = opts or PredictOptions(), run or RunOptions()
    weights, threshold, descriptions, explain = o.weights, o.threshold, o.descriptions, o.explain
    scores_out, json_out, heatmap, shard, ood_threshold = o.scores_out, o.json_out, o.heatmap, o.shard, o.ood_threshold
    device, batch_size, skip_bad = r.device, r.batch_size, r.skip_bad

    part = parse_shard(shard)


    ood.check_percentile(ood_threshold)
    model_file = find_model(model_path)
    check_outputs({"--json": json_out, "--out": scores_out}, [model_file, weights, descriptions])
    model = load_model(model_file)
    meta = model.meta
    w = weights or meta.get("backbone_weights")
    if scores_out:  # never the encoder's own files (a --weights folder, or the one the model records)
        check_output_path(scores_out, model_inputs(w, (meta.get("encoder") or {}).get("id")
                                                                     if isinstance(meta.get("encoder"), dict) else None))
    carried = weights is None and (meta.get("encoder_weights") or {}).get("embedded")  # in the model file itself
    if w not in ("hub", "random", None) and not carried and not Path(w).exists():
        raise MavlError(f"{model.file.path}: its backbone weights {w} are not on this machine; pass --weights FILE_OR_FOLDER")
    if heatmap is not None:
        heatmap.check(list(model.labels) if not descriptions else None)  # labels added from text: checked below
    items, _ = collect_inputs(images)
    if scores_out:
        check_output_path(scores_out, [it.path for it in items])  # `--out a.png` must not replace the image
    all_items, lo, hi = items, 0, len(items)
    if part is not None:  # whole batches of the list, as embed-images --shard does

        batch_size = batch_size or default_batch_size(resolve_device(device).type)
        lo, hi = shard_range(len(items), batch_size, part)
        items = items[lo:hi]
    label_text, new = None, []
    aspects = list(meta.get("aspects") or [])
    if descriptions:
        label_text, new = _extend_labels(model, descriptions, device, threshold)
    module = model.module(weights, label_text=label_text)
    names = list(module.labels)
    th = module.thresholds.numpy() if threshold is None else np.full(len(names), threshold, np.float32)
    if heatmap is not None:  # before any image is scored: overlays never replace an input
        heatmap.check(names)
        heatmap.check_outputs([it.path for it in items], names,
                              [model_file, descriptions, *[it.path for it in all_items],
                               *model_inputs(w, weights)])
    if items or part is None:
        with (progress("predict", len(items), "img") if progress and len(items) > 8 else nullcontext(None)) as advance:
            res = score_images(module, items, device=device, batch_size=batch_size, skip_bad=skip_bad, advance=advance)
    else:  # an empty shard (more shards than batches)

        res = ImageScores([], np.zeros((0, len(names)), np.float32), np.zeros((0, 0), np.float32), [])
    mask = label_text.mask if label_text is not None else model.file.tensors["text.mask"]
    cos = None
    if explain and res.ids:
        import torch

        with torch.no_grad():
            cos = module.head.cpu().aspect_cosines(torch.from_numpy(res.head_inputs)).numpy()
    pred = Prediction(res.ids, names, res.probabilities, th, aspects, cos, np.asarray(mask).astype(bool), new)
    pred.model_info = provenance.model_provenance(model, model_file, provenance.model_choice(model_path))
    pred.ood = ood.assess_model(model, res.head_inputs, ood_threshold)
    pred.warnings = trust_warnings(model)
    if heatmap is not None:

        where = {it.id: it.path for it in items}
        text = label_text.text if label_text is not None else model.file.tensors["text.embeddings"]
        with (progress("heatmaps", len(res.ids), "img") if progress and len(res.ids) > 2 else nullcontext(None)) as advance:
            pred.peaks = predict_heatmaps(model, [where[i] for i in res.ids], res.ids, res.probabilities, th, names, text, mask,
                                          heatmap, weights, device, advance, label_text=label_text)
    if scores_out:
        smeta = {"ids": res.ids, "labels": names, "model": str(model.file.path), "threshold": meta.get("threshold"),
                 "synthetic_training_data": bool(meta.get("synthetic_training_data")),
                 "calibration": meta.get("calibration")}
        if part is not None:

            fp = inputs_fingerprint(all_items, {"model": meta.get("fingerprint") or str(model.file.path), "batch_size": batch_size})
            smeta["shard"] = shard_meta(part, lo, hi, len(all_items), fp, len(res.skipped), command_args())
        write_file(scores_out, "scores", {"scores": res.probabilities, "thresholds": th}, smeta)
    return pred, res.skipped


def _extend_labels(model: Any, descriptions: str, device: str, threshold: float | None = None) -> tuple[Any, list[str]]:
    """Add labels described only in text: embed them with the model's own text encoder.

    Returns (``mavlmodel.LabelText`` for old + new labels, the new label names).
    Fusion models: the new labels get the mean bias of the trained ones (no
    data says more); aspects are aligned by name, aspects the model has never
    seen are dropped. Zero-shot models: the new labels get prompts like the
    others (:func:`mavl_cli.models.zeroshot.extend_labels`). New labels' thresholds
    are ``threshold`` or the default.
    """

    meta = model.meta
    desc = read_descriptions(descriptions)
    names = list(model.labels)
    new = [lab for lab in desc.labels if lab not in names]
    if not new:
        raise MavlError(f"{descriptions}: every label in it is already one of the model's labels")
    th = np.concatenate([model.thresholds, np.full(len(new), DEFAULT_THRESHOLD if threshold is None else threshold, np.float32)])
    if meta.get("scorer") == "zeroshot":

        return extend_labels(model, desc.subset(new), th), new
    te = embed_descriptions(desc.subset(new), meta["text_model"], pooling=meta.get("pooling"), device=device)
    aspects = list(meta.get("aspects") or [])
    old_t, old_m = model.file.tensors["text.embeddings"], model.file.tensors["text.mask"]
    if old_t.shape[2] != te.embeddings.shape[2]:
        raise MavlError(f"{descriptions}: encoded to {te.embeddings.shape[2]}-d, but the model's text is {old_t.shape[2]}-d")
    add_t = np.zeros((len(new), len(aspects), old_t.shape[2]), np.float32)
    add_m = np.zeros((len(new), len(aspects)), np.uint8)
    idx = {a: i for i, a in enumerate(aspects)}
    for j, a in enumerate(te.meta["aspects"]):
        if a in idx:
            add_t[:, idx[a]] = te.embeddings[:, j]
            add_m[:, idx[a]] = te.mask[:, j]
    if len(aspects) == 1:  # single-slot models: average whatever the description has
        m = te.mask.astype(np.float32)[..., None]
        add_t[:, 0] = (te.embeddings * m).sum(1) / np.clip(m.sum(1), 1, None)
        add_m[:, 0] = 1
    empty = [new[i] for i in range(len(new)) if add_m[i].sum() == 0]
    if empty:
        raise MavlError(f"{descriptions}: {', '.join(empty)} share no aspect with the model's aspects ({', '.join(aspects)})")
    fusion_bias = model.file.tensors["fusion.bias"].astype(np.float32)
    bias = np.concatenate([fusion_bias, np.full(len(new), fusion_bias.mean(), np.float32)])
    return LabelText(names + new, np.concatenate([old_t, add_t]), np.concatenate([old_m, add_m]), th, bias=bias), new


def zero_shot_stage(opts: Any, set_default: bool = False) -> StageResult:
    """A model file from an aligned image-text encoder and label descriptions (``zeroshot.ZeroShotOptions``)."""

    check_output_path(opts.output, [p for p in (opts.descriptions, opts.weights) if p]
                               + model_inputs(opts.encoder, opts.weights))
    tensors, meta, summary = build_zero_shot(opts)
    blob = to_bytes("model", tensors, meta)
    atomic_write_bytes(opts.output, blob)
    notes = [f"thresholds are the default {DEFAULT_THRESHOLD}: run `mavl tune-threshold` on validation images or embeddings"]
    if set_default:
        notes.append(f"installed as the default model: {install_default(blob)}")
    table = [{"label": lab, "positive": " | ".join(t for slot in pos for t in slot)[:90], "negative": " | ".join(neg)[:60]}
             for lab, pos, neg in zip(meta["labels"], meta["aspect_texts"], meta["negative_texts"])]
    return StageResult(opts.output, summary, table, notes)
