"""Bad inputs to info, phantoms, demo, a mistyped command, and every file in a slot meant for another kind: each fails as a user error (the contract in catalogue.check_case)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bad_inputs.catalogue import (
    CASES,
    KIND_FILES,
    PAIRS,
    SURFACES,
    case_id,
    cases_for,
    check_case,
    command_of,
)
from tests.conftest import run_cli


@pytest.mark.parametrize("case", cases_for(*SURFACES["files"]), ids=case_id)
def test_bad_input(case, bad: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_case(case, bad, tmp_path, monkeypatch)


def test_every_case_belongs_to_one_surface() -> None:
    """Each catalogue case runs in exactly one of the surface files (none is dropped by the split)."""
    counts = [sum(command_of(c) in cmds for cmds in SURFACES.values()) for c in CASES]
    assert len(CASES) > 150 and counts == [1] * len(CASES), [case_id(c) for c, n in zip(CASES, counts) if n != 1]


@pytest.mark.parametrize("slot,want,build,kind", PAIRS, ids=[f"{p[0]}<-{p[3]}" for p in PAIRS])
def test_wrong_kind(slot, want, build, kind, bad, tmp_path, monkeypatch) -> None:
    """Any mavl file in a slot meant for another kind: one line naming the file, its kind and the wanted kind."""
    from mavl_cli.cli import app as cli
    from mavl_cli.io.mavlfile import KINDS

    monkeypatch.setitem(cli._DEBUG, "on", False)
    x = bad[KIND_FILES[kind]]
    r = run_cli([str(a) for a in build(bad, x, tmp_path / "out.st")])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert x.name in lines[0] and KINDS[kind][0] in lines[0] and KINDS[want][0] in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_pickled_weights_are_refused_and_never_run(bad, tmp_path, monkeypatch) -> None:
    """`.pth` files go through torch.load(weights_only=True): a __reduce__ payload is refused, not run."""
    import torch

    from mavl_cli.core.errors import MavlError
    from mavl_cli.encoders.common import load_state_dict

    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(MavlError, match="refusing to load"):
        load_state_dict(bad["evil_pth"])
    assert calls == [True]
    assert not bad["marker"].exists()
    # Plain tensors in a .pth still load (weights_only allows them).
    good = tmp_path / "ok.pth"
    torch.save({"w": torch.ones(2)}, good)
    assert load_state_dict(good)["w"].tolist() == [1.0, 1.0]
    assert calls == [True, True]
