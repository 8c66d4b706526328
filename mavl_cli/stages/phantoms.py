"""The ``phantoms`` stage: a folder of synthetic chest films with labels (and masks) on disk."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from mavl_cli.stages.result import StageResult
from mavl_cli.synthetic.phantoms import FINDINGS, generate_phantoms


def phantoms_stage(out_dir: str | Path, n: int = 600, seed: int = 0, size: int = 256, masks: bool = False,
                   progress: Callable[[str, int, str], Any] | None = None) -> StageResult:
    """Synthetic radiographs with labelled findings (:mod:`mavl_cli.synthetic.phantoms`); ``masks``: where each finding is."""

    with (progress("phantoms", n, "img") if progress else nullcontext(None)) as advance:
        ps = generate_phantoms(out_dir, n=n, seed=seed, size=size, masks=masks,
                               progress=(lambda _done: advance(1)) if advance else None)
    return StageResult(str(ps.root), {"images": ps.n_images, "findings": ", ".join(FINDINGS),
                                      **{f"{k} split": str(v) for k, v in ps.splits.items()},
                                      **({"masks": str(ps.root / "masks")} if masks else {})})
