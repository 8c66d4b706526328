"""Shared fixtures: tiny models saved to disk and loaded through mavl's real local-path code,
phantom data generated on the fly, and a CLI runner that keeps stdout and stderr apart."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_VIT_ARGS = {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer ViT in the hub's folder layout (config.json + model.safetensors)."""
    import timm
    import torch

    from mavl_cli.encoders.timm import save_local_backbone

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT_ARGS)
    return save_local_backbone(model, "vit_tiny_patch16_224", tmp_path_factory.mktemp("tiny_vit"), TINY_VIT_ARGS)


def build_tiny_bert(folder: Path, with_tokenizer: bool = True) -> Path:
    """A 2-layer BERT plus a WordPiece vocabulary trained on a few radiology sentences."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    corpus = [
        "fluid in the pleural space blunting the costophrenic angle",
        "the heart is enlarged with a cardiothoracic ratio above one half",
        "air in the pleural space with a visible pleural line and no lung markings",
        "dense airspace opacity with air bronchograms in the lower lobe",
        "bilateral perihilar haze with septal lines and vascular congestion",
        "linear opacity with volume loss and elevation of the hemidiaphragm",
        "Cardiomegaly Pleural Effusion Pneumothorax Consolidation Edema Atelectasis Pneumonia",
    ]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(corpus * 5, trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    if with_tokenizer:
        fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory: pytest.TempPathFactory):
    from mavl_cli.synthetic.phantoms import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("phantoms"), n=60, seed=1, size=64)


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str
    stdout_bytes: bytes


def run_cli(args: str | list[str], input: bytes | None = None, env: dict[str, str] | None = None) -> Result:
    """Invoke the real Typer app in-process, with separate stdout/stderr."""
    from typer.testing import CliRunner

    from mavl_cli.cli.app import app

    argv = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    runner = CliRunner()
    r = runner.invoke(app, argv, input=input, env={"COLUMNS": "200", **(env or {})}, catch_exceptions=False)
    return Result(r.exit_code, r.stdout, r.stderr, r.stdout_bytes)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def chain(tmp_path_factory: pytest.TempPathFactory, tiny_vit: Path, tiny_bert: Path, phantom_set):
    """The whole chain run once through the CLI on phantoms; tests inspect its files."""
    from mavl_cli.synthetic.phantoms import FINDINGS

    d = tmp_path_factory.mktemp("chain")
    root = phantom_set.root
    (d / "labels.txt").write_text("\n".join(FINDINGS) + "\n")
    steps = {
        "train_img": f"embed-images {root} --labels {phantom_set.splits['train']} --backbone vit_tiny_patch16_224 --weights {tiny_vit} -o {d/'train.st'}",
        "val_img": f"embed-images {root} --labels {phantom_set.splits['val']} --backbone vit_tiny_patch16_224 --weights {tiny_vit} -o {d/'val.st'}",
        "test_img": f"embed-images {root} --labels {phantom_set.splits['test']} --backbone vit_tiny_patch16_224 --weights {tiny_vit} -o {d/'test.st'}",
        "lrf": f"train-lrf {d/'train.st'} --labels {phantom_set.splits['train']} --only '{','.join(FINDINGS)}' --rank 16 --keep 4 --epochs 5 --val {d/'val.st'} --val-labels {phantom_set.splits['val']} -o {d/'lrf.st'}",
        "text": f"embed-text {d/'labels.txt'} --text-model {tiny_bert} -o {d/'text.st'}",
        "fuse": f"fuse {d/'train.st'} {d/'text.st'} --lrf {d/'lrf.st'} --labels {phantom_set.splits['train']} --epochs 5 --val {d/'val.st'} --val-labels {phantom_set.splits['val']} -o {d/'model.st'}",
        "tune": f"tune-threshold {d/'model.st'} {d/'val.st'} --labels {phantom_set.splits['val']} -o {d/'tuned.st'}",
    }
    results = {}
    for name, cmd in steps.items():
        r = run_cli(cmd)
        assert r.exit_code == 0, f"{name} failed: {r.stderr}"
        results[name] = r
    return {"dir": d, "results": results, "phantoms": phantom_set}
