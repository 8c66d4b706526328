"""Same inputs and --seed give byte-identical files on CPU; another seed gives other weights.

Each command runs twice with the same relative output name from two
different working folders, so even the recorded ``command`` metadata is the
same and whole files can be compared byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.conftest import run_cli

from mavl_cli.io.mavlfile import loads


def _commands(chain: dict) -> dict[str, callable]:
    d, ps = chain["dir"], chain["phantoms"]
    tr, va = ps.splits["train"], ps.splits["val"]
    return {
        "train-lrf": lambda seed: ["train-lrf", d / "train.st", "--labels", tr, "--rank", "8", "--keep", "4", "--epochs", "4",
                                   "--val-split", "0.2", "--dropout", "0.2", "--seed", seed, "-o", "out.st"],
        "fuse": lambda seed: ["fuse", d / "train.st", d / "text.st", "--lrf", d / "lrf.st", "--labels", tr, "--epochs", "4",
                              "--batch-size", "8", "--val", d / "val.st", "--val-labels", va, "--seed", seed, "-o", "out.st"],
        "tune-threshold": lambda seed: ["tune-threshold", d / "model.st", d / "val.st", "--labels", va, "--method", "per-label",
                                        "-o", "out.st"],
    }


def _run_in(folder: Path, argv: list, monkeypatch: pytest.MonkeyPatch) -> bytes:
    folder.mkdir()
    monkeypatch.chdir(folder)
    r = run_cli([str(a) for a in argv])
    assert r.exit_code == 0, r.stderr
    return (folder / "out.st").read_bytes()


@pytest.mark.parametrize("command", ["train-lrf", "fuse", "tune-threshold"])
def test_same_seed_same_bytes(command: str, chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = _commands(chain)[command]
    a = _run_in(tmp_path / "a", build("3"), monkeypatch)
    b = _run_in(tmp_path / "b", build("3"), monkeypatch)
    assert a == b, f"{command}: two runs with --seed 3 differ"


@pytest.mark.parametrize("command", ["train-lrf", "fuse"])
def test_other_seed_other_weights(command: str, chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = _commands(chain)[command]
    a = loads(_run_in(tmp_path / "a", build("3"), monkeypatch))
    b = loads(_run_in(tmp_path / "b", build("4"), monkeypatch))
    assert a.meta["seed"] == 3 and b.meta["seed"] == 4
    learned = [k for k in a.tensors if k.startswith(("proj", "classifier", "fusion."))]
    assert learned
    assert any(not np.array_equal(a.tensors[k], b.tensors[k]) for k in learned)
