"""The catalogue of bad inputs: one Case per attack, each a command line that must fail as a user error."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.bad_inputs.forge import CONTROL, VIT, digest
from tests.conftest import run_cli


@dataclass
class Case:
    id: str
    argv: Callable[[dict[str, Path], Path], list]  # (files, output path) -> arguments
    expect: str  # substring of the error line (case-insensitive)
    names: str | None = None  # key of the file the message must name (its basename)
    output: str = "new"  # "new": out must not appear; "existing": bad["existing"] must stay byte-identical
    env: dict[str, Callable[[dict[str, Path], Path], object]] | None = None  # extra environment (values from files)
    max_len: int | None = None  # the error line must be at most this long


E = ["--backbone", VIT]
R = ["--rank", "8", "--keep", "4", "--epochs", "1"]  # so train-lrf gets as far as the fault under test


CASES = [
    # ---- embed-images
    Case("embed-missing-file", lambda f, o: ["embed-images", f["root"] / "nope.png", *E, "--weights", f["vit"], "-o", o], "no such file", None),
    Case("embed-empty-dir", lambda f, o: ["embed-images", f["empty_dir"], *E, "--weights", f["vit"], "-o", o], "no image", "empty_dir"),
    Case("embed-zero-byte-png", lambda f, o: ["embed-images", f["zero.png"], *E, "--weights", f["vit"], "-o", o], "empty", "zero.png"),
    Case("embed-truncated-png", lambda f, o: ["embed-images", f["truncated.png"], *E, "--weights", f["vit"], "-o", o], "", "truncated.png"),
    Case("embed-text-as-jpg", lambda f, o: ["embed-images", f["text.jpg"], *E, "--weights", f["vit"], "-o", o], "cannot decode", "text.jpg"),
    Case("embed-decompression-bomb", lambda f, o: ["embed-images", f["bomb.png"], *E, "--weights", f["vit"], "-o", o], "decompression bomb", "bomb.png"),
    Case("embed-dicom-no-pixels", lambda f, o: ["embed-images", f["nopixels.dcm"], *E, "--weights", f["vit"], "-o", o], "no pixel data", "nopixels.dcm"),
    Case("embed-csv-no-path-column", lambda f, o: ["embed-images", f["root"], "--labels", f["csv_nopath"], *E, "--weights", f["vit"], "-o", o], "path", "csv_nopath"),
    Case("embed-csv-paths-not-found", lambda f, o: ["embed-images", f["root"], "--labels", f["csv_otherpaths"], *E, "--weights", f["vit"], "-o", o], "not found", "csv_otherpaths"),
    Case("embed-unknown-timm-model", lambda f, o: ["embed-images", f["root"], "--backbone", "no_such_model_xyz", "--random-init", "-o", o], "unknown timm model", None),
    Case("embed-lrf-is-text-file", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["vit"], "--lrf", f["text"], "-o", o], "text embeddings", "text"),
    Case("embed-lrf-dim-mismatch", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["vit32"], "--lrf", f["lrf"], "-o", o], "48-d", "lrf"),
    Case("embed-pickle-weights", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["evil_pth"], "-o", o], "refusing to load", "evil_pth"),
    Case("embed-output-under-regular-file", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["vit"], "-o", f["regular"] / "out.st"], "is a file", "regular"),
    Case("embed-output-folder-missing", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["vit"], "-o", o.parent / "no" / "such" / "out.st"], "does not exist", None),
    # ---- train-lrf
    Case("lrf-text-as-image-embeddings", lambda f, o: ["train-lrf", f["text"], "--labels", f["train_csv"], *R, "-o", o], "text embeddings", "text"),
    Case("lrf-model-as-image-embeddings", lambda f, o: ["train-lrf", f["model"], "--labels", f["train_csv"], *R, "-o", o], "fused model", "model"),
    Case("lrf-plain-text-file", lambda f, o: ["train-lrf", f["notes_txt"], "--labels", f["train_csv"], *R, "-o", o], "not a safetensors", "notes_txt"),
    Case("lrf-foreign-safetensors", lambda f, o: ["train-lrf", f["foreign"], "--labels", f["train_csv"], *R, "-o", o], "not one written by mavl", "foreign"),
    Case("lrf-corrupt-header", lambda f, o: ["train-lrf", f["corrupt_header"], "--labels", f["train_csv"], *R, "-o", o], "corrupt", "corrupt_header"),
    Case("lrf-truncated-safetensors", lambda f, o: ["train-lrf", f["truncated_st"], "--labels", f["train_csv"], *R, "-o", o], "truncated", "truncated_st"),
    Case("lrf-newer-format", lambda f, o: ["train-lrf", f["newer"], "--labels", f["train_csv"], *R, "-o", o], "newer mavl", "newer"),
    Case("lrf-nan-in-features", lambda f, o: ["train-lrf", f["nan"], "--labels", f["train_csv"], *R, "-o", o], "nan or inf", "nan"),
    Case("lrf-missing-labels-csv", lambda f, o: ["train-lrf", f["train"], "--labels", o.parent / "absent.csv", *R, "-o", o], "does not exist", None),
    Case("lrf-unknown-label", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--only", "Cardiomegaly,Nodule", *R, "-o", o], "nodule", "train_csv"),
    Case("lrf-empty-label-list", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--only", " , ", *R, "-o", o], "label list is empty", "train_csv"),
    Case("lrf-bad-label-value", lambda f, o: ["train-lrf", f["train"], "--labels", f["csv_badvalue"], *R, "-o", o], "yes", "csv_badvalue"),
    Case("lrf-paths-not-in-embeddings", lambda f, o: ["train-lrf", f["train"], "--labels", f["csv_otherpaths"], *R, "-o", o], "", "csv_otherpaths"),
    Case("lrf-rank-too-large", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--rank", "4096", "-o", o], "--rank", "train"),
    Case("lrf-val-dim-mismatch", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--val", f["val32"], "--val-labels", f["val_csv"], *R, "-o", o], "32-d", "val32"),
    Case("lrf-output-is-input", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], *R, "-o", f["train"]], "overwrite the input", "train"),
    # ---- embed-text
    Case("text-missing-file", lambda f, o: ["embed-text", o.parent / "absent.txt", "--text-model", f["vit"], "-o", o], "not found", None),
    Case("text-empty-label-list", lambda f, o: ["embed-text", f["empty_txt"], "--text-model", f["vit"], "-o", o], "no label names", "empty_txt"),
    Case("text-binary-descriptions", lambda f, o: ["embed-text", f["zero.png"].parent / "bomb.png", "--text-model", f["vit"], "-o", o], "utf-8", "bomb.png"),
    Case("text-model-without-tokenizer", lambda f, o: ["embed-text", f["labels_txt"], "--text-model", f["bert_notok"], "-o", o], "tokenizer", "bert_notok"),
    Case("text-model-is-image-backbone", lambda f, o: ["embed-text", f["labels_txt"], "--text-model", f["vit"], "-o", o], "", "vit"),
    Case("text-model-folder-missing", lambda f, o: ["embed-text", f["labels_txt"], "--text-model", o.parent / "no_model", "-o", o], "not found", None),
    # ---- fuse
    Case("fuse-csv-lacks-text-label", lambda f, o: ["fuse", f["train"], f["text"], "--labels", f["csv_nopneumo"], "--epochs", "1", "-o", o], "pneumothorax", "csv_nopneumo"),
    Case("fuse-swapped-arguments", lambda f, o: ["fuse", f["text"], f["train"], "--labels", f["train_csv"], "--epochs", "1", "-o", o], "text embeddings", "text"),
    Case("fuse-image-as-text", lambda f, o: ["fuse", f["train"], f["val"], "--labels", f["train_csv"], "--epochs", "1", "-o", o], "image embeddings", "val"),
    Case("fuse-lrf-is-model", lambda f, o: ["fuse", f["train"], f["text"], "--lrf", f["model"], "--labels", f["train_csv"], "--epochs", "1", "-o", o], "fused model", "model"),
    Case("fuse-dim-mismatch-with-lrf", lambda f, o: ["fuse", f["val32"], f["text"], "--lrf", f["lrf"], "--labels", f["val_csv"], "--epochs", "1", "-o", o], "32-d", "val32"),
    Case("fuse-val-dim-mismatch", lambda f, o: ["fuse", f["train"], f["text"], "--labels", f["train_csv"], "--val", f["val32"], "--val-labels", f["val_csv"], "--epochs", "1", "-o", o], "32-d", "val32"),
    Case("fuse-unknown-aggregate", lambda f, o: ["fuse", f["train"], f["text"], "--labels", f["train_csv"], "--aggregate", "median", "-o", o], "aggregate", None),
    Case("fuse-overwrite-fails-cleanly", lambda f, o: ["fuse", f["train"], f["notes_txt"], "--labels", f["train_csv"], "--epochs", "1", "-o", f["existing"]], "not a safetensors", "notes_txt", "existing"),
    # ---- tune-threshold
    Case("tune-embeddings-as-model", lambda f, o: ["tune-threshold", f["val"], f["val"], "--labels", f["val_csv"], "-o", o], "fused model", "val"),
    Case("tune-dim-mismatch", lambda f, o: ["tune-threshold", f["model"], f["val32"], "--labels", f["val_csv"], "-o", o], "32-d", "val32"),
    Case("tune-min-sensitivity-out-of-range", lambda f, o: ["tune-threshold", f["model"], f["val"], "--labels", f["val_csv"], "--min-sensitivity", "1.5", "-o", o], "min-sensitivity", None),
    Case("tune-labels-not-in-embeddings", lambda f, o: ["tune-threshold", f["model"], f["val"], "--labels", f["csv_otherpaths"], "-o", f["existing"]], "", "csv_otherpaths", "existing"),
    Case("tune-inf-in-model", lambda f, o: ["tune-threshold", f["inf_model"], f["val"], "--labels", f["val_csv"], "-o", o], "nan or inf", "inf_model"),
    # ---- evaluate
    Case("evaluate-threshold-above-one", lambda f, o: ["evaluate", f["tuned"], f["test"], "--labels", f["test_csv"], "--threshold", "1.5", "--csv", o], "[0, 1]", None),
    Case("evaluate-scores-is-model", lambda f, o: ["evaluate", "--scores", f["tuned"], "--labels", f["test_csv"], "--csv", o], "prediction scores", "tuned"),
    Case("evaluate-lacks-model-label", lambda f, o: ["evaluate", f["tuned"], f["train"], "--labels", f["csv_nopneumo"], "--csv", o], "pneumothorax", "csv_nopneumo"),
    Case("evaluate-nan-embeddings", lambda f, o: ["evaluate", f["tuned"], f["nan"], "--labels", f["train_csv"], "--csv", o], "nan or inf", "nan"),
    Case("evaluate-csv-folder-missing", lambda f, o: ["evaluate", f["tuned"], f["test"], "--labels", f["test_csv"], "--csv", o.parent / "missing" / "r.csv"], "does not exist", None),
    Case("evaluate-plot-under-regular-file", lambda f, o: ["evaluate", f["tuned"], f["test"], "--labels", f["test_csv"], "--plot", f["regular"] / "p.png"], "is a file", "regular"),
    # ---- predict
    Case("predict-model-is-text", lambda f, o: ["predict", f["root"] / "images", "--model", f["text"], "--out", o], "text embeddings", "text"),
    Case("predict-model-missing", lambda f, o: ["predict", f["root"] / "images", "--model", o.parent / "absent.st", "--out", o], "not found", None),
    Case("predict-zero-byte-image", lambda f, o: ["predict", f["zero.png"], "--model", f["tuned"], "--weights", f["vit"], "--out", o], "empty", "zero.png"),
    Case("predict-threshold-negative", lambda f, o: ["predict", f["root"] / "images", "--model", f["tuned"], "--threshold", "-0.1", "--out", o], "[0, 1]", None),
    Case("predict-wrong-backbone-weights", lambda f, o: ["predict", f["root"] / "images", "--model", f["tuned"], "--weights", f["vit32"], "--out", o], "", "vit32"),
    Case("predict-out-under-regular-file", lambda f, o: ["predict", f["root"] / "images", "--model", f["tuned"], "--weights", f["vit"], "--out", f["regular"] / "s.st"], "is a file", "regular"),
    # ---- info
    Case("info-missing-file", lambda f, o: ["info", o.parent / "absent.st"], "not found", None),
    Case("info-directory", lambda f, o: ["info", f["empty_dir"]], "directory", "empty_dir"),
    Case("info-plain-text", lambda f, o: ["info", f["notes_txt"]], "not a safetensors", "notes_txt"),
    Case("info-corrupt-header", lambda f, o: ["info", f["corrupt_header"]], "corrupt", "corrupt_header"),
    Case("info-newer-format", lambda f, o: ["info", f["newer"]], "upgrade", "newer"),
    # ---- phantoms
    # ---- usage errors found by the option parser (cli.py must catch typer's own click exceptions)
    Case("usage-missing-option", lambda f, o: ["fuse", f["train"], f["text"], "-o", o], "--labels"),
    Case("usage-out-of-range", lambda f, o: ["fuse", f["train"], f["text"], "--labels", f["train_csv"], "--epochs", "0", "-o", o], "--epochs"),
    Case("usage-missing-argument", lambda f, o: ["info"], "file"),
    Case("usage-unknown-command", lambda f, o: ["embed-image", f["root"], "-o", o], "no such command"),
    Case("usage-not-a-number", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--rank", "big", "-o", o], "--rank"),
    Case("phantoms-under-regular-file", lambda f, o: ["phantoms", f["regular"] / "ph", "-n", "3", "--size", "64"], "", "regular"),
]

# ------------------------------------------------------------------ issue 15: the outside attack campaign, case by case
# (ids start with the case number; cases that need a pipe, a kill or a success check are test functions below)

OVERWRITE = "overwrite the input"
EV = lambda f: ["evaluate", f["tuned"], f["test"], "--labels", f["test_csv"]]  # noqa: E731
FU = lambda f, o, *x: ["fuse", f["train"], *x, "--labels", f["train_csv"], "--epochs", "1", "-o", o]  # noqa: E731
EI = lambda f, o, *x: ["embed-images", *x, *E, "--weights", f["vit"], "-o", o]  # noqa: E731

CASES += [
    # 1-4: outputs that would overwrite inputs or special files (one guard: device + inode)
    Case("i15-01-evaluate-csv-onto-its-labels", lambda f, o: [*EV(f), "--csv", f["test_csv"]], OVERWRITE, "test_csv"),
    Case("i15-01-evaluate-csv-onto-the-model", lambda f, o: [*EV(f), "--csv", f["tuned"]], OVERWRITE, "tuned"),
    Case("i15-01-evaluate-plot-onto-the-embeddings", lambda f, o: [*EV(f), "--plot", f["test"]], OVERWRITE, "test"),
    Case("i15-02-predict-out-onto-its-image", lambda f, o: ["predict", f["img0"], "--model", f["tuned"], "--weights", f["vit"], "--out", f["img0"]], OVERWRITE, "img0"),
    Case("i15-03-train-lrf-embed-out-onto-val", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--val", f["val"], "--val-labels", f["val_csv"], *R, "-o", o, "--embed-out", f["val"]], OVERWRITE, "val"),
    Case("i15-03-embed-images-output-onto-an-input-image", lambda f, o: EI(f, f["img0"], f["root"] / "images"), OVERWRITE, "img0"),
    Case("i15-04-output-is-a-fifo", lambda f, o: ["embed-text", f["labels_txt"], "--text-model", f["vit"], "-o", f["fifo_out"]], "not a regular file", "fifo_out"),
    # 8, 10-13: memory and time bombs
    Case("i15-08-png-1x70000-pixels", lambda f, o: EI(f, o, f["wide.png"]), "sides differ", "wide.png"),
    Case("i15-10-fuse-dim-30000", lambda f, o: [*FU(f, o, f["text"]), "--dim", "30000"], "--dim"),
    Case("i15-10-model-forged-fusion-dim", lambda f, o: [*EV(f)[:1], f["fusion_dim"], *EV(f)[2:]], "fusion.dim", "fusion_dim"),
    Case("i15-10-model-forged-n-aspects", lambda f, o: [*EV(f)[:1], f["fusion_aspects"], *EV(f)[2:]], "fusion.n_aspects", "fusion_aspects"),
    Case("i15-11-phantoms-size-100000", lambda f, o: ["phantoms", o.parent / "ph", "-n", "3", "--size", "100000"], "--size"),
    Case("i15-12-bootstrap-1e9", lambda f, o: [*EV(f), "--bootstrap", "1000000000"], "--bootstrap"),
    Case("i15-13-threads-1000", lambda f, o: [*EI(f, o, f["root"]), "--threads", "1000"], "--threads"),
    # 14: never open a FIFO (it blocks without a writer)
    Case("i15-14-fifo-probed-for-dicom-magic", lambda f, o: EI(f, o, f["fifo_probe"]), "not a supported image", "fifo_probe"),
    Case("i15-14-fifo-named-png", lambda f, o: EI(f, o, f["fifo.png"]), "not a regular file", "fifo.png"),
    # 15: 200k levels of JSON nesting
    Case("i15-15-nested-safetensors-header", lambda f, o: ["info", f["deep_header"]], "nested too deeply", "deep_header"),
    Case("i15-15-nested-metadata", lambda f, o: ["train-lrf", f["deep_meta"], "--labels", f["train_csv"], *R, "-o", o], "nested too deeply", "deep_meta"),
    Case("i15-15-nested-descriptions", lambda f, o: ["embed-text", f["deep_desc"], "--text-model", f["vit"], "-o", o], "nested too deeply", "deep_desc"),
    # 16: one schema for metadata and tensors, checked on read
    Case("i15-16-model-without-fusion-metadata", lambda f, o: ["predict", f["img0"], "--model", f["no_fusion"], "--out", o], "fusion", "no_fusion"),
    Case("i15-16-model-fusion-metadata-not-an-object", lambda f, o: ["tune-threshold", f["fusion_str"], f["val"], "--labels", f["val_csv"], "-o", o], "fusion", "fusion_str"),
    Case("i15-16-label-names-are-integers", lambda f, o: FU(f, o, f["int_labels"]), "label names", "int_labels"),
    Case("i15-16-label-names-are-lists", lambda f, o: ["info", f["list_labels"]], "label names", "list_labels"),
    Case("i15-16-lrf-missing-norm", lambda f, o: [*FU(f, o, f["text"]), "--lrf", f["lrf_nonorm"]], "norm.weight", "lrf_nonorm"),
    Case("i15-16-lrf-extra-tensor", lambda f, o: EI(f, o, f["root"], "--lrf", f["lrf_extra"]), "unexpected tensor", "lrf_extra"),
    Case("i15-16-lrf-classifier-wider-than-rank", lambda f, o: [*FU(f, o, f["text"]), "--lrf", f["lrf_wide"]], "rank", "lrf_wide"),
    # 17, 29, 30: empty files
    Case("i15-17-train-lrf-zero-images", lambda f, o: ["train-lrf", f["empty_emb"], "--labels", f["train_csv"], *R, "-o", o], "holds no images", "empty_emb"),
    Case("i15-17-evaluate-zero-images", lambda f, o: ["evaluate", f["tuned"], f["empty_emb"], "--labels", f["test_csv"]], "holds no images", "empty_emb"),
    Case("i15-17-tune-zero-images", lambda f, o: ["tune-threshold", f["tuned"], f["empty_emb"], "--labels", f["val_csv"], "-o", o], "holds no images", "empty_emb"),
    Case("i15-17-fuse-zero-images", lambda f, o: ["fuse", f["empty_emb"], f["text"], "--labels", f["train_csv"], "--epochs", "1", "-o", o], "holds no images", "empty_emb"),
    Case("i15-29-scores-with-no-labels", lambda f, o: ["evaluate", "--scores", f["scores_nolabels"], "--labels", f["test_csv"]], "holds no labels", "scores_nolabels"),
    Case("i15-29-scores-with-no-images", lambda f, o: ["evaluate", "--scores", f["scores_noimages"], "--labels", f["test_csv"]], "holds no images", "scores_noimages"),
    Case("i15-29-scores-thresholds-beyond-one", lambda f, o: ["evaluate", "--scores", f["scores_bad_th"], "--labels", f["test_csv"]], "[0, 1]", "scores_bad_th"),
    Case("i15-30-zero-dimensional-features", lambda f, o: ["train-lrf", f["zero_dim"], "--labels", f["train_csv"], *R, "-o", o], "holds no feature dimensions", "zero_dim"),
    # 20: mavl's home folder and other output folders checked before the work
    Case("i15-20-mavl-home-under-a-file", lambda f, o: [*FU(f, o, f["text"]), "--set-default"], "is a file", "regular",
         env={"MAVL_HOME": lambda f, o: f["regular"] / "home"}),
    Case("i15-20-demo-workdir-under-a-file", lambda f, o: ["demo", "--workdir", f["regular"] / "w", "-n", "30"], "is a file", "regular"),
    Case("i15-20-import-weights-output-under-a-file", lambda f, o: ["import-weights", f["vit"] / "model.safetensors", "--backbone", VIT, "-o", f["regular"] / "w"], "is a file", "regular"),
    # 21: user errors that surfaced as internal errors
    Case("i15-21-eta-infinite", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], *R, "--eta", "inf", "-o", o], "--eta"),
    Case("i15-21-seed-beyond-64-bits", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], *R, "--seed", "99999999999999999999999", "-o", o], "--seed"),
    Case("i15-21-model-args-img-size-0", lambda f, o: [*EI(f, o, f["root"]), "--model-args", '{"img_size": 0}'], "cannot build"),
    Case("i15-21-model-args-checkpoint-path", lambda f, o: [*EI(f, o, f["root"]), "--model-args", json.dumps({"checkpoint_path": str(f["evil_pth"])})], "checkpoint_path"),
    Case("i15-21-import-weights-unknown-model", lambda f, o: ["import-weights", f["vit"] / "model.safetensors", "--backbone", "no_such_net_xyz", "-o", o.parent / "w"], "no_such_net_xyz"),
    Case("i15-21-import-weights-other-architecture", lambda f, o: ["import-weights", f["vit"] / "model.safetensors", "--backbone", "resnet18", "-o", o.parent / "w"], "do not belong", "vit"),
    Case("i15-21-resume-file-is-a-directory", lambda f, o: [*EI(f, f["resume_dir_out"], f["root"] / "images"), "--resume"], "is a directory", "resume_dir_out"),
    Case("i15-21-resume-record-malformed", lambda f, o: [*EI(f, f["malformed_out"], f["root"] / "images"), "--resume"], "malformed", "malformed_out"),
    # 22: control characters never reach the terminal raw (the test also checks stderr for any)
    Case("i15-22-newline-in-a-file-name", lambda f, o: ["info", o.parent / "x\nerror: a forged second line.st"], "x\\nerror: a forged"),
    Case("i15-22-escape-sequences-in-a-file-name", lambda f, o: ["info", o.parent / "t\x1b]0;pwned\x07\x1b[2J.st"], "t\\x1b]0;pwned\\x07\\x1b[2j.st"),
    # 9, 15, 28: label files
    Case("i15-09-gzip-label-file-expands-beyond-the-limit", lambda f, o: ["train-lrf", f["train"], "--labels", f["bomb.csv.gz"], *R, "-o", o], "decompression bomb", "bomb.csv.gz",
         env={"MAVL_MAX_LABEL_MB": lambda f, o: 1}),
    Case("i15-09-label-file-beyond-the-row-limit", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], *R, "-o", o], "MAVL_MAX_LABEL_ROWS", "train_csv",
         env={"MAVL_MAX_LABEL_ROWS": lambda f, o: 5}),
    Case("i15-15-nested-label-map", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], "--label-map", f["deep_map.json"], *R, "-o", o], "nested too deeply", "deep_map.json"),
    Case("i15-28-label-value-nan", lambda f, o: ["train-lrf", f["train"], "--labels", f["csv_nan"], *R, "-o", o], "'nan' (row 5)", "csv_nan"),
    Case("i15-28-label-value-N/A", lambda f, o: ["train-lrf", f["train"], "--labels", f["csv_NA"], *R, "-o", o], "'n/a' (row 5)", "csv_NA"),
    Case("i15-28-label-value-None", lambda f, o: ["train-lrf", f["train"], "--labels", f["csv_None"], *R, "-o", o], "'none' (row 5)", "csv_None"),
    # 27: one stdout
    Case("i15-27-train-lrf-two-outputs-to-stdout", lambda f, o: ["train-lrf", f["train"], "--labels", f["train_csv"], *R, "-o", "-", "--embed-out", "-"], "standard output"),
    Case("i15-27-evaluate-json-and-csv-to-stdout", lambda f, o: [*EV(f), "--json", "--csv", "-"], "standard output"),
    # 31, 33: DICOM values and decoders
    Case("i15-31-dicom-rescale-slope-1e999", lambda f, o: EI(f, o, f["slope.dcm"]), "infinite", "slope.dcm"),
    Case("i15-33-jpeg12-dicom-no-decoder-reads", lambda f, o: EI(f, o, f["jpeg12.dcm"]), "installed decoders", "jpeg12.dcm", max_len=400),
]

# Session 3's attack campaign on the newer surfaces (numbered as in /work/notes/s3/s3-attack.md).
PH = lambda f, *x: ["predict", *x, "--model", f["tuned"], "--weights", f["vit"]]  # noqa: E731
EM = lambda f, *x: ["evaluate-maps", f["maps_dir"], *x]  # noqa: E731
CASES += [
    # 01-02: heatmap outputs go through the output guard
    Case("s3-01-heatmap-overlay-onto-an-input-image", lambda f, o: [*PH(f, f["hm_a"], f["hm_a_edema"]), "--heatmap", f["hm_dir"], "--heatmap-labels", "all"], OVERWRITE, "hm_a_edema"),
    Case("s3-02-heatmap-folder-is-stdout", lambda f, o: [*PH(f, f["img0"]), "--heatmap", "-"], "standard output"),
    # 03-06: an output path inside a model folder (weights, config, tokenizer) is an input too
    Case("s3-03-embed-images-output-onto-its-weights", lambda f, o: ["embed-images", f["root"], *E, "--weights", f["vit_copy"], "-o", f["vit_copy_weights"]], OVERWRITE, "vit_copy_weights"),
    Case("s3-04-predict-out-onto-the-encoder-weights", lambda f, o: ["predict", f["img0"], "--model", f["tuned"], "--weights", f["vit_copy"], "--out", f["vit_copy_weights"]], OVERWRITE, "vit_copy_weights"),
    Case("s3-05-embed-text-output-onto-the-text-model", lambda f, o: ["embed-text", f["labels_txt"], "--text-model", f["bert_notok"], "-o", f["bert_copy_config"]], OVERWRITE, "bert_copy_config"),
    Case("s3-06-zero-shot-output-onto-the-clip-weights", lambda f, o: ["zero-shot", "--encoder", f"open_clip:{f['clip_dir']}", "--descriptions", f["labels_txt"], "-o", f["clip_weights"]], OVERWRITE, "clip_weights"),
    # 08: two labels, one overlay name
    Case("s3-08-heatmap-labels-share-an-overlay-name", lambda f, o: [*PH(f, f["img0"])[:-4], "--model", f["slug_twins"], "--weights", f["vit"], "--heatmap", o.parent / "hm"], "share the overlay name"),
    # 09-11: evaluate-maps bounds and box files
    Case("s3-09-evaluate-maps-bootstrap-1e9", lambda f, o: EM(f, "--boxes", f["boxes_bigfield"], "--bootstrap", "1000000000"), "--bootstrap"),
    Case("s3-10-evaluate-maps-seed-negative", lambda f, o: EM(f, "--boxes", f["boxes_bigfield"], "--seed", "-1"), "--seed"),
    Case("s3-11-evaluate-maps-box-field-too-large", lambda f, o: EM(f, "--boxes", f["boxes_bigfield"]), "cannot read box file", "boxes_bigfield"),
    # 19: an empty image argument (an unset shell variable) walked the whole working folder
    Case("s3-19-embed-images-empty-argument", lambda f, o: ["embed-images", "", *E, "--weights", f["vit"], "-o", o], "image argument is empty"),
    Case("s3-19-predict-empty-argument", lambda f, o: [*PH(f, ""), "--out", o], "image argument is empty"),
    # 20-23: subgroup bins and metadata, prevalences, label encodings
    Case("s3-20-evaluate-by-nan-bin-edge", lambda f, o: [*EV(f), "--by", "Patient:nan,20"], "finite numbers"),
    Case("s3-21-evaluate-metadata-image-twice-with-two-values", lambda f, o: [*EV(f), "--by", "sex", "--metadata", f["meta_conflict"]], "listed twice", "meta_conflict"),
    Case("s3-22-calibrate-prevalence-given-twice", lambda f, o: ["calibrate", f["tuned"], "--prevalence", "Edema=0.3,Edema=0.5", "--source-prevalence", "Edema=0.2", "-o", o], "given twice"),
    Case("s3-23-label-file-in-utf16", lambda f, o: ["train-lrf", f["train"], "--labels", f["utf16_csv"], *R, "-o", o], "UTF-16", "utf16_csv"),
    # 25-27: --model-args that would allocate gigabytes, and a text file as weights
    Case("s3-25-model-args-img-size-100000", lambda f, o: ["embed-images", f["root"], "--backbone", VIT, "--random-init", "--model-args", '{"img_size": 100000}', "-o", o], "in 1..2048"),
    Case("s3-26-model-args-a-quadrillion-parameters", lambda f, o: ["embed-images", f["root"], "--backbone", VIT, "--random-init", "--model-args", '{"embed_dim": 999999, "num_heads": 3, "depth": 100}', "-o", o], "parameters"),
    Case("s3-27-weights-file-is-text", lambda f, o: EI(f, o, f["root"])[:-4] + ["--weights", f["labels_txt"], "-o", o], "not a weights file", "labels_txt"),
    # 30: a map method that fails on the first image leaves no empty heatmap folder behind
    Case("s3-30-heatmap-method-fails-leaves-no-folder", lambda f, o: [*PH(f, f["img0"]), "--heatmap", o.parent / "hm", "--heatmap-method", "hirescam", "--heatmap-labels", "all"], "HiResCAM"),
    # 16-18: `mavl merge` checks each part's shard record before using it
    Case("s3-16-merge-shard-count-1e12", lambda f, o: ["merge", f["shard_count_1e12"], "-o", o], "missing", "shard_count_1e12"),
    Case("s3-17-merge-shard-skipped-not-a-number", lambda f, o: ["merge", f["shard_skipped_text"], "-o", o], "damaged shard record", "shard_skipped_text"),
    Case("s3-18-merge-shard-command-output-slot-outside", lambda f, o: ["merge", f["shard_output_at_99"], "-o", o], "damaged shard record", "shard_output_at_99"),
    # 12-14: a stored calibration is checked on read
    Case("s3-12-model-calibration-slope-negative", lambda f, o: [*EV(f)[:1], f["cal_negative"], *EV(f)[2:]], "must be > 0", "cal_negative"),
    Case("s3-13-model-says-calibrated-without-tensors", lambda f, o: ["info", f["cal_missing"]], "no calibration tensors", "cal_missing"),
    Case("s3-14-model-calibration-wrong-length", lambda f, o: ["predict", f["img0"], "--model", f["cal_short"], "--out", o], "one per label", "cal_short"),
]


KIND_FILES = {"image-embeddings": "train", "text-embeddings": "text", "lrf-head": "lrf", "model": "tuned", "scores": "scores"}
# (slot id, expected kind, argv builder given the file to put in that slot)
SLOTS = [
    ("train-lrf.EMBEDDINGS", "image-embeddings", lambda f, x, o: ["train-lrf", x, "--labels", f["train_csv"], *R, "-o", o]),
    ("fuse.EMBEDDINGS", "image-embeddings", lambda f, x, o: ["fuse", x, f["text"], "--labels", f["train_csv"], "--epochs", "1", "-o", o]),
    ("fuse.TEXT", "text-embeddings", lambda f, x, o: ["fuse", f["train"], x, "--labels", f["train_csv"], "--epochs", "1", "-o", o]),
    ("fuse.--lrf", "lrf-head", lambda f, x, o: ["fuse", f["train"], f["text"], "--lrf", x, "--labels", f["train_csv"], "--epochs", "1", "-o", o]),
    ("fuse.--val", "image-embeddings", lambda f, x, o: ["fuse", f["train"], f["text"], "--val", x, "--val-labels", f["val_csv"], "--labels", f["train_csv"], "--epochs", "1", "-o", o]),
    ("tune.MODEL", "model", lambda f, x, o: ["tune-threshold", x, f["val"], "--labels", f["val_csv"], "-o", o]),
    ("tune.EMBEDDINGS", "image-embeddings", lambda f, x, o: ["tune-threshold", f["tuned"], x, "--labels", f["val_csv"], "-o", o]),
    ("evaluate.MODEL", "model", lambda f, x, o: ["evaluate", x, f["test"], "--labels", f["test_csv"], "--csv", o]),
    ("evaluate.EMBEDDINGS", "image-embeddings", lambda f, x, o: ["evaluate", f["tuned"], x, "--labels", f["test_csv"], "--csv", o]),
    ("evaluate.--scores", "scores", lambda f, x, o: ["evaluate", "--scores", x, "--labels", f["test_csv"], "--csv", o]),
    ("predict.--model", "model", lambda f, x, o: ["predict", f["root"] / "images", "--model", x, "--out", o]),
    ("embed-images.--lrf", "lrf-head", lambda f, x, o: ["embed-images", f["root"], *E, "--weights", f["vit"], "--lrf", x, "-o", o]),
]
PAIRS = [(slot, want, build, kind) for slot, want, build in SLOTS for kind in KIND_FILES if kind != want]



#: the commands each tests/bad_inputs/test_bad_<surface>.py runs the catalogue's cases of
SURFACES = {
    "embed": [
        "embed-images",
        "merge",
        "import-weights"
    ],
    "train": [
        "train-lrf",
        "fuse",
        "embed-text"
    ],
    "evaluate": [
        "evaluate",
        "tune-threshold",
        "calibrate",
        "evaluate-maps"
    ],
    "predict": [
        "predict",
        "zero-shot"
    ],
    "files": [
        "info",
        "phantoms",
        "demo",
        "embed-image"
    ],
}


class _AnyFile(dict):
    """Stands in for the forged files: any key is a path named after it (enough to read a case's command)."""

    def __missing__(self, key: str) -> Path:
        return Path(key)


def command_of(case) -> str:
    """The mavl command a case runs (its first argument)."""
    case = case.values[0] if hasattr(case, "values") else case
    return str(case.argv(_AnyFile(), Path("out.st"))[0])


def case_id(case) -> str:
    return (case.values[0] if hasattr(case, "values") else case).id


def cases_for(*commands: str) -> list:
    """The catalogue's cases whose command is one of ``commands``."""
    return [c for c in CASES if command_of(c) in commands]


def check_case(case: Case, bad: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mavl_cli.cli import app as cli

    monkeypatch.setitem(cli._DEBUG, "on", False)
    monkeypatch.setenv("MAVL_HOME", str(tmp_path / "home"))
    inputs_dir = bad["existing"].parent
    watched = [inputs_dir, bad["train"].parent, bad["root"]]
    before = [digest(w) for w in watched]
    out = tmp_path / "out.st"
    argv = [str(a) for a in case.argv(bad, out)]
    env = {k: str(v(bad, out)) for k, v in (case.env or {}).items()}

    r = run_cli(argv, env=env)

    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert not CONTROL.search(r.stderr), f"raw control characters reached the terminal: {r.stderr!r}"
    assert r.exit_code == 2, f"exit {r.exit_code}, stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr + r.stdout
    assert len(lines) == 1, f"expected one error line, got:\n{r.stderr}"
    line = lines[0]
    assert line.startswith("error:"), line
    assert case.expect.lower() in line.lower(), line
    if case.names:
        assert bad[case.names].name in line, f"{bad[case.names].name!r} not named in: {line}"
    if case.max_len:
        assert len(line) <= case.max_len, f"{len(line)} characters: {line}"
    assert not bad["marker"].exists(), "a pickled payload ran"
    # Nothing created: the test's own folder stays empty (no output, no temp, no .partial).
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    # Inputs (and the pre-existing output) are byte-identical.
    assert [digest(w) for w in watched] == before


