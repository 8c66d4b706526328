"""mavl_cli.stages.predict."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

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


@dataclass(frozen=True)
class _Selection:
    """The model and the images a predict run scores, once every input and output path has been checked."""

    part: Any  # the parsed --shard, None without one
    model_file: Any
    model: Any
    backbone_weights: Any  # --weights, else what the model records
    items: list[Any]  # this shard's images (all of them without --shard)
    all_items: list[Any]
    lo: int
    hi: int
    batch_size: int | None


@dataclass(frozen=True)
class _LabelSet:
    """What a predict run scores: the model's labels, plus any added from ``--descriptions``."""

    module: Any
    label_text: Any  # ``mavlmodel.LabelText`` with the added labels; None without --descriptions
    new: list[str]
    names: list[str]
    thresholds: np.ndarray
    mask: Any  # aspect mask [L, A]


def predict_stage(
    images: list[str], model_path: str | None = None, opts: PredictOptions | None = None, run: RunOptions | None = None,
    progress: Callable[[str, int, str], Any] | None = None,
) -> tuple[Prediction, list[dict[str, str]]]:
    """Score images through the whole model (:class:`mavl_cli.models.mavlmodel.MavlModel`).

    ``opts.heatmap``: a :class:`mavl_cli.explain.heatmaps.HeatmapOptions` to also write explanation maps."""
    o, r = opts or PredictOptions(), run or RunOptions()
    sel = _select(images, model_path, o, r)
    model = sel.model
    labs = _label_set(sel, o, r.device)
    res = _score(sel, labs, r, progress)
    aspects = list(model.meta.get("aspects") or [])
    cos = _aspect_cosines(labs.module, res.head_inputs) if o.explain and res.ids else None
    pred = Prediction(res.ids, labs.names, res.probabilities, labs.thresholds, aspects, cos,
                      np.asarray(labs.mask).astype(bool), labs.new)
    pred.model_info = provenance.model_provenance(model, sel.model_file, provenance.model_choice(model_path))
    pred.ood = ood.assess_model(model, res.head_inputs, o.ood_threshold)
    pred.warnings = trust_warnings(model)
    if o.heatmap is not None:
        pred.peaks = _heatmaps(sel, labs, res, o, r.device, progress)
    if o.scores_out:
        _write_scores(o.scores_out, sel, labs, res)
    return pred, res.skipped


def _select(images: list[str], model_path: str | None, o: PredictOptions, r: RunOptions) -> _Selection:
    """Check the options, the model and the output paths; collect the images (this shard's with ``--shard``)."""

    part = parse_shard(o.shard)
    ood.check_percentile(o.ood_threshold)
    model_file, model, w = _open_model(model_path, o)
    if o.heatmap is not None:
        o.heatmap.check(list(model.labels) if not o.descriptions else None)  # labels added from text: checked later
    items, _ = collect_inputs(images)
    if o.scores_out:
        check_output_path(o.scores_out, [it.path for it in items])  # `--out a.png` must not replace the image
    all_items, lo, hi = items, 0, len(items)
    batch_size = r.batch_size
    if part is not None:  # whole batches of the list, as embed-images --shard does
        batch_size = batch_size or default_batch_size(resolve_device(r.device).type)
        lo, hi = shard_range(len(items), batch_size, part)
        items = items[lo:hi]
    return _Selection(part, model_file, model, w, items, all_items, lo, hi, batch_size)


def _open_model(model_path: str | None, o: PredictOptions) -> tuple[Any, Any, Any]:
    """Find and load the model, check the outputs against it and its backbone weights.

    Returns (model file, model, backbone weights: ``--weights`` or the path the model records)."""

    weights = o.weights
    model_file = find_model(model_path)
    check_outputs({"--json": o.json_out, "--out": o.scores_out}, [model_file, weights, o.descriptions])
    model = load_model(model_file)
    meta = model.meta
    w = weights or meta.get("backbone_weights")
    if o.scores_out:  # never the encoder's own files (a --weights folder, or the one the model records)
        check_output_path(o.scores_out, model_inputs(w, (meta.get("encoder") or {}).get("id")
                                                     if isinstance(meta.get("encoder"), dict) else None))
    carried = weights is None and (meta.get("encoder_weights") or {}).get("embedded")  # in the model file itself
    if w not in ("hub", "random", None) and not carried and not Path(w).exists():
        raise MavlError(f"{model.file.path}: its backbone weights {w} are not on this machine; pass --weights FILE_OR_FOLDER")
    return model_file, model, w


def _label_set(sel: _Selection, o: PredictOptions, device: str) -> _LabelSet:
    """The model's labels plus those ``--descriptions`` adds, with their thresholds; checks the heatmap outputs."""

    model = sel.model
    label_text, new = None, []
    if o.descriptions:
        label_text, new = _extend_labels(model, o.descriptions, device, o.threshold)
    module = model.module(o.weights, label_text=label_text)
    names = list(module.labels)
    th = module.thresholds.numpy() if o.threshold is None else np.full(len(names), o.threshold, np.float32)
    if o.heatmap is not None:  # before any image is scored: overlays never replace an input
        o.heatmap.check(names)
        o.heatmap.check_outputs([it.path for it in sel.items], names,
                                [sel.model_file, o.descriptions, *[it.path for it in sel.all_items],
                                 *model_inputs(sel.backbone_weights, o.weights)])
    mask = label_text.mask if label_text is not None else model.file.tensors["text.mask"]
    return _LabelSet(module, label_text, new, names, th, mask)


def _score(sel: _Selection, labs: _LabelSet, r: RunOptions, progress: Callable[[str, int, str], Any] | None) -> ImageScores:
    """Score the selected images through the whole model (no images for an empty shard)."""

    items = sel.items
    if items or sel.part is None:
        with (progress("predict", len(items), "img") if progress and len(items) > 8 else nullcontext(None)) as advance:
            return score_images(labs.module, items, device=r.device, batch_size=sel.batch_size, skip_bad=r.skip_bad,
                                advance=advance)
    # an empty shard (more shards than batches)
    return ImageScores([], np.zeros((0, len(labs.names)), np.float32), np.zeros((0, 0), np.float32), [])


def _aspect_cosines(module: Any, head_inputs: np.ndarray) -> np.ndarray:
    """``--explain``: each image's cosine to each label's aspect texts, [N, L, A]."""

    with torch.no_grad():
        return module.head.cpu().aspect_cosines(torch.from_numpy(head_inputs)).numpy()


def _heatmaps(sel: _Selection, labs: _LabelSet, res: ImageScores, o: PredictOptions, device: str,
              progress: Callable[[str, int, str], Any] | None) -> dict[str, dict[str, tuple[int, int]]]:
    """``--heatmap``: write the explanation maps of the scored images; returns their peaks."""

    model = sel.model
    where = {it.id: it.path for it in sel.items}
    text = labs.label_text.text if labs.label_text is not None else model.file.tensors["text.embeddings"]
    with (progress("heatmaps", len(res.ids), "img") if progress and len(res.ids) > 2 else nullcontext(None)) as advance:
        return predict_heatmaps(model, [where[i] for i in res.ids], res.ids, res.probabilities, labs.thresholds, labs.names,
                                text, labs.mask, o.heatmap, o.weights, device, advance, label_text=labs.label_text)


def _write_scores(path: str, sel: _Selection, labs: _LabelSet, res: ImageScores) -> None:
    """``--out``: the scores and thresholds, for `mavl evaluate --scores` (and `mavl merge` with ``--shard``)."""

    model, meta = sel.model, sel.model.meta
    smeta = {"ids": res.ids, "labels": labs.names, "model": str(model.file.path), "threshold": meta.get("threshold"),
             "synthetic_training_data": bool(meta.get("synthetic_training_data")),
             "calibration": meta.get("calibration")}
    if sel.part is not None:
        fp = inputs_fingerprint(sel.all_items, {"model": meta.get("fingerprint") or str(model.file.path),
                                                "batch_size": sel.batch_size})
        smeta["shard"] = shard_meta(sel.part, sel.lo, sel.hi, len(sel.all_items), fp, len(res.skipped), command_args())
    write_file(path, "scores", {"scores": res.probabilities, "thresholds": labs.thresholds}, smeta)


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
