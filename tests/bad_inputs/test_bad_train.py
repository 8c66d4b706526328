"""Bad inputs to train-lrf, fuse and embed-text: each fails as a user error (the contract in catalogue.check_case)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bad_inputs.catalogue import SURFACES, case_id, cases_for, check_case


@pytest.mark.parametrize("case", cases_for(*SURFACES["train"]), ids=case_id)
def test_bad_input(case, bad: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_case(case, bad, tmp_path, monkeypatch)
