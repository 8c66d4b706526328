"""Subgroup analysis for `evaluate --by COLUMN`: does the model hold for women, older patients, AP films?

A column comes from the label file or from a ``--metadata`` CSV joined on the
image path (or, failing that, on the patient id). Numeric columns are binned
with ``--by 'age:0,40,60,80'``: bins ``[0, 40)``, ``[40, 60)``, ``[60, 80)``,
values from 80 up in ``>=80`` (and below the first edge in ``<0``). Missing
values form their own ``(missing)`` group.

Per subgroup: images, patients, and per label the evaluated entries,
positives, prevalence, AUROC with a patient-bootstrap percentile CI
(patients resampled within the subgroup) and F1 at the model's thresholds;
per label the largest AUROC gap between subgroups with a defined AUROC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.ids import normalize_many as _normalize_many
from mavl_cli.datasets.sniff import PATH_COLUMNS as _PATH_COLUMNS
from mavl_cli.datasets.sniff import PATIENT_COLUMNS as _PATIENT_COLUMNS
from mavl_cli.datasets.sniff import canon as _canon
from mavl_cli.datasets.table import match_rows as _match_rows
from mavl_cli.evaluation.bootstrap import (
    AurocEngine,
    Resampler,
    nanmean_rows,
    percentile_ci,
    units_of,
)
from mavl_cli.evaluation.metrics import (
    auroc_auprc,
    confusion_counts,
    curve_counts,
    f1_from_counts,
)

MISSING = "(missing)"


@dataclass
class BySpec:
    column: str
    edges: list[float] | None = None

    @property
    def text(self) -> str:
        return self.column if self.edges is None else f"{self.column}:{','.join(f'{e:g}' for e in self.edges)}"


def parse_by(spec: str) -> BySpec:
    """``'sex'`` or ``'age:0,40,60,80'`` (ascending numeric bin edges)."""
    spec = spec.strip()
    if not spec:
        raise MavlError("--by needs a column name, e.g. --by sex or --by 'age:0,40,60,80'")
    if ":" not in spec:
        return BySpec(spec)
    col, _, edges = spec.rpartition(":")
    try:
        e = [float(x) for x in edges.split(",") if x.strip()]
    except ValueError:
        raise MavlError(f"--by {spec!r}: bin edges must be numbers, e.g. 'age:0,40,60,80'") from None
    if not all(math.isfinite(x) for x in e):  # NaN compares false with everything: its bins would be silently wrong
        raise MavlError(f"--by {spec!r}: bin edges must be finite numbers, e.g. 'age:0,40,60,80' (>= the last is a bin)")
    if len(e) < 2 or any(b <= a for a, b in zip(e, e[1:])):
        raise MavlError(f"--by {spec!r}: give at least two strictly increasing bin edges, e.g. 'age:0,40,60,80'")
    if not col.strip():
        raise MavlError(f"--by {spec!r}: no column name before ':'")
    return BySpec(col.strip(), e)


def _fmt_edge(v: float) -> str:
    return f"{v:g}"


def bin_values(values: list[Any], edges: list[float], column: str) -> list[str]:
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "":
            out.append(MISSING)
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise MavlError(f"--by {column}: value {v!r} is not a number, so it cannot be binned") from None
        if x < edges[0]:
            out.append(f"<{_fmt_edge(edges[0])}")
        elif x >= edges[-1]:
            out.append(f">={_fmt_edge(edges[-1])}")
        else:
            k = int(np.searchsorted(edges, x, side="right")) - 1
            out.append(f"[{_fmt_edge(edges[k])}, {_fmt_edge(edges[k + 1])})")
    return out


def _group_order(values: list[str], edges: list[float] | None) -> list[str]:
    seen = sorted(set(values) - {MISSING}, key=str)
    if edges is not None:
        order = [f"<{_fmt_edge(edges[0])}"] + [f"[{_fmt_edge(a)}, {_fmt_edge(b)})" for a, b in zip(edges, edges[1:])]
        order.append(f">={_fmt_edge(edges[-1])}")
        seen = [g for g in order if g in set(values)]
    return seen + ([MISSING] if MISSING in values else [])


# --------------------------------------------------------------------------
# Reading the column
# --------------------------------------------------------------------------


def _read_table(path: str) -> Any:

    p = Path(path)
    if not p.is_file():
        raise MavlError(f"{path}: file not found", path=p)
    try:
        return pd.read_csv(p, dtype=str, keep_default_na=True, sep=None, engine="python")
    except Exception as exc:  # pandas raises many types for a broken CSV
        raise MavlError(f"{path}: not a readable CSV ({str(exc).splitlines()[0][:120]})", path=p) from None


def _find_col(df: Any, name: str) -> str | None:
    if name in df.columns:
        return name
    hits = [c for c in df.columns if _canon(c) == _canon(name)]
    return hits[0] if hits else None


def _path_col(df: Any) -> str | None:
    cols = {_canon(c): c for c in df.columns}
    return next((cols[c] for c in _PATH_COLUMNS if c in cols), None)


def _patient_col(df: Any) -> str | None:
    cols = {_canon(c): c for c in df.columns}
    extra = ("patient_id",)
    return next((cols[c] for c in (*_PATIENT_COLUMNS, *extra) if c in cols), None)


def _check_repeats(source: str, col: str, have: list[str], values: list[Any], wanted: set[str]) -> None:
    """An evaluated image listed twice with two different values: which subgroup it is in is unknown."""
    first: dict[str, Any] = {}
    for h, v in zip(have, values):
        if h not in wanted:
            continue
        if h in first and str(first[h]) != str(v):
            raise MavlError(f"{source}: image {h!r} is listed twice with different {col!r} values "
                            f"({first[h]!r} and {v!r}); keep one row per image")
        first.setdefault(h, v)


def column_values(spec: BySpec, ids: list[str], groups: list[str] | None, labels_file: str | None,
                  metadata: str | None) -> tuple[list[Any], str]:
    """The column's value for each scored image, and where it came from."""

    tried = []
    for source in [s for s in (labels_file, metadata) if s]:
        df = _read_table(source)
        col = _find_col(df, spec.column)
        if col is None:
            tried.append(f"{source} ({', '.join(map(str, df.columns[:12]))})")
            continue
        pcol = _path_col(df)
        values = df[col].tolist()
        if pcol is not None:
            have = _normalize_many([str(x) for x in df[pcol].tolist()])
            wanted = _normalize_many([str(i) for i in ids])
            _check_repeats(source, col, have, values, set(wanted))
            rows = _match_rows(wanted, have)
            if all(r >= 0 for r in rows):
                return [values[r] for r in rows], f"{source}, joined on {pcol}"
        patient = _patient_col(df)
        if patient is not None and groups is not None:
            by_patient: dict[str, Any] = {}
            for pid, v in zip(df[patient].tolist(), values):
                key = str(pid).strip()
                try:  # NIH: patient ids derived from file names drop leading zeros
                    key = str(int(float(key)))
                except ValueError:
                    pass
                by_patient.setdefault(key, v)
            norm = []
            for g in groups:
                try:
                    norm.append(str(int(float(g))))
                except ValueError:
                    norm.append(str(g))
            if all(g in by_patient for g in norm):
                return [by_patient[g] for g in norm], f"{source}, joined on {patient}"
        raise MavlError(
            f"{source}: has a {spec.column!r} column, but not every evaluated image could be matched by "
            f"{'path' if pcol else 'a path column (none found)'}{' or patient' if patient else ''}"
        )
    where = "; ".join(tried) if tried else "no label file or --metadata given"
    raise MavlError(f"--by {spec.column}: no such column in {where}; pass --metadata CSV with it")


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def analyse(spec: BySpec, values: list[Any], source: str, y: np.ndarray, s: np.ndarray, m: np.ndarray,
            t: np.ndarray, names: list[str], groups: list[str] | None, bootstrap: int, seed: int,
            confidence: float = 0.95) -> dict[str, Any]:
    """Per-subgroup figures for one ``--by`` column (prepared y/s/m arrays)."""

    labels_of = bin_values(values, spec.edges, spec.column) if spec.edges is not None else [
        MISSING if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "" else str(v).strip()
        for v in values
    ]
    arr = np.asarray(labels_of, dtype=object)
    out_groups = []
    for g in _group_order(labels_of, spec.edges):
        rows = np.flatnonzero(arr == g)
        yg, sg, mg = y[rows], s[rows], m[rows]
        gg = None if groups is None else [groups[i] for i in rows]
        tp, fp, fn, _ = confusion_counts(yg, sg, mg, t)
        f1 = f1_from_counts(tp, fp, fn)
        auc = np.full(len(names), np.nan)
        for j in range(len(names)):
            yj, sj = yg[mg[:, j], j], sg[mg[:, j], j]
            if 0 < yj.sum() < yj.size:
                _, tps, fps = curve_counts(yj, sj)
                auc[j] = auroc_auprc(tps, fps)[0]
        ci = np.full((len(names), 2), np.nan)
        macro_ci = (float("nan"), float("nan"))
        if bootstrap and rows.size:
            inverse, n_units = units_of(rows.size, gg)
            engine = AurocEngine(yg, sg, mg, inverse, n_units)
            draws = np.concatenate([engine.auroc(c) for c in Resampler(n_units, seed).chunks(bootstrap, engine.chunk_size(bootstrap))])
            for j in range(len(names)):
                if np.isfinite(auc[j]):
                    ci[j] = percentile_ci(draws[:, j], confidence)
            if np.isfinite(auc).any():
                macro_ci = percentile_ci(nanmean_rows(draws[:, np.isfinite(auc)]), confidence)
        n_eval = mg.sum(axis=0)
        pos = (yg.astype(bool) & mg).sum(axis=0)
        out_groups.append({
            "group": g, "images": int(rows.size), "patients": int(len(set(gg))) if gg is not None else None,
            "macro_auroc": float(np.nanmean(auc)) if np.isfinite(auc).any() else None,
            "macro_auroc_ci": list(macro_ci), "macro_f1": float(f1.mean()) if len(names) else None,
            "labels": [{"name": n, "n": int(n_eval[j]), "positives": int(pos[j]),
                        "prevalence": float(pos[j] / n_eval[j]) if n_eval[j] else None,
                        "auroc": None if np.isnan(auc[j]) else float(auc[j]), "auroc_ci": ci[j].tolist(),
                        "f1": float(f1[j])} for j, n in enumerate(names)],
        })
    gaps = []
    for j, n in enumerate(names):
        defined = [(g["labels"][j]["auroc"], g["group"]) for g in out_groups
                   if g["labels"][j]["auroc"] is not None and g["group"] != MISSING]
        if len(defined) < 2:
            gaps.append({"label": n, "auroc_gap": None, "highest": None, "lowest": None,
                         "groups_with_auroc": len(defined)})
            continue
        hi, lo = max(defined), min(defined)
        f1s = [g["labels"][j]["f1"] for g in out_groups if g["group"] != MISSING]
        gaps.append({"label": n, "auroc_gap": hi[0] - lo[0], "highest": {"group": hi[1], "auroc": hi[0]},
                     "lowest": {"group": lo[1], "auroc": lo[0]}, "f1_gap": max(f1s) - min(f1s),
                     "groups_with_auroc": len(defined)})
    return {"column": spec.column, "spec": spec.text, "source": source, "groups": out_groups, "gaps": gaps}


def subgroup_report(specs: list[str], ids: list[str], groups: list[str] | None, labels_file: str | None,
                    metadata: str | None, y: np.ndarray, s: np.ndarray, m: np.ndarray, t: np.ndarray,
                    names: list[str], bootstrap: int, seed: int) -> dict[str, Any]:
    parsed = [parse_by(x) for x in specs]
    cols = []
    for spec in parsed:
        values, source = column_values(spec, ids, groups, labels_file, metadata)
        cols.append(analyse(spec, values, source, y, s, m, t, names, groups, bootstrap, seed))
    return {"bootstrap": int(bootstrap), "resampled": "patients" if groups is not None else "images",
            "columns": cols}
