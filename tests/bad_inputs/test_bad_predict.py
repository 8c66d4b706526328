"""Bad inputs to predict and zero-shot: each fails as a user error (the contract in catalogue.check_case)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bad_inputs.catalogue import PH, SURFACES, case_id, cases_for, check_case
from tests.conftest import run_cli


@pytest.mark.parametrize("case", cases_for(*SURFACES["predict"]), ids=case_id)
def test_bad_input(case, bad: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_case(case, bad, tmp_path, monkeypatch)


def test_s3_15_heatmap_of_a_label_added_from_text(bad, tmp_path) -> None:
    """`predict --descriptions extra.json --heatmap-labels Pneumonia`: a label the descriptions add can be mapped
    (was: refused as unknown, since --heatmap-labels was checked against the model's labels only)."""
    from mavl_cli.io.mavlfile import read_file

    desc = tmp_path / "extra.json"
    desc.write_text(json.dumps({"Pneumonia": ["patchy airspace consolidation"]}))
    r = run_cli([*PH(bad, bad["img0"]), "--descriptions", desc, "--heatmap", tmp_path / "hm", "--heatmap-labels", "Pneumonia"])
    assert r.exit_code == 0, r.stderr
    maps = read_file(tmp_path / "hm" / f"{bad['img0'].stem}.maps.safetensors")
    assert maps.labels() == ["Pneumonia"] and (tmp_path / "hm" / f"{bad['img0'].stem}.Pneumonia.png").is_file()
