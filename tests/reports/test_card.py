"""`mavl card`: a Hugging Face model card that huggingface_hub reads, written from the file's records."""

from __future__ import annotations

import json

import pytest


def test_card_from_model_and_eval(chain, cli, tmp_path):
    from huggingface_hub import ModelCard

    d, ph = chain["dir"], chain["phantoms"]
    rep = tmp_path / "report.json"
    r = cli(f"evaluate {d/'tuned.st'} {d/'test.st'} --labels {ph.splits['test']} --bootstrap 50 --json")
    assert r.exit_code == 0, r.stderr
    rep.write_text(r.stdout)
    doc = json.loads(r.stdout)
    out = tmp_path / "README.md"
    r = cli(f"card {d/'tuned.st'} --eval {rep} -o {out}")
    assert r.exit_code == 0, r.stderr
    card = ModelCard.load(out)
    assert "chest-x-ray" in card.data.tags and card.data.library_name == "mavl"
    results = {e.metric_name: e.metric_value for e in card.data.eval_results}
    auroc = next(v for k, v in results.items() if k.startswith("macro AUROC"))
    assert auroc == pytest.approx(doc["overall"]["macro_auroc"], rel=1e-5)
    text = out.read_text()
    for piece in ("## Thresholds", "Method `sweep`", "## Limitations", "synthetic phantoms", "## Evaluation",
                  "vit_tiny_patch16_224"):
        assert piece in text, piece
    # evaluated on the tuning data: the card says the figures are optimistic
    r = cli(f"evaluate {d/'tuned.st'} {d/'val.st'} --labels {ph.splits['val']} --json")
    (tmp_path / "val.json").write_text(r.stdout)
    assert cli(f"card {d/'tuned.st'} --eval {tmp_path/'val.json'} -o {tmp_path/'c2.md'}").exit_code == 0
    assert "same images the thresholds were tuned on" in (tmp_path / "c2.md").read_text()
    # without an evaluation it still works; a bad --eval is a clear error and nothing is written
    assert cli(f"card {d/'model.st'} -o {tmp_path/'c3.md'}").exit_code == 0
    assert "untuned default 0.5" in (tmp_path / "c3.md").read_text()
    (tmp_path / "bad.json").write_text("{}")
    r = cli(f"card {d/'model.st'} --eval {tmp_path/'bad.json'} -o {tmp_path/'c4.md'}")
    assert r.exit_code == 2 and "not an evaluate report" in r.stderr and not (tmp_path / "c4.md").exists()
