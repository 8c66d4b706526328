"""The option specs the stages take (mavl_cli.core.options): they check their own values; defaults live in one place."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.labelmap import parse_label_options

PACKAGE = Path(__file__).resolve().parents[2] / "mavl_cli"


def test_specs_refuse_bad_values_with_the_commands_messages():
    from mavl_cli.core.options import (
        EvalOptions,
        FinetuneOptions,
        LabelOptions,
        PredictOptions,
        RunOptions,
        Validation,
    )

    with pytest.raises(MavlError, match=r"--uncertain must be ones, zeros or ignore, not 'maybe'"):
        LabelOptions(uncertain="maybe")
    with pytest.raises(MavlError, match=r"--uncertain must be"):
        parse_label_options("maybe")
    for bad in (-0.1, 1.5):
        with pytest.raises(MavlError, match=r"--threshold must lie in \[0, 1\]"):
            EvalOptions(threshold=bad)
        with pytest.raises(MavlError, match=r"--threshold must lie in \[0, 1\]"):
            PredictOptions(threshold=bad)
    for bad in (-1e-5, math.nan, math.inf):
        with pytest.raises(MavlError, match="--backbone-lr"):
            FinetuneOptions(backbone_lr=bad)
    with pytest.raises(MavlError, match="--batch-size must be at least 1"):
        RunOptions(batch_size=0)
    with pytest.raises(MavlError, match="--val-split"):
        Validation(split=1.0)
    assert EvalOptions(threshold=0.0).threshold == 0.0 and PredictOptions(threshold=1.0).threshold == 1.0


def test_label_options_parse_the_command_line_text(tmp_path):

    o = parse_label_options("ignore", "Effusion=Pleural Effusion", " Cardiomegaly, Edema ,")
    assert o.uncertain == "ignore" and o.renames == {"Effusion": "Pleural Effusion"} and o.names == ["Cardiomegaly", "Edema"]
    assert parse_label_options().renames is None and parse_label_options().names is None


def test_the_cli_refuses_a_bad_uncertain_policy_before_any_work(cli, tmp_path):
    out = tmp_path / "lrf.st"
    r = cli(f"train-lrf {tmp_path / 'missing.st'} --labels {tmp_path / 'l.csv'} --uncertain maybe -o {out}")
    assert r.exit_code == 2 and "--uncertain must be ones, zeros or ignore, not 'maybe'" in r.stderr
    assert not out.exists()


def _string_constants(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_the_defaults_are_written_in_one_place():
    """The default image encoder, text encoder and threshold appear as values only in mavl_cli/core/defaults.py."""
    from mavl_cli.core import defaults

    home = Path(defaults.__file__).resolve()
    elsewhere = [p for p in PACKAGE.rglob("*.py") if p.resolve() != home]
    for value in (defaults.DEFAULT_IMAGE_ENCODER, defaults.DEFAULT_TEXT_ENCODER):
        assert value in _string_constants(home)
        found = [str(p.relative_to(PACKAGE)) for p in elsewhere if value in _string_constants(p)]
        assert not found, f"{value!r} hard-coded in {found}"
    # the threshold: no stage, scorer or threshold module writes 0.5 as a default threshold of its own
    scorers = [*sorted((PACKAGE / "stages").glob("*.py")),
               *(PACKAGE / name for name in ("models/modelfile.py", "models/zeroshot.py", "evaluation/thresholds.py"))]
    assert len(scorers) > 10
    for path in scorers:
        tree = ast.parse(path.read_text())
        halves = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == 0.5]
        assert not halves, f"{path.relative_to(PACKAGE)}: 0.5 at line(s) {halves}"


def test_the_command_line_defaults_read_the_defaults_module():
    from typer.main import get_command

    from mavl_cli.cli.app import app
    from mavl_cli.core import defaults

    cmd = get_command(app)
    ctx = cmd.make_context("mavl", ["embed-images", "--help"], resilient_parsing=True)
    params = {p.name: p for name in ("embed-images", "finetune-lrf", "embed-text") for p in cmd.get_command(ctx, name).params}
    assert params["backbone"].default == defaults.DEFAULT_IMAGE_ENCODER
    assert params["text_model"].default == defaults.DEFAULT_TEXT_ENCODER
