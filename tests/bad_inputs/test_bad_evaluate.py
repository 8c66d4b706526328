"""Bad inputs to tune-threshold, calibrate, evaluate and evaluate-maps: each fails as a user error (the contract in catalogue.check_case)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bad_inputs.catalogue import SURFACES, case_id, cases_for, check_case
from tests.bad_inputs.forge import contract_meta, rewrite_header, set_meta
from tests.conftest import run_cli


@pytest.mark.parametrize("case", cases_for(*SURFACES["evaluate"]), ids=case_id)
def test_bad_input(case, bad: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_case(case, bad, tmp_path, monkeypatch)


def test_s3_29_compare_pairs_ids_written_from_another_root(bad, tmp_path) -> None:
    """`compare` paired A and B by exact id, so `predict data/images` ids against a tool's `data/images/x.png` ids
    "shared no image" although `evaluate` matched both to the label file. They now pair through the label row."""
    r = run_cli(["compare", bad["scores"], bad["scores"], "--labels", bad["root"] / "labels.csv", "--bootstrap", "20", "--json"])
    assert r.exit_code == 0, r.stderr
    same = json.loads(r.stdout)
    moved = tmp_path / "moved.st"
    ids = contract_meta(bad["scores"])["ids"]
    moved.write_bytes(rewrite_header(bad["scores"].read_bytes(), set_meta("ids", [f"elsewhere/images/{i}" for i in ids])))
    r = run_cli(["compare", bad["scores"], moved, "--labels", bad["root"] / "labels.csv", "--bootstrap", "20", "--json"])
    assert r.exit_code == 0, r.stderr
    other = json.loads(r.stdout)
    assert other.pop("b") == str(moved) and same.pop("b") == str(bad["scores"])
    assert other == same and other["images"] == len(ids)
