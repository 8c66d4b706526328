"""The data-set options every label-reading command shares (``--split``, ``--views``, ...).

:func:`with_dataset_options` adds them to a Typer command and hands the
command its ``--labels`` (and ``--val-labels``) as a
:class:`~mavl_cli.datasets.options.LabelSource` carrying them, so stages need
no extra arguments. Parsing only: reading happens in :mod:`mavl_cli.datasets`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import typer

_OPTIONS = {
    "metadata": typer.Option(None, "--metadata", help="MIMIC-CXR image metadata CSV (default: mimic-cxr-2.0.0-metadata.csv.gz beside --labels); for `evaluate --by`, any CSV with subgroup columns (sex, age, view...), joined on image path or patient."),
    "split_file": typer.Option(None, "--split-file", help="MIMIC-CXR split CSV (default: mimic-cxr-2.0.0-split.csv.gz beside --labels)."),
    "split": typer.Option(None, "--split", help="Keep only this split of the label file: train, validate or test (MIMIC-CXR, or a file with a split column)."),
    "views": typer.Option(None, "--views", help="Keep only these views, e.g. PA,AP (data sets with a view column)."),
    "vote": typer.Option(None, "--vote", help="VinDr-CXR, several readers per image: a finding is positive if 'any' reader (default) or the 'majority' marks it."),
}


def with_dataset_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the data-set options to ``command``; its ``labels``/``val_labels`` arrive as LabelSource when used."""
    sig = inspect.signature(command, eval_str=True)

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mavl_cli.datasets.options import DatasetOptions, parse_views, source

        value = {name: kwargs.get(name) if name in own else kwargs.pop(name, None) for name in _OPTIONS}
        opts = DatasetOptions(metadata=value["metadata"], split_file=value["split_file"], split=value["split"],
                              views=parse_views(value["views"]), vote=value["vote"])
        if opts.given():
            val_labels = kwargs.get("val_labels")
            if val_labels is None and kwargs.get("val") is not None:
                val_labels = kwargs.get("labels")  # --val embeddings with "--val-labels (default: --labels)"
            if val_labels is not None:
                # validation rows are whatever the --val embeddings hold: same files and views, any split
                kwargs["val_labels"] = source(val_labels, opts.without_split())
            kwargs["labels"] = source(kwargs.get("labels"), opts)
        return command(*args, **kwargs)

    params = list(sig.parameters.values())
    # an option the command declares itself (evaluate's own --metadata) stays the command's; its value is shared
    own = {name for name in _OPTIONS if name in sig.parameters}
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=Optional[str])
             for name, opt in _OPTIONS.items() if name not in own]
    wrapper.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params + extra if p.annotation is not p.empty}
    return wrapper
