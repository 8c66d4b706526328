"""embed-text: description formats, the [L, A, D] layout with its mask, truncation reporting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mavl_cli.core.errors import MavlError
from mavl_cli.io.descriptions import parse_descriptions
from mavl_cli.io.mavlfile import read_file


def test_three_description_forms_parse_to_one_grid():
    names = parse_descriptions("Cardiomegaly\n# a comment\nEdema\n", "l.txt")
    assert names.labels == ["Cardiomegaly", "Edema"] and names.aspects == ["name"] and names.texts[1] == ["Edema"]
    sents = parse_descriptions(json.dumps({"A": ["one", "two"], "B": "only"}), "d.json")
    assert sents.aspects == ["s1", "s2"] and sents.texts[1] == ["only", None]
    asp = parse_descriptions(json.dumps({"A": {"location": "x", "definition": "y"}, "B": {"shape": "z"}}), "a.json")
    assert asp.aspects == ["definition", "location", "shape"]  # vocabulary order, not file order
    assert asp.texts == [["y", "x", None], [None, None, "z"]]


@pytest.mark.parametrize("text", ["", "{}", '{"A": 3}', '{"A": ""}', "A\nA\n", "{not json"])
def test_bad_description_files_are_user_errors(text):
    with pytest.raises(MavlError):
        parse_descriptions(text, "bad.json" if text.startswith("{") else "bad.txt")


def test_aspect_file_gives_masked_grid_and_reports_truncation(tiny_bert, tmp_path, cli):
    long = " ".join(["fluid in the pleural space blunting the costophrenic angle"] * 12)  # > 64 tokens
    desc = {"Pleural Effusion": {"definition": "fluid in the pleural space", "location": long},
            "Cardiomegaly": {"definition": "the heart is enlarged"}}
    (tmp_path / "d.json").write_text(json.dumps(desc))
    r = cli(f"embed-text {tmp_path/'d.json'} --text-model {tiny_bert} -o {tmp_path/'t.st'}")
    assert r.exit_code == 0, r.stderr
    assert "truncated: Pleural Effusion / location" in r.stderr
    f = read_file(tmp_path / "t.st", expect="text-embeddings")
    assert f.meta["aspects"] == ["definition", "location"]
    np.testing.assert_array_equal(f.tensors["mask"], [[1, 1], [1, 0]])
    assert not f.tensors["embeddings"][1, 1].any()  # masked slot stays empty
    (t,) = f.meta["truncated"]
    assert t["label"] == "Pleural Effusion" and t["kept"] == 64 and t["lost"] == t["tokens"] - 64 > 0


def test_cls_and_mean_pooling_differ_and_are_recorded(tiny_bert, tmp_path, cli):
    (tmp_path / "l.txt").write_text("Edema\nCardiomegaly\n")
    outs = {}
    for pooling in ("mean", "cls"):
        r = cli(f"embed-text {tmp_path/'l.txt'} --text-model {tiny_bert} --pooling {pooling} -o {tmp_path/pooling}.st")
        assert r.exit_code == 0, r.stderr
        outs[pooling] = read_file(tmp_path / f"{pooling}.st")
        assert outs[pooling].meta["pooling"] == pooling
    assert not np.allclose(outs["mean"].tensors["embeddings"], outs["cls"].tensors["embeddings"])
    r = cli(f"embed-text {tmp_path/'l.txt'} --text-model {tiny_bert} --pooling max -o {tmp_path/'x.st'}")
    assert r.exit_code == 2 and "unknown pooling" in r.stderr


def test_offline_hub_id_fails_with_one_clear_line(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "l.txt").write_text("Edema\n")
    r = cli(f"embed-text {tmp_path/'l.txt'} --text-model some-org/not-cached-model -o {tmp_path/'t.st'}")
    assert r.exit_code == 2
    assert "--text-model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t.st").exists()
