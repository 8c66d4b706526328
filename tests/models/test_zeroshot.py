"""`mavl zero-shot`: the math against open_clip itself, and the whole command path, on a tiny CLIP."""

from __future__ import annotations

import json

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")

LABELS = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIP saved in open_clip's hub layout (open_clip_config.json + safetensors)."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tiny_clip")
    cfg = {"model_cfg": {"embed_dim": 24,
                         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.3, 0.3, 0.3]}}
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{d}", load_weights=False)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(20.0))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d


def _reference(clip_dir, image_path, labels, pos_templates, neg_templates):
    """CheXzero-style scores with open_clip alone: softmax over (positive, negative) prompt logits."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tok = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(preprocess(Image.open(image_path))[None]), dim=-1)[0]

        def ensemble(texts):
            e = F.normalize(model.encode_text(tok(texts)), dim=-1).mean(0)
            return F.normalize(e, dim=0)

        out = []
        for lab in labels:
            pos = ensemble([t.format(label=lab.lower()) for t in pos_templates])
            neg = ensemble([t.format(label=lab.lower()) for t in neg_templates])
            pair = model.logit_scale.exp() * torch.stack([img @ pos, img @ neg])
            out.append(torch.softmax(pair, 0)[0].item())
    return np.array(out), img.numpy()


def test_zero_shot_head_matches_open_clip_softmax_over_pair(tiny_clip, phantom_set):
    """The head's math on open_clip's own image features equals the direct softmax over the pair."""
    import torch

    from mavl_cli.encoders.spec import EncoderSpec
    from mavl_cli.io.descriptions import parse_descriptions
    from mavl_cli.models.heads import ZeroShotHead
    from mavl_cli.models.zeroshot import (
        NEGATIVE_TEMPLATES,
        POSITIVE_TEMPLATES,
        aligned_towers,
        encode_prompts,
        prompt_tensors,
        write_prompts,
    )

    img_path = phantom_set.root / "images" / sorted((phantom_set.root / "images").iterdir())[0].name
    want, feat = _reference(tiny_clip, img_path, LABELS, POSITIVE_TEMPLATES, NEGATIVE_TEMPLATES)
    _, text = aligned_towers(EncoderSpec.parse(f"open_clip:{tiny_clip}"))
    prompts = write_prompts(parse_descriptions("\n".join(LABELS), "labels.txt"), "pair")
    assert prompts.negative[1][0] == "no pleural effusion"
    pos, mask, neg = prompt_tensors(prompts, encode_prompts(text, prompts.texts()))
    head = ZeroShotHead(torch.from_numpy(pos), torch.from_numpy(mask), torch.from_numpy(neg), 20.0)
    with torch.no_grad():
        got = torch.sigmoid(head(torch.from_numpy(feat)[None] * 3.0))[0].numpy()  # the head normalises
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert not np.allclose(want, want[0])  # labels differ: the test can tell them apart


def test_aspects_mode_averages_cosines_of_each_aspect(tiny_clip):
    import torch

    from mavl_cli.encoders.spec import EncoderSpec
    from mavl_cli.io.descriptions import parse_descriptions
    from mavl_cli.models.heads import ZeroShotHead
    from mavl_cli.models.zeroshot import (
        aligned_towers,
        encode_prompts,
        prompt_tensors,
        write_prompts,
    )

    desc = parse_descriptions(json.dumps({"Edema": {"opacity": "hazy perihilar density", "location": "both lungs"},
                                          "Pneumothorax": {"border": "a thin pleural line"}}), "d.json")
    prompts = write_prompts(desc, "aspects")
    _, text = aligned_towers(EncoderSpec.parse(f"open_clip:{tiny_clip}"))
    emb = encode_prompts(text, prompts.texts())
    pos, mask, neg = prompt_tensors(prompts, emb)
    assert prompts.aspects == ["opacity", "location", "border"] and mask.tolist() == [[1, 1, 0], [0, 0, 1]]
    v = np.random.default_rng(0).standard_normal((2, pos.shape[2])).astype(np.float32)
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    edema = (vn @ emb["hazy perihilar density"] + vn @ emb["both lungs"]) / 2
    want = 7.0 * (edema - vn @ neg[0])
    head = ZeroShotHead(torch.from_numpy(pos), torch.from_numpy(mask), torch.from_numpy(neg), 7.0)
    np.testing.assert_allclose(head(torch.from_numpy(v))[:, 0].detach().numpy(), want, rtol=0, atol=1e-5)


def test_zero_shot_command_path(tiny_clip, phantom_set, cli, tmp_path):
    """zero-shot -> predict on images; embed-images -> tune-threshold -> evaluate on the file, unchanged."""
    from mavl_cli.io.mavlfile import read_file
    from mavl_cli.models.zeroshot import NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES
    from mavl_cli.synthetic.phantoms import FINDINGS

    desc = tmp_path / "labels.txt"
    desc.write_text("\n".join(FINDINGS) + "\n")
    zs = tmp_path / "zs.safetensors"
    r = cli(["zero-shot", "--encoder", f"open_clip:{tiny_clip}", "--descriptions", str(desc), "-o", str(zs)])
    assert r.exit_code == 0, r.stderr
    f = read_file(zs, expect="model")
    assert f.meta["scorer"] == "zeroshot" and f.labels() == list(FINDINGS)
    img = sorted((phantom_set.root / "images").iterdir())[0]
    r = cli(["predict", str(img), "--model", str(zs), "--json"])
    assert r.exit_code == 0, r.stderr
    got = np.array([x["probability"] for x in json.loads(r.stdout)["images"][0]["findings"]])
    want, _ = _reference(tiny_clip, img, FINDINGS, POSITIVE_TEMPLATES, NEGATIVE_TEMPLATES)
    # the open_clip family runs open_clip's own eval transform; predict --json rounds to 6 decimals (measured 3e-7)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)

    # a label described only in text gets prompts like the others (predict --descriptions)
    extra = tmp_path / "extra.txt"
    extra.write_text("Pneumonia\n")
    r = cli(["predict", str(img), "--model", str(zs), "--json", "--descriptions", str(extra), "--explain"])
    assert r.exit_code == 0, r.stderr
    found = json.loads(r.stdout)["images"][0]["findings"]
    assert [x["label"] for x in found] == [*FINDINGS, "Pneumonia"] and found[-1]["zero_shot"]
    want_p, _ = _reference(tiny_clip, img, ["Pneumonia"], POSITIVE_TEMPLATES, NEGATIVE_TEMPLATES)
    assert found[-1]["probability"] == pytest.approx(float(want_p[0]), abs=2e-6)

    root, splits = phantom_set.root, phantom_set.splits
    for split in ("val", "test"):
        r = cli(["embed-images", str(root), "--labels", str(splits[split]), "--backbone", f"open_clip:{tiny_clip}",
                 "-o", str(tmp_path / f"{split}.st")])
        assert r.exit_code == 0, r.stderr
    r = cli(["tune-threshold", str(zs), str(tmp_path / "val.st"), "--labels", str(splits["val"]), "-o", str(tmp_path / "t.st")])
    assert r.exit_code == 0, r.stderr
    r = cli(["evaluate", str(tmp_path / "t.st"), str(tmp_path / "test.st"), "--labels", str(splits["test"]), "--json"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert len(rep["labels"]) == len(FINDINGS)
    # the file path scores like the image path
    r = cli(["predict", str(img), "--model", str(tmp_path / "t.st"), "--json"])
    assert r.exit_code == 0


def test_zero_shot_refuses_encoders_without_text(cli, tmp_path, tiny_vit):
    desc = tmp_path / "labels.txt"
    desc.write_text("Edema\n")
    r = cli(["zero-shot", "--encoder", "vit_tiny_patch16_224", "--descriptions", str(desc), "-o", str(tmp_path / "z.st")])
    assert r.exit_code == 2 and "open_clip" in r.stderr
    assert not (tmp_path / "z.st").exists()


@pytest.mark.parametrize("given", [{"positive": ["fluid in the lungs"]}, {"positive": ["fluid"], "negative": []},
                                   {"negative": ["clear lungs"]}])
def test_s3_explicit_prompts_on_one_side_only_are_refused(tiny_clip, cli, tmp_path, given):
    """`{"Edema": {"positive": [...]}}` without negatives was silently replaced by mavl's templates: the prompts
    the user wrote were not used and nothing said so. One clear line, nothing written."""
    desc = tmp_path / "d.json"
    desc.write_text(json.dumps({"Edema": given}))
    r = cli(["zero-shot", "--encoder", f"open_clip:{tiny_clip}", "--descriptions", str(desc), "-o", str(tmp_path / "z.st")])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "'positive'" in lines[0] and "'negative'" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]
