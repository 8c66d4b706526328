"""One function per pipeline stage: files in, files out, a summary back.

The CLI only parses options and renders these summaries; ``mavl demo`` and
scripts call the same functions. Each stage validates its inputs (kinds,
shapes, label names) before doing any work and writes atomically.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from mavl_cli.core.errors import MavlError
from mavl_cli.core.options import LabelOptions, Validation
from mavl_cli.datasets.ids import data_fingerprint
from mavl_cli.datasets.join import load_labelled
from mavl_cli.evaluation.metrics import confusion_counts, f1_from_counts
from mavl_cli.evaluation.thresholds import tune
from mavl_cli.io.files import atomic_write_bytes, check_output_path, check_outputs
from mavl_cli.io.mavlfile import MavlFile, read_file, to_bytes, write_file
from mavl_cli.models.carried import tensor_fingerprint
from mavl_cli.models.fusion import AGGREGATES
from mavl_cli.models.lrf import lrf_embed, lrf_features
from mavl_cli.models.modelfile import (
    build_model,
    check_install_default,
    install_default,
)
from mavl_cli.stages.evaluate import score_labelled
from mavl_cli.stages.result import StageResult
from mavl_cli.training.loop import check_rank_keep, choose_validation
from mavl_cli.training.train import FusionConfig, LRFConfig, train_fusion, train_lrf
from mavl_cli.trust import ood
from mavl_cli.trust.provenance import chain_synthetic, synthetic_source, training_record


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
    """``config``: a :class:`mavl_cli.training.train.LRFConfig`; ``validation``: ``--val`` embeddings, else a held-out split."""

    config = config or LRFConfig()
    read, v = label_opts or LabelOptions(), validation or Validation()
    val = v.embeddings
    check_outputs({"-o": output, "--embed-out": embed_out}, [embeddings, labels, val, v.labels])
    emb, data, tr, va, val_desc = _lrf_data(embeddings, labels, config, read, v)
    with (progress("train-lrf", config.epochs, "epoch") if progress else nullcontext(None)) as advance:
        res = train_lrf(tr.split(), va.split() if va else None, config, advance=advance)
    tensors = {k: v.numpy() for k, v in res.state.items()}
    fp = tensor_fingerprint(tensors)
    meta = {
        "labels": data.names,
        **asdict(config),
        "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
        "val_auroc": None if np.isnan(res.val_auroc) else res.val_auroc, "validation": val_desc,
        "uncertain": read.uncertain, "fingerprint": fp, "in_dim": int(emb.tensors["features"].shape[1]),
        **{k: emb.meta.get(k) for k in ("backbone", "backbone_weights", "backbone_args", "preprocessing", "precision")},
        **({"encoder": emb.meta["encoder"]} if emb.meta.get("encoder") else {}),
        "train_embeddings": str(embeddings), "train_labels": str(labels),
        "synthetic": _synthetic(labels, emb.meta),
    }
    write_file(output, "lrf-head", tensors, meta)
    if embed_out is not None:
        _write_lrf_embeddings(embed_out, tensors, emb, fp)
    return StageResult(
        output=output,
        summary={"images": len(tr.ids), "validation": val_desc, "labels": len(data.names), "rank": config.rank,
                 "keep": config.keep, "eta": config.eta, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
                 "val_macro_auroc": res.val_auroc},
        table=res.history,
        notes=[*data.notes, *(va.notes if val is not None else [])],
    )


def _lrf_data(embeddings: str, labels: str, config: Any, read: LabelOptions, v: Validation) -> tuple[Any, ...]:
    """Read and check the training embeddings and labels, and choose the validation data.

    Returns (embeddings file, labelled data, training part, validation part or None, validation description)."""

    uncertain, label_map = read.uncertain, read.renames
    val, val_labels = v.embeddings, v.labels
    emb = read_file(embeddings, expect="image-embeddings")
    if emb.meta.get("space") == "lrf":
        raise MavlError(f"{embeddings}: these embeddings are already LRF-projected; train-lrf needs backbone features")
    d = emb.tensors["features"].shape[1]
    check_rank_keep(config.rank, config.keep, d, str(embeddings))
    data = load_labelled(emb, labels, names=read.names, uncertain=uncertain, label_map=label_map)
    choice = choose_validation(len(data.ids), str(val) if val is not None else None, v.split, config.seed, data.groups)
    if val is not None:
        vemb = read_file(val, expect="image-embeddings")
        _same_backbone(emb, vemb)
        tr, va = data, load_labelled(vemb, val_labels or labels, names=data.names, uncertain=uncertain, label_map=label_map)
    elif choice.val is not None:
        tr, va = data.subset(choice.train), data.subset(choice.val)
    else:
        tr, va = data, None
    return emb, data, tr, va, choice.description


def _write_lrf_embeddings(path: str, tensors: dict[str, np.ndarray], emb: MavlFile, fp: str) -> None:
    """``--embed-out``: the training embeddings projected by the new LRF head."""

    z = lrf_embed(tensors, emb.tensors["features"].astype(np.float32))
    zmeta = {k: v for k, v in emb.meta.items() if not k.startswith("mavl_") and k != "command"}
    zmeta.update(space="lrf", feature_dim=int(z.shape[1]), lrf_fingerprint=fp)
    write_file(path, "image-embeddings", {"features": z}, zmeta)


def _same_backbone(a: MavlFile, b: MavlFile) -> None:
    da, db = a.tensors["features"].shape[1], b.tensors["features"].shape[1]
    if da != db:
        raise MavlError(f"{b.path}: {db}-d features, but {a.path} has {da}-d (embed both with the same backbone)")
    if a.meta.get("backbone") != b.meta.get("backbone") or a.meta.get("space", "backbone") != b.meta.get("space", "backbone"):
        raise MavlError(
            f"{b.path}: embedded with {b.meta.get('backbone')} ({b.meta.get('space', 'backbone')} space), "
            f"but {a.path} with {a.meta.get('backbone')} ({a.meta.get('space', 'backbone')} space)"
        )


@dataclass(frozen=True)
class _FuseData:
    """The checked inputs of `fuse`: files read, fusion features and labels joined."""

    emb: MavlFile
    txt: MavlFile
    head: MavlFile | None  # --lrf
    x: np.ndarray  # the fusion input of the training images
    data: Any  # the labelled training data
    vdata: Any  # the labelled --val data, None without it


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
    """``config``: a :class:`mavl_cli.training.train.FusionConfig`; ``validation.embeddings``: keep the best epoch on them."""

    config = config or FusionConfig()
    read, v = label_opts or LabelOptions(), validation or Validation()
    uncertain, val = read.uncertain, v.embeddings
    aggregate = config.aggregate
    fd = _fuse_data(embeddings, text, labels, output, aggregate, lrf, v, read, set_default)
    emb, head, data, vdata = fd.emb, fd.head, fd.data, fd.vdata
    t_emb = fd.txt.tensors["embeddings"].astype(np.float32)
    t_mask = fd.txt.tensors["mask"].astype(bool)
    with (progress("fuse", config.epochs, "epoch") if progress else nullcontext(None)) as advance:
        res = train_fusion(data.split(), t_emb, t_mask, vdata.split() if vdata else None, config, advance=advance)
    cfg = {"img_dim": int(fd.x.shape[1]), "txt_dim": int(t_emb.shape[2]), "dim": config.dim, "aggregate": aggregate,
           "n_aspects": int(t_emb.shape[1])}
    image_meta = dict(emb.meta)
    if head is not None and image_meta.get("space") != "lrf":
        image_meta["feature_dim"] = int(emb.tensors["features"].shape[1])
    extra = {"seed": config.seed, "uncertain": uncertain, "train": {"embeddings": str(embeddings), "labels": str(labels),
             "images": len(data.ids), "fingerprint": data_fingerprint(data.ids), **asdict(config), "best_epoch": res.best_epoch,
             "val": str(val) if val else None, "val_auroc": None if np.isnan(res.val_auroc) else res.val_auroc}}
    extra.update(_trust_meta(data, labels, embeddings, emb, head))
    tensors, meta = build_model({k: v.numpy() for k, v in res.state.items()}, cfg, fd.txt, image_meta, head, extra)

    ood_tensors, meta["ood"] = ood.fit(data.x, vdata.x if vdata is not None else None, seed=config.seed)
    tensors.update(ood_tensors)
    blob = to_bytes("model", tensors, meta)
    atomic_write_bytes(output, blob)
    notes = [*data.notes, *(vdata.notes if vdata else [])]
    if set_default:
        notes.append(f"installed as the default model: {install_default(blob)}")
    last = res.history[-1] if res.history else {}
    return StageResult(output, {"images": len(data.ids), "labels": len(fd.txt.labels()), "aspects": int(t_emb.shape[1]),
                                "aggregate": aggregate, "best_epoch": res.best_epoch, "final_bce": last.get("bce"),
                                "scale": last.get("scale"), "val_macro_auroc": res.val_auroc}, res.history, notes)


def _fuse_data(embeddings: str, text: str, labels: str, output: str, aggregate: str, lrf: str | None, v: Validation,
               read: LabelOptions, set_default: bool) -> _FuseData:
    """Check `fuse`'s options and output path, read its files and join the labels (training and ``--val``)."""

    uncertain, label_map = read.uncertain, read.renames
    val, val_labels = v.embeddings, v.labels
    if aggregate not in AGGREGATES:
        raise MavlError(f"unknown --aggregate {aggregate!r}; use one of {', '.join(AGGREGATES)}")
    check_output_path(output, [embeddings, text, labels, lrf, val, val_labels])
    if set_default:
        check_install_default([embeddings, text, labels, lrf, val, val_labels, output])
    emb = read_file(embeddings, expect="image-embeddings")
    txt = read_file(text, expect="text-embeddings")
    head = read_file(lrf, expect="lrf-head") if lrf else None
    x = _fusion_features(emb, head)
    names = txt.labels()
    data = load_labelled(emb, labels, names=names, uncertain=uncertain, label_map=label_map, x=x)
    vdata = None
    if val is not None:
        vemb = read_file(val, expect="image-embeddings")
        _same_backbone(emb, vemb)
        vdata = load_labelled(vemb, val_labels or labels, names=names, uncertain=uncertain, label_map=label_map,
                              x=_fusion_features(vemb, head))
    return _FuseData(emb, txt, head, x, data, vdata)


def _synthetic(labels: str, *upstream: dict[str, Any] | None) -> dict[str, Any] | None:
    """The synthetic-data record of a stage's inputs: its label file's marker, else what upstream files carry."""

    return chain_synthetic(synthetic_source(labels), *upstream)


def _trust_meta(data: Any, labels: str, embeddings: str, emb: MavlFile, head: MavlFile | None) -> dict[str, Any]:
    """What a model records about its training data (provenance, synthetic mark)."""

    syn = _synthetic(labels, emb.meta, head.meta if head is not None else None)
    return {"training_data": training_record(data.ids, labels, embeddings, syn),
            "synthetic_training_data": bool(syn), "synthetic_source": syn}


def _fusion_features(emb: MavlFile, head: MavlFile | None) -> np.ndarray:
    if head is None:
        return emb.tensors["features"].astype(np.float32)
    return lrf_features(emb, head.tensors, head.meta, f"the LRF head {head.path}")


def tune_stage(
    model_path: str, embeddings: str, labels: str, output: str, method: str = "sweep",
    min_sensitivity: float | None = None, label_opts: LabelOptions | None = None,
) -> StageResult:
    read = label_opts or LabelOptions()
    uncertain, label_map = read.uncertain, read.renames

    check_output_path(output, [embeddings, labels], may_replace=[model_path])  # MODEL itself may be the output
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
    write_file(output, "model", tensors, meta)
    table = [{"label": n, "threshold": float(th[j]), "f1": float(f1[j]), "support": int(tp[j] + fn[j]),
              "recall": float(tp[j] / (tp[j] + fn[j])) if tp[j] + fn[j] else float("nan")} for j, n in enumerate(sc.names)]
    return StageResult(output, {"method": method, "images": len(sc.ids), "macro_f1": float(res.objective)}, table,
                       [*sc.notes, *res.notes])
