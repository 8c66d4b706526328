"""One function per pipeline stage: files in, files out, a summary back.

The CLI only parses options and renders these summaries; ``mavl demo`` and
scripts call the same functions. Each stage validates its inputs (kinds,
shapes, label names) before doing any work and writes atomically.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mavl_cli import contract
from mavl_cli.defaults import DEFAULT_IMAGE_ENCODER, DEFAULT_THRESHOLD
from mavl_cli.errors import MavlError
from mavl_cli.options import (EncoderSpec, EvalOptions, ImageList, LabelOptions, PredictOptions, RunOptions, TextSpec,
                              Validation)

Advance = Callable[..., None]


@dataclass
class StageResult:
    output: str
    summary: dict[str, Any] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- train-lrf


def train_lrf_stage(
    embeddings: str,
    labels: str,
    output: str,
    config: Any = None,
    *,
    label_opts: LabelOptions | None = None,
    validation: Validation | None = None,
    embed_out: str | None = None,
    progress: Callable[[str, int, str], Any] | None = None,
) -> StageResult:
    """``config``: a :class:`mavl_cli.train.LRFConfig`; ``validation``: ``--val`` embeddings, else a held-out split."""
    from mavl_cli.data import load_labelled
    from mavl_cli.modelfile import tensor_fingerprint
    from mavl_cli.train import LRFConfig, train_lrf
    from mavl_cli.trainloop import check_rank_keep, choose_validation

    config = config or LRFConfig()
    read, v = label_opts or LabelOptions(), validation or Validation()
    only, uncertain, label_map = read.names, read.uncertain, read.renames
    val, val_labels, val_split = v.embeddings, v.labels, v.split
    rank, keep, seed = config.rank, config.keep, config.seed
    contract.check_outputs({"-o": output, "--embed-out": embed_out}, [embeddings, labels, val, val_labels])
    emb = contract.read_file(embeddings, expect="image-embeddings")
    if emb.meta.get("space") == "lrf":
        raise MavlError(f"{embeddings}: these embeddings are already LRF-projected; train-lrf needs backbone features")
    d = emb.tensors["features"].shape[1]
    check_rank_keep(rank, keep, d, str(embeddings))
    data = load_labelled(emb, labels, names=only, uncertain=uncertain, label_map=label_map)
    choice = choose_validation(len(data.ids), str(val) if val is not None else None, val_split, seed, data.groups)
    val_desc = choice.description
    if val is not None:
        vemb = contract.read_file(val, expect="image-embeddings")
        _same_backbone(emb, vemb)
        tr, va = data, load_labelled(vemb, val_labels or labels, names=data.names, uncertain=uncertain, label_map=label_map)
    elif choice.val is not None:
        tr, va = data.subset(choice.train), data.subset(choice.val)
    else:
        tr, va = data, None
    with (progress("train-lrf", config.epochs, "epoch") if progress else nullcontext(None)) as advance:
        res = train_lrf(tr.split(), va.split() if va else None, config, advance=advance)
    tensors = {k: v.numpy() for k, v in res.state.items()}
    fp = tensor_fingerprint(tensors)
    meta = {
        "labels": data.names,
        **asdict(config),
        "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
        "val_auroc": None if np.isnan(res.val_auroc) else res.val_auroc, "validation": val_desc,
        "uncertain": uncertain, "fingerprint": fp, "in_dim": int(d),
        **{k: emb.meta.get(k) for k in ("backbone", "backbone_weights", "backbone_args", "preprocessing", "precision")},
        **({"encoder": emb.meta["encoder"]} if emb.meta.get("encoder") else {}),
        "train_embeddings": str(embeddings), "train_labels": str(labels),
        "synthetic": _synthetic(labels, emb.meta),
    }
    contract.write_file(output, "lrf-head", tensors, meta)
    if embed_out is not None:
        from mavl_cli.train import lrf_embed

        z = lrf_embed(tensors, emb.tensors["features"].astype(np.float32))
        zmeta = {k: v for k, v in emb.meta.items() if not k.startswith("mavl_") and k != "command"}
        zmeta.update(space="lrf", feature_dim=int(z.shape[1]), lrf_fingerprint=fp)
        contract.write_file(embed_out, "image-embeddings", {"features": z}, zmeta)
    return StageResult(
        output=output,
        summary={"images": len(tr.ids), "validation": val_desc, "labels": len(data.names), "rank": rank, "keep": keep,
                 "eta": config.eta, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "val_macro_auroc": res.val_auroc},
        table=res.history,
        notes=[*data.notes, *(va.notes if val is not None else [])],
    )


def _same_backbone(a: contract.MavlFile, b: contract.MavlFile) -> None:
    da, db = a.tensors["features"].shape[1], b.tensors["features"].shape[1]
    if da != db:
        raise MavlError(f"{b.path}: {db}-d features, but {a.path} has {da}-d (embed both with the same backbone)")
    if a.meta.get("backbone") != b.meta.get("backbone") or a.meta.get("space", "backbone") != b.meta.get("space", "backbone"):
        raise MavlError(
            f"{b.path}: embedded with {b.meta.get('backbone')} ({b.meta.get('space', 'backbone')} space), "
            f"but {a.path} with {a.meta.get('backbone')} ({a.meta.get('space', 'backbone')} space)"
        )


# ---------------------------------------------------------------- embed-text


def embed_text_stage(
    descriptions: str, output: str, text: TextSpec | None = None, run: RunOptions | None = None,
    progress: Callable[[str, int, str], Any] | None = None,
) -> StageResult:
    from mavl_cli.descriptions import read_descriptions
    from mavl_cli.text_embed import embed_descriptions

    text, run = text or TextSpec(), run or RunOptions()
    text_model, pooling, trust_remote_code = text.model, text.pooling, text.trust_remote_code
    device, batch_size = run.device, run.batch(32)

    contract.check_output_path(output, [descriptions, *contract.model_inputs(text_model)])
    desc = read_descriptions(descriptions)
    n = len(desc.flat())
    with (progress("embed-text", n, "text") if progress else nullcontext(None)) as advance:
        te = embed_descriptions(desc, text_model, pooling=pooling, device=device, batch_size=batch_size, advance=advance,
                                trust_remote_code=trust_remote_code)
    te.meta["descriptions_file"] = str(descriptions)
    contract.write_file(output, "text-embeddings", {"embeddings": te.embeddings, "mask": te.mask}, te.meta)
    notes = [
        f"truncated: {t['label']} / {t['aspect']}: {t['tokens']} tokens, {t['lost']} lost beyond {t['kept']}"
        for t in te.truncated
    ]
    table = [{"label": lab, "aspects": int(te.mask[i].sum())} for i, lab in enumerate(desc.labels)]
    return StageResult(output, {"labels": len(desc.labels), "aspects": len(desc.aspects), "texts": n,
                                "dim": int(te.embeddings.shape[2]), "form": desc.form}, table, notes)


# ---------------------------------------------------------------- fuse


def fuse_stage(
    embeddings: str,
    text: str,
    labels: str,
    output: str,
    config: Any = None,
    *,
    lrf: str | None = None,
    validation: Validation | None = None,
    label_opts: LabelOptions | None = None,
    set_default: bool = False,
    progress: Callable[[str, int, str], Any] | None = None,
) -> StageResult:
    """``config``: a :class:`mavl_cli.train.FusionConfig`; ``validation.embeddings``: keep the best epoch on them."""
    from mavl_cli.data import load_labelled
    from mavl_cli.modelfile import build_model, install_default
    from mavl_cli.models.fusion import AGGREGATES
    from mavl_cli.train import FusionConfig, train_fusion

    config = config or FusionConfig()
    read, v = label_opts or LabelOptions(), validation or Validation()
    uncertain, label_map = read.uncertain, read.renames
    val, val_labels = v.embeddings, v.labels
    aggregate = config.aggregate
    if aggregate not in AGGREGATES:
        raise MavlError(f"unknown --aggregate {aggregate!r}; use one of {', '.join(AGGREGATES)}")
    contract.check_output_path(output, [embeddings, text, labels, lrf, val, val_labels])
    if set_default:
        from mavl_cli.modelfile import check_install_default

        check_install_default([embeddings, text, labels, lrf, val, val_labels, output])
    emb = contract.read_file(embeddings, expect="image-embeddings")
    txt = contract.read_file(text, expect="text-embeddings")
    head = contract.read_file(lrf, expect="lrf-head") if lrf else None
    x = _fusion_features(emb, head)
    names = txt.labels()
    data = load_labelled(emb, labels, names=names, uncertain=uncertain, label_map=label_map, x=x)
    vdata = None
    if val is not None:
        vemb = contract.read_file(val, expect="image-embeddings")
        _same_backbone(emb, vemb)
        vdata = load_labelled(vemb, val_labels or labels, names=names, uncertain=uncertain, label_map=label_map,
                              x=_fusion_features(vemb, head))
    t_emb = txt.tensors["embeddings"].astype(np.float32)
    t_mask = txt.tensors["mask"].astype(bool)
    with (progress("fuse", config.epochs, "epoch") if progress else nullcontext(None)) as advance:
        res = train_fusion(data.split(), t_emb, t_mask, vdata.split() if vdata else None, config, advance=advance)
    cfg = {"img_dim": int(x.shape[1]), "txt_dim": int(t_emb.shape[2]), "dim": config.dim, "aggregate": aggregate,
           "n_aspects": int(t_emb.shape[1])}
    image_meta = dict(emb.meta)
    if head is not None and image_meta.get("space") != "lrf":
        image_meta["feature_dim"] = int(emb.tensors["features"].shape[1])
    extra = {"seed": config.seed, "uncertain": uncertain, "train": {"embeddings": str(embeddings), "labels": str(labels),
             "images": len(data.ids), "fingerprint": data_fingerprint(data.ids), **asdict(config), "best_epoch": res.best_epoch,
             "val": str(val) if val else None, "val_auroc": None if np.isnan(res.val_auroc) else res.val_auroc}}
    extra.update(_trust_meta(data, labels, embeddings, emb, head))
    tensors, meta = build_model({k: v.numpy() for k, v in res.state.items()}, cfg, txt, image_meta, head, extra)
    from mavl_cli import ood

    ood_tensors, meta["ood"] = ood.fit(data.x, vdata.x if vdata is not None else None, seed=config.seed)
    tensors.update(ood_tensors)
    blob = contract.to_bytes("model", tensors, meta)
    contract.atomic_write_bytes(output, blob)
    notes = [*data.notes, *(vdata.notes if vdata else [])]
    if set_default:
        notes.append(f"installed as the default model: {install_default(blob)}")
    last = res.history[-1] if res.history else {}
    return StageResult(output, {"images": len(data.ids), "labels": len(names), "aspects": int(t_emb.shape[1]),
                                "aggregate": aggregate, "best_epoch": res.best_epoch, "final_bce": last.get("bce"),
                                "scale": last.get("scale"), "val_macro_auroc": res.val_auroc}, res.history, notes)


def _synthetic(labels: str, *upstream: dict[str, Any] | None) -> dict[str, Any] | None:
    """The synthetic-data record of a stage's inputs: its label file's marker, else what upstream files carry."""
    from mavl_cli.provenance import chain_synthetic, synthetic_source

    return chain_synthetic(synthetic_source(labels), *upstream)


def _trust_meta(data: Any, labels: str, embeddings: str, emb: contract.MavlFile, head: contract.MavlFile | None) -> dict[str, Any]:
    """What a model records about its training data (provenance, synthetic mark)."""
    from mavl_cli.provenance import training_record

    syn = _synthetic(labels, emb.meta, head.meta if head is not None else None)
    return {"training_data": training_record(data.ids, labels, embeddings, syn),
            "synthetic_training_data": bool(syn), "synthetic_source": syn}


def _fusion_features(emb: contract.MavlFile, head: contract.MavlFile | None) -> np.ndarray:
    from mavl_cli.train import lrf_features

    if head is None:
        return emb.tensors["features"].astype(np.float32)
    return lrf_features(emb, head.tensors, head.meta, f"the LRF head {head.path}")


# ---------------------------------------------------------------- scoring


@dataclass
class Scored:
    ids: list[str]
    names: list[str]
    scores: np.ndarray
    y: np.ndarray | None = None
    mask: np.ndarray | None = None
    groups: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    x: np.ndarray | None = None  # the fusion input the scores came from
    ood: dict[str, Any] | None = None  # evaluate: share flagged, metrics without them


def score_labelled(model_path: str, embeddings: str, labels: str, uncertain: str, label_map: dict[str, str] | None,
                   calibrated: bool = True) -> tuple[Any, Scored]:
    from mavl_cli.data import load_labelled
    from mavl_cli.modelfile import load_model

    model = load_model(model_path)
    if Path(embeddings).is_dir():
        return model, _score_image_folder(model, embeddings, labels, uncertain, label_map, calibrated)
    emb = contract.read_file(embeddings, expect="image-embeddings")
    _check_model_backbone(model, emb)
    x = model.to_fusion_input(emb)
    data = load_labelled(emb, labels, names=model.labels, uncertain=uncertain, label_map=label_map, x=x)
    return model, Scored(data.ids, data.names, model.score(x, calibrated=calibrated), data.y, data.mask, data.groups, data.notes, x=x)


def _score_image_folder(model: Any, root: str, labels: str, uncertain: str, label_map: dict[str, str] | None,
                        calibrated: bool = True) -> Scored:
    """Images under ``root`` listed by ``labels``, scored through the whole model (no embeddings file)."""
    from mavl_cli.data import load_labelled
    from mavl_cli.datasets import collect_inputs
    from mavl_cli.mavlmodel import score_images

    items, missing = collect_inputs([root], labels)
    if missing:
        shown = ", ".join(m["id"] for m in missing[:3])
        raise MavlError(f"{labels}: {len(missing)} image(s) it lists were not found under {root} (e.g. {shown})")
    module = model.module()
    if not calibrated:  # `mavl calibrate` fits on the raw head
        module.head = model.head(calibrated=False)
    res = score_images(module, items)
    emb = contract.MavlFile("image-embeddings", {"features": res.probabilities}, {"ids": res.ids}, str(root))
    data = load_labelled(emb, labels, names=model.labels, uncertain=uncertain, label_map=label_map)
    return Scored(data.ids, data.names, data.x, data.y, data.mask, data.groups, data.notes, x=res.head_inputs)  # rows in res.ids order


def _check_model_backbone(model: Any, emb: contract.MavlFile) -> None:
    mb, eb = model.meta.get("backbone"), emb.meta.get("backbone")
    if mb and eb and mb != eb:
        raise MavlError(f"{emb.path}: embedded with {eb}, but the model {model.file.path} uses {mb}")


def data_fingerprint(ids: list[str]) -> str:
    """Identity of an evaluation set: its sorted image ids (order and label policy do not matter)."""
    import hashlib

    h = hashlib.sha256()
    for i in sorted(ids):
        h.update(i.encode() + b"\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- tune-threshold


def tune_stage(
    model_path: str, embeddings: str, labels: str, output: str, method: str = "sweep",
    min_sensitivity: float | None = None, label_opts: LabelOptions | None = None,
) -> StageResult:
    from mavl_cli.metrics import confusion_counts, f1_from_counts
    from mavl_cli.thresholds import tune

    read = label_opts or LabelOptions()
    uncertain, label_map = read.uncertain, read.renames

    contract.check_output_path(output, [embeddings, labels], may_replace=[model_path])  # MODEL itself may be the output
    if min_sensitivity is not None and not 0 < min_sensitivity <= 1:
        raise MavlError(f"--min-sensitivity must be in (0, 1], got {min_sensitivity}")
    model, sc = score_labelled(model_path, embeddings, labels, uncertain, label_map)
    kw: dict[str, Any] = {"label_names": sc.names}
    if method == "sensitivity":
        kw["min_sensitivity"] = min_sensitivity
    res = tune(sc.y, sc.scores, method, mask=sc.mask, **kw)
    th = np.asarray(res.thresholds, np.float32)
    tp, fp, fn, tn = confusion_counts(sc.y, sc.scores, sc.mask, th)
    f1 = f1_from_counts(tp, fp, fn)
    tensors = dict(model.file.tensors)
    tensors["thresholds"] = th
    meta = {k: v for k, v in model.meta.items() if not k.startswith("mavl_") and k != "command"}
    meta["threshold"] = {
        "method": method, "min_sensitivity": min_sensitivity, "objective_macro_f1": float(res.objective),
        "tuned_on": {"embeddings": str(embeddings), "labels": str(labels), "images": len(sc.ids),
                     "fingerprint": data_fingerprint(sc.ids)},
        "notes": list(res.notes),
    }
    contract.write_file(output, "model", tensors, meta)
    table = [{"label": n, "threshold": float(th[j]), "f1": float(f1[j]), "support": int(tp[j] + fn[j]),
              "recall": float(tp[j] / (tp[j] + fn[j])) if tp[j] + fn[j] else float("nan")} for j, n in enumerate(sc.names)]
    return StageResult(output, {"method": method, "images": len(sc.ids), "macro_f1": float(res.objective)}, table,
                       [*sc.notes, *res.notes])


# ---------------------------------------------------------------- evaluate


def evaluate_stage(
    model_path: str | None, embeddings: str | None, labels: str, opts: EvalOptions | None = None,
    label_opts: LabelOptions | None = None, extras: Any = None,
) -> tuple[Any, list[str], Scored]:
    """Returns (Report, warnings, scored data); ``sc.ood`` holds the OOD share and metrics without flagged images;
    ``extras`` is a :class:`mavl_cli.stages_eval.EvalExtras`."""
    from mavl_cli.datasets import read_labels
    from mavl_cli.metrics import evaluate

    o, read = opts or EvalOptions(), label_opts or LabelOptions()
    scores_file, bootstrap, seed, threshold = o.scores, o.bootstrap, o.seed, o.threshold
    plot, csv_out, json_out, ood_threshold = o.plot, o.csv_out, o.json_out, o.ood_threshold
    uncertain, label_map = read.uncertain, read.renames
    warnings: list[str] = []
    html = getattr(extras, "html", None)
    contract.check_outputs({"--json": json_out, "--csv": csv_out, "--plot": plot, "--html": html},
                           [model_path, embeddings, labels, scores_file, getattr(extras, "metadata", None)],
                           create_folders=("--plot",))
    if scores_file is not None:
        from mavl_cli.scores_io import load_score_set

        ss = load_score_set(scores_file, allow_model=False)  # a `predict --out` file or a CSV from another tool
        sf = ss.as_file()
        names = sf.labels()
        table = read_labels(labels, uncertain=uncertain, label_map=label_map)
        from mavl_cli.datasets.labelmap import known_renames, rename_note
        from mavl_cli.datasets.table import rename

        renames = known_renames(names, table.names)
        if renames:
            table = rename(table, renames)
            warnings.append(rename_note(renames, labels))
        missing = [n for n in names if n not in table.names]
        if missing and ss.source == "csv" and len(missing) < len(names):
            warnings.append(f"{scores_file}: column(s) {', '.join(missing)} are not labels of {labels}; left out")
            names = [n for n in names if n in table.names]
        elif missing:
            raise MavlError(f"{labels}: label(s) {', '.join(map(repr, missing))} of {scores_file} are not in this label file")
        cols = [sf.labels().index(n) for n in names]
        table = table.select(names).align(sf.ids())
        sc = Scored(table.ids, names, sf.tensors["scores"][:, cols].astype(np.float32), table.y, table.mask, table.groups)
        th = np.asarray(sf.tensors["thresholds"], np.float32)[cols]
        tuned = (sf.meta.get("threshold") or {}).get("tuned_on")
        warnings.extend(_trust_warnings(sf))
        source_meta = sf.meta
    else:
        if model_path is None or embeddings is None:
            raise MavlError("evaluate needs MODEL and EMBEDDINGS, or --scores FILE")
        from mavl_cli.ood import check_percentile

        check_percentile(ood_threshold)
        model, sc = score_labelled(model_path, embeddings, labels, uncertain, label_map)
        th = model.thresholds
        warnings.extend(_trust_warnings(model))
        tuned = (model.meta.get("threshold") or {}).get("tuned_on")
        source_meta = model.meta
        if (model.meta.get("threshold") or {}).get("method", "default") == "default" and threshold is None:
            warnings.append(f"thresholds are the untuned default {DEFAULT_THRESHOLD}; run `mavl tune-threshold` on validation data first")
    if threshold is not None:
        th = np.full(len(sc.names), threshold, np.float32)
    elif tuned:
        if tuned.get("fingerprint") == data_fingerprint(sc.ids):
            warnings.append(
                f"ALARM: thresholds were tuned on this very data ({tuned.get('embeddings')}, {tuned.get('images')} images): "
                "these figures are optimistic; tune on validation data and report on a separate test set"
            )
    warnings.extend(sc.notes)
    groups = np.asarray(sc.groups) if sc.groups is not None else None
    report = evaluate(sc.y, sc.scores, th, sc.names, mask=sc.mask, bootstrap=bootstrap, seed=seed, groups=groups)
    if scores_file is None:
        from mavl_cli.ood import evaluate_split

        sc.ood = evaluate_split(model, sc, th, ood_threshold, bootstrap=bootstrap, seed=seed)
    from mavl_cli.stages_eval import evaluation_extras

    evaluation_extras(report, sc, th, warnings, source_meta, extras, bootstrap=bootstrap, seed=seed)
    if plot:
        from mavl_cli.plots import plot_report

        plot_report(Path(plot), sc.y, sc.scores, th, sc.names, mask=sc.mask)
    return report, warnings, sc


def _trust_warnings(model: Any) -> list[str]:
    """Warnings every run with this model must show (synthetic training data)."""
    from mavl_cli.provenance import SYNTHETIC_WARNING

    return [SYNTHETIC_WARNING] if model.meta.get("synthetic_training_data") else []


# ---------------------------------------------------------------- embed-images


def embed_images_stage(
    images: ImageList | list[str],
    output: str,
    encoder: EncoderSpec | str | None = None,
    run: RunOptions | None = None,
    *,
    lrf: str | None = None,
    resume: bool = False,
    shard: str | None = None,
    progress: Callable[[str, int, str], Any] | None = None,
) -> StageResult:
    """Embed images into one file; with ``shard`` one part of it; under torchrun every rank
    embeds its shard on its own device and rank 0 merges the parts (see :mod:`mavl_cli.shards`).

    ``encoder``: an :class:`EncoderSpec` or ``FAMILY:ID`` (default: the default image encoder)."""
    from mavl_cli import distributed
    from mavl_cli.datasets import collect_inputs
    from mavl_cli.embed import check_precision, embed_images
    from mavl_cli.runtime import resolve_device
    from mavl_cli.shards import Shard, parse_shard

    src = images if isinstance(images, ImageList) else ImageList(list(images))
    inputs, labels, root, path_column = list(src.inputs), src.labels, src.root, src.path_column
    spec = encoder if isinstance(encoder, EncoderSpec) else EncoderSpec.parse(encoder or DEFAULT_IMAGE_ENCODER)
    r = run or RunOptions()
    device, batch_size, workers, threads, precision = r.device, r.batch_size, r.workers, r.threads, r.precision
    skip_bad, pipeline, compile_model = r.skip_bad, r.pipeline, r.compile_model
    part = parse_shard(shard)
    dist = distributed.setup(device)
    if dist.active:
        if part is not None:
            raise MavlError("--shard and torchrun both split the images; use one (under torchrun each rank takes its own shard)")
        if output == "-":
            raise MavlError("under torchrun, write the embeddings to a file (-o FILE), not to stdout")
        part, device = Shard(dist.rank, dist.world), dist.device
        if not dist.main:
            progress = None  # one progress bar per job, on rank 0
    contract.check_output_path(output, [lrf, labels, *contract.model_inputs(spec, spec.weights)])
    check_precision(precision, resolve_device(device).type)
    head = contract.read_file(lrf, expect="lrf-head") if lrf else None
    items, missing = collect_inputs(inputs, labels, root, path_column)
    contract.check_output_path(output, [it.path for it in items])  # `-o DIR/a.png` must not replace an input image
    if missing and not skip_bad:
        shown = ", ".join(m["id"] for m in missing[:3])
        raise MavlError(f"{labels}: {len(missing)} image(s) listed in the label file were not found under the image root (e.g. {shown}); use --skip-bad to skip them")
    checkpoint = None
    if output != "-":
        checkpoint = Path(f"{output}.partial" + (f".rank{dist.rank}-of-{dist.world}" if dist.active else ""))
    state = {"start": 0}
    error = None
    try:
        if checkpoint is not None and checkpoint.exists() and not resume:
            raise MavlError(f"{checkpoint}: a checkpoint of an interrupted run exists; add --resume to continue it, or delete it")
        with (progress("embed-images", len(items), "img") if progress else nullcontext(None)) as advance:
            def on_start(start: int, total: int) -> None:
                state["start"] = start
                state["total"] = total
                if advance and part is not None and hasattr(advance, "set_total"):
                    advance.set_total(total)
                if advance and start:
                    advance.resume_at(start)

            res = embed_images(items, spec, device=device,
                               batch_size=batch_size, workers=workers, precision=precision, skip_bad=skip_bad, lrf=head,
                               checkpoint=checkpoint, resume=resume, advance=advance, on_start=on_start, threads=threads,
                               shard=part, pipeline=pipeline, compile_model=compile_model)
    except MavlError as exc:
        if not dist.active:
            raise
        error = f"rank {dist.rank}: {exc}"
    distributed.agree(dist, error)  # one failed rank stops them all, with its message, before anything is merged
    if part is not None and part.index > 0:
        missing = []  # label-file rows without an image are listed once, by shard 0
    res.skipped = [*({"id": m["id"], "path": "", "reason": m["reason"]} for m in missing), *res.skipped]
    res.meta["skipped"] = res.skipped
    res.meta["labels_file"] = str(labels) if labels else None
    from mavl_cli.provenance import synthetic_source

    res.meta["synthetic"] = synthetic_source(labels, [it.path for it in items])
    rows = len(res.ids)
    if dist.active:
        rows = _merge_ranks(dist, output, res)
    else:
        contract.write_file(output, "image-embeddings", {"features": res.features}, res.meta)
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    summary = {"images": rows, "skipped": len(res.skipped), "dim": int(res.features.shape[1]), "backbone": res.meta["backbone"],
               "precision": precision, "seconds": round(res.seconds, 2),
               "images_per_s": round((state.get("total", len(items)) - state["start"]) / res.seconds, 2) if res.seconds else None,
               "resumed_from": state["start"], "threads": res.threads}
    if part is not None:
        sh = res.meta["shard"]
        summary["shard"] = f"{part} (inputs {sh['start']}..{sh['stop']} of {sh['total']})"
    if dist.active:
        summary["ranks"] = dist.world
        summary["device"] = str(device)
    return StageResult(output, summary, [{"id": s["id"], "reason": s["reason"]} for s in res.skipped])


def _merge_ranks(dist: Any, output: str, res: Any) -> int:
    """Rank 0 gathers every rank's part and writes the merged file; every rank learns whether it worked."""
    from mavl_cli import distributed
    from mavl_cli.shards import merge_parts

    parts = distributed.gather_to_main(dist, (res.features, res.meta))
    rows, error = 0, None
    if dist.main:
        try:
            files = [contract.MavlFile("image-embeddings", {"features": f}, dict(m), f"rank {r}")
                     for r, (f, m) in enumerate(parts or [])]
            merged = merge_parts(files, output)
            contract.write_file(output, merged.kind, merged.tensors, merged.meta)
            rows = merged.rows
        except MavlError as exc:
            error = f"rank 0: {exc}"
    distributed.agree(dist, error)
    return rows if dist.main else len(res.ids)


# ---------------------------------------------------------------- predict


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
    """Score images through the whole model (:class:`mavl_cli.mavlmodel.MavlModel`).

    ``opts.heatmap``: a :class:`mavl_cli.heatmaps.HeatmapOptions` to also write explanation maps."""
    o, r = opts or PredictOptions(), run or RunOptions()
    weights, threshold, descriptions, explain = o.weights, o.threshold, o.descriptions, o.explain
    scores_out, json_out, heatmap, shard, ood_threshold = o.scores_out, o.json_out, o.heatmap, o.shard, o.ood_threshold
    device, batch_size, skip_bad = r.device, r.batch_size, r.skip_bad
    from mavl_cli.datasets import collect_inputs
    from mavl_cli.mavlmodel import score_images
    from mavl_cli.modelfile import find_model, load_model
    from mavl_cli.shards import parse_shard

    part = parse_shard(shard)

    from mavl_cli import ood, provenance

    ood.check_percentile(ood_threshold)
    model_file = find_model(model_path)
    contract.check_outputs({"--json": json_out, "--out": scores_out}, [model_file, weights, descriptions])
    model = load_model(model_file)
    meta = model.meta
    w = weights or meta.get("backbone_weights")
    if scores_out:  # never the encoder's own files (a --weights folder, or the one the model records)
        contract.check_output_path(scores_out, contract.model_inputs(w, (meta.get("encoder") or {}).get("id")
                                                                     if isinstance(meta.get("encoder"), dict) else None))
    carried = weights is None and (meta.get("encoder_weights") or {}).get("embedded")  # in the model file itself
    if w not in ("hub", "random", None) and not carried and not Path(w).exists():
        raise MavlError(f"{model.file.path}: its backbone weights {w} are not on this machine; pass --weights FILE_OR_FOLDER")
    if heatmap is not None:
        heatmap.check(list(model.labels) if not descriptions else None)  # labels added from text: checked below
    items, _ = collect_inputs(images)
    if scores_out:
        contract.check_output_path(scores_out, [it.path for it in items])  # `--out a.png` must not replace the image
    all_items, lo, hi = items, 0, len(items)
    if part is not None:  # whole batches of the list, as embed-images --shard does
        from mavl_cli.embed import default_batch_size
        from mavl_cli.runtime import resolve_device
        from mavl_cli.shards import shard_range

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
                               *contract.model_inputs(w, weights)])
    if items or part is None:
        with (progress("predict", len(items), "img") if progress and len(items) > 8 else nullcontext(None)) as advance:
            res = score_images(module, items, device=device, batch_size=batch_size, skip_bad=skip_bad, advance=advance)
    else:  # an empty shard (more shards than batches)
        from mavl_cli.mavlmodel import ImageScores

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
    pred.warnings = _trust_warnings(model)
    if heatmap is not None:
        from mavl_cli.heatmaps import predict_heatmaps

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
            from mavl_cli.contract import command_args
            from mavl_cli.embed import inputs_fingerprint
            from mavl_cli.shards import shard_meta

            fp = inputs_fingerprint(all_items, {"model": meta.get("fingerprint") or str(model.file.path), "batch_size": batch_size})
            smeta["shard"] = shard_meta(part, lo, hi, len(all_items), fp, len(res.skipped), command_args())
        contract.write_file(scores_out, "scores", {"scores": res.probabilities, "thresholds": th}, smeta)
    return pred, res.skipped


def evaluate_maps_stage(maps_dir: str | Path, opts: Any) -> Any:
    """`mavl evaluate-maps`: see :mod:`mavl_cli.mapeval`."""
    from mavl_cli.mapeval import evaluate_maps

    return evaluate_maps(maps_dir, opts)


def _extend_labels(model: Any, descriptions: str, device: str, threshold: float | None = None) -> tuple[Any, list[str]]:
    """Add labels described only in text: embed them with the model's own text encoder.

    Returns (``mavlmodel.LabelText`` for old + new labels, the new label names).
    Fusion models: the new labels get the mean bias of the trained ones (no
    data says more); aspects are aligned by name, aspects the model has never
    seen are dropped. Zero-shot models: the new labels get prompts like the
    others (:func:`mavl_cli.zeroshot.extend_labels`). New labels' thresholds
    are ``threshold`` or the default.
    """
    from mavl_cli.descriptions import read_descriptions
    from mavl_cli.mavlmodel import LabelText
    from mavl_cli.text_embed import embed_descriptions

    meta = model.meta
    desc = read_descriptions(descriptions)
    names = list(model.labels)
    new = [lab for lab in desc.labels if lab not in names]
    if not new:
        raise MavlError(f"{descriptions}: every label in it is already one of the model's labels")
    th = np.concatenate([model.thresholds, np.full(len(new), DEFAULT_THRESHOLD if threshold is None else threshold, np.float32)])
    if meta.get("scorer") == "zeroshot":
        from mavl_cli.zeroshot import extend_labels

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


# ---------------------------------------------------------------- zero-shot


def zero_shot_stage(opts: Any, set_default: bool = False) -> StageResult:
    """A model file from an aligned image-text encoder and label descriptions (``zeroshot.ZeroShotOptions``)."""
    from mavl_cli.modelfile import install_default
    from mavl_cli.zeroshot import build_zero_shot

    contract.check_output_path(opts.output, [p for p in (opts.descriptions, opts.weights) if p]
                               + contract.model_inputs(opts.encoder, opts.weights))
    tensors, meta, summary = build_zero_shot(opts)
    blob = contract.to_bytes("model", tensors, meta)
    contract.atomic_write_bytes(opts.output, blob)
    notes = [f"thresholds are the default {DEFAULT_THRESHOLD}: run `mavl tune-threshold` on validation images or embeddings"]
    if set_default:
        notes.append(f"installed as the default model: {install_default(blob)}")
    table = [{"label": lab, "positive": " | ".join(t for slot in pos for t in slot)[:90], "negative": " | ".join(neg)[:60]}
             for lab, pos, neg in zip(meta["labels"], meta["aspect_texts"], meta["negative_texts"])]
    return StageResult(opts.output, summary, table, notes)


# ---------------------------------------------------------------- phantoms


def phantoms_stage(out_dir: str | Path, n: int = 600, seed: int = 0, size: int = 256, masks: bool = False,
                   progress: Callable[[str, int, str], Any] | None = None) -> StageResult:
    """Synthetic radiographs with labelled findings (:mod:`mavl_cli.phantoms`); ``masks``: where each finding is."""
    from mavl_cli.phantoms import FINDINGS, generate_phantoms

    with (progress("phantoms", n, "img") if progress else nullcontext(None)) as advance:
        ps = generate_phantoms(out_dir, n=n, seed=seed, size=size, masks=masks,
                               progress=(lambda _done: advance(1)) if advance else None)
    return StageResult(str(ps.root), {"images": ps.n_images, "findings": ", ".join(FINDINGS),
                                      **{f"{k} split": str(v) for k, v in ps.splits.items()},
                                      **({"masks": str(ps.root / "masks")} if masks else {})})
