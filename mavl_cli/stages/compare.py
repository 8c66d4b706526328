"""The ``compare`` stage: two models' scores on one test set, paired (AUROC difference, DeLong, F1)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mavl_cli.core.defaults import DEFAULT_THRESHOLD
from mavl_cli.core.errors import MavlError
from mavl_cli.core.options import EvalOptions, LabelOptions
from mavl_cli.datasets.ids import normalize_many
from mavl_cli.datasets.reader import read_labels
from mavl_cli.datasets.table import match_rows
from mavl_cli.evaluation.compare import Side, compare
from mavl_cli.evaluation.metrics import prepare
from mavl_cli.stages.scores import load_score_set


def compare_stage(a_path: str, b_path: str, labels: str, embeddings: str | None = None, embeddings_b: str | None = None,
                  opts: EvalOptions | None = None, label_opts: LabelOptions | None = None) -> tuple[dict[str, Any], list[str]]:
    """Paired comparison of two score sets on the images and labels they share with the label file
    (``opts``: bootstrap, seed, threshold; default 1000 paired resamples)."""

    o, read = opts or EvalOptions(bootstrap=1000), label_opts or LabelOptions(uncertain="ignore")
    bootstrap, seed, threshold = o.bootstrap, o.seed, o.threshold
    uncertain, label_map = read.uncertain, read.renames
    a = load_score_set(a_path, embeddings)
    b = load_score_set(b_path, embeddings_b or embeddings)
    table = read_labels(labels, uncertain=uncertain, label_map=label_map)
    notes: list[str] = []
    names = [n for n in a.names if n in b.names and n in table.names]
    if not names:
        raise MavlError(f"{a_path}, {b_path} and {labels} share no label name (A: {', '.join(a.names[:6])}; "
                        f"B: {', '.join(b.names[:6])}; labels: {', '.join(table.names[:6])})")
    dropped = sorted((set(a.names) | set(b.names)) - set(names))
    if dropped:
        notes.append(f"compared on {len(names)} shared labels; left out: {', '.join(dropped)}")

    na, nb = normalize_many(a.ids), normalize_many(b.ids)
    in_b = {i: k for k, i in enumerate(nb)}
    # ids written from another root (`predict data/` vs a tool's `data/images/x.png`) pair through the label row
    # both match, as evaluate matches them; an id both name exactly is paired as before
    ra, rb = match_rows(na, table.ids, table.suffix_aliases), match_rows(nb, table.ids, table.suffix_aliases)
    b_at_row: dict[int, int] = {}
    for k, r in enumerate(rb):
        if r >= 0:
            b_at_row.setdefault(r, k)
    pairs = [(k, in_b[i]) if i in in_b else (k, b_at_row[ra[k]]) for k, i in enumerate(na)
             if i in in_b or (ra[k] >= 0 and ra[k] in b_at_row)]
    common = [k for k, _ in pairs]
    if not common:
        raise MavlError(f"{a_path} and {b_path} share no image")
    if len(common) != len(na) or len(common) != len(nb):
        notes.append(f"compared on the {len(common)} images both score ({len(na)} in A, {len(nb)} in B)")
    ids = [a.ids[k] for k in common]
    rows_b = [kb for _, kb in pairs]
    table = table.select(names).align(ids)
    ja = [a.names.index(n) for n in names]
    jb = [b.names.index(n) for n in names]
    sa, sb = a.scores[np.ix_(common, ja)], b.scores[np.ix_(rows_b, jb)]
    ta, tb = a.thresholds[ja], b.thresholds[jb]
    if threshold is not None:
        ta = tb = np.full(len(names), threshold, np.float32)
    else:
        for side, path in ((a, a_path), (b, b_path)):
            if not side.tuned:
                notes.append(f"{path}: thresholds are the default {DEFAULT_THRESHOLD} (untuned); F1 differences compare at {DEFAULT_THRESHOLD}")
    y, _, m, _ = prepare(table.y, sa, table.mask, names)
    res = compare(y, m, Side(str(a_path), sa, ta), Side(str(b_path), sb, tb), names, table.groups, bootstrap, seed)
    res["notes"] = notes
    return res, notes
