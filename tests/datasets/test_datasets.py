"""Data-set adapters on small trees in each release's exact layout (mavl_cli.synthetic.layouts).

Expected values are recomputed here from the written CSVs with plain pandas
(joins, filters), never taken from the adapter under test.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pytest

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.inputs import collect_inputs
from mavl_cli.datasets.options import DatasetOptions, LabelSource
from mavl_cli.datasets.reader import read_labels
from mavl_cli.synthetic.layouts import write_mimic, write_padchest, write_vindr

TINY = "--backbone vit_tiny_patch16_224 --weights {w}"


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _rewrite(path: Path, df: pd.DataFrame) -> None:
    data = df.to_csv(index=False).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    return write_mimic(tmp_path_factory.mktemp("mimic"), patients=4, studies=2)


def _src(layout, **kw) -> LabelSource:
    return LabelSource(layout.labels, DatasetOptions(**kw))


# --------------------------------------------------------------------------- MIMIC-CXR


def test_mimic_every_image_gets_its_studys_labels(mimic):
    t = read_labels(mimic.labels, uncertain="ignore", blank=float("nan"))
    meta, lab = _csv(mimic.files["metadata"]), _csv(mimic.labels)
    want = meta.merge(lab, on=["subject_id", "study_id"], how="inner")
    assert len(t) == len(want) == len(meta) and t.source == "mimic"
    for k, row in want.iterrows():
        s = row["subject_id"]
        assert t.ids[k] == f"files/p{s[:2]}/p{s}/s{row['study_id']}/{row['dicom_id']}.jpg"
        assert (mimic.root / t.ids[k]).is_file() and t.groups[k] == f"p{s}"
        for j, name in enumerate(t.names):
            cell = row[name]
            if cell in ("", "-1.0"):
                assert not t.mask[k, j]
            else:
                assert t.mask[k, j] and t.y[k, j] == float(cell)


def test_mimic_split_and_views_filter_rows(mimic):
    meta, split = _csv(mimic.files["metadata"]), _csv(mimic.files["split"])
    joined = meta.merge(split[["dicom_id", "split"]], on="dicom_id")
    for name in ("train", "validate", "test"):
        t = read_labels(_src(mimic, split=name, views=("pa", "AP")))
        want = joined[(joined.split == name) & joined.ViewPosition.isin(["PA", "AP"])]
        assert [i.rsplit("/", 1)[1][:-4] for i in t.ids] == want.dicom_id.tolist()
    lateral = read_labels(_src(mimic, views=("LATERAL",)))
    assert len(lateral) == (meta.ViewPosition == "LATERAL").sum()


def test_mimic_side_files_found_beside_or_given(mimic, tmp_path):
    elsewhere = tmp_path / "labels.csv.gz"
    elsewhere.write_bytes(mimic.labels.read_bytes())
    with pytest.raises(MavlError, match="mimic-cxr-2.0.0-metadata.csv.gz is not beside it: pass --metadata"):
        read_labels(elsewhere)
    t = read_labels(LabelSource(elsewhere, DatasetOptions(metadata=str(mimic.files["metadata"]), split="test",
                                                           split_file=str(mimic.files["split"]))))
    assert len(t) == (_csv(mimic.files["split"]).split == "test").sum()


def test_mimic_negbio_file_reads_the_same(mimic, tmp_path):
    root = write_mimic(tmp_path, patients=2, studies=1, label_file="mimic-cxr-2.0.0-negbio.csv.gz")
    t = read_labels(root.labels)
    assert t.source == "mimic" and len(t) == 4 and "Pleural Effusion" in t.names


def test_mimic_dicom_release_lists_dcm_files_and_aligns(tmp_path):
    layout = write_mimic(tmp_path, patients=3, studies=1, dicom=True)
    items, missing = collect_inputs([str(layout.root)], LabelSource(layout.labels, DatasetOptions(views=("PA", "AP"))))
    assert not missing and len(items) == 3 and all(it.id.endswith(".dcm") and it.path.is_file() for it in items)
    t = read_labels(layout.labels).align([it.id for it in items])
    assert t.ids == [it.id for it in items] and t.y.shape[0] == 3


def test_mimic_study_without_images_is_one_clear_error(mimic, tmp_path):
    layout = write_mimic(tmp_path, patients=2, studies=2)
    meta = _csv(layout.files["metadata"])
    gone = meta.study_id.iloc[0]
    _rewrite(layout.files["metadata"], meta[meta.study_id != gone])
    with pytest.raises(MavlError, match=f"study s{gone} .* has no image in .*metadata.*same MIMIC-CXR release") as e:
        read_labels(layout.labels)
    assert "\n" not in str(e.value)


def test_mimic_image_without_labels_is_named_when_used(tmp_path):
    layout = write_mimic(tmp_path, patients=2, studies=2)
    lab = _csv(layout.labels)
    gone = lab.study_id.iloc[1]
    _rewrite(layout.labels, lab[lab.study_id != gone])
    t = read_labels(layout.labels)
    assert all(f"/s{gone}/" not in i for i in t.ids) and len(t) == 6
    orphan = next(str(p.relative_to(layout.root)) for p in layout.images if f"/s{gone}/" in str(p))
    with pytest.raises(MavlError, match=f"have no row .*its study s{gone} has no row in mimic-cxr-2.0.0-chexpert"):
        t.align([t.ids[0], orphan])


@pytest.mark.parametrize("edit, message", [
    ("study", "puts image .* in study s.*, .*metadata.* in study s.*disagree"),
    ("drop", "has no row for image .* of .*metadata.*disagree"),
    ("value", "has split 'dev'; expected train, validate, test"),
])
def test_mimic_split_file_that_disagrees(tmp_path, edit, message):
    layout = write_mimic(tmp_path, patients=3, studies=1)
    sp = _csv(layout.files["split"])
    if edit == "study":
        sp.loc[1, "study_id"] = "59999999"
    elif edit == "drop":
        sp = sp.iloc[1:]
    else:
        sp.loc[2, "split"] = "dev"
    _rewrite(layout.files["split"], sp)
    with pytest.raises(MavlError, match=message) as e:
        read_labels(_src(layout, split="train"))
    assert "\n" not in str(e.value)
    read_labels(layout.labels)  # without --split the split file is not read


def test_split_and_views_errors(mimic, tmp_path):
    with pytest.raises(MavlError, match="MIMIC-CXR splits are train, validate, test"):
        read_labels(_src(mimic, split="val"))
    with pytest.raises(MavlError, match="no image is left after views OBLIQUE"):
        read_labels(_src(mimic, views=("OBLIQUE",)))
    plain = tmp_path / "plain.csv"
    plain.write_text("path,Edema\na.png,1\nb.png,0\n")
    with pytest.raises(MavlError, match="--views: .*plain.csv has no view column"):
        read_labels(LabelSource(plain, DatasetOptions(views=("PA",))))
    with pytest.raises(MavlError, match="--split: .*plain.csv has no split column"):
        read_labels(LabelSource(plain, DatasetOptions(split="train")))


def test_chexpert_views_keep_frontal_projections(tmp_path):
    p = tmp_path / "valid.csv"
    p.write_text("Path,Sex,Age,Frontal/Lateral,AP/PA,Edema\n"
                 "CheXpert-v1.0-small/valid/patient1/study1/view1_frontal.jpg,F,50,Frontal,AP,1.0\n"
                 "CheXpert-v1.0-small/valid/patient1/study1/view2_lateral.jpg,F,50,Lateral,,0.0\n"
                 "CheXpert-v1.0-small/valid/patient2/study1/view1_frontal.jpg,M,60,Frontal,PA,0.0\n")
    t = read_labels(LabelSource(p, DatasetOptions(views=("PA", "AP"))))
    assert t.ids == ["valid/patient1/study1/view1_frontal.jpg", "valid/patient2/study1/view1_frontal.jpg"]
    assert read_labels(LabelSource(p, DatasetOptions(views=("lateral",)))).ids == ["valid/patient1/study1/view2_lateral.jpg"]
    assert read_labels(p).ids == read_labels(LabelSource(p, DatasetOptions())).ids  # no options: unchanged


def test_mimic_embed_and_train_through_the_cli(mimic, tiny_vit, cli, tmp_path):
    lab = mimic.labels
    r = cli(f"embed-images {mimic.root} --labels {lab} --split train --views PA,AP {TINY.format(w=tiny_vit)} -o {tmp_path/'train.st'}")
    assert r.exit_code == 0, r.stderr
    r = cli(f"embed-images {mimic.root} --labels {lab} --split validate --views PA,AP {TINY.format(w=tiny_vit)} -o {tmp_path/'val.st'}")
    assert r.exit_code == 0, r.stderr
    from mavl_cli.io.mavlfile import read_file

    ids = read_file(tmp_path / "train.st").ids()
    assert ids == read_labels(_src(mimic, split="train", views=("PA", "AP"))).ids and len(ids) == 4
    r = cli(f"train-lrf {tmp_path/'train.st'} --labels {lab} --split train --views PA,AP --val {tmp_path/'val.st'} "
            f"--only Cardiomegaly,Edema --rank 4 --keep 2 --epochs 2 -o {tmp_path/'lrf.st'}")
    assert r.exit_code == 0, r.stderr
    r = cli(f"train-lrf {tmp_path/'val.st'} --labels {lab} --split train --rank 4 --keep 2 --epochs 1 -o {tmp_path/'x.st'}")
    assert r.exit_code == 2 and "it is in split validate, not train" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.st").exists()


# --------------------------------------------------------------------------- PadChest


@pytest.fixture(scope="module")
def padchest(tmp_path_factory):
    return write_padchest(tmp_path_factory.mktemp("padchest"), images=8)


def test_padchest_text_lists_become_columns_with_standard_names(padchest):
    from mavl_cli.datasets.padchest import TO_STANDARD

    t = read_labels(padchest.labels)
    raw = _csv(padchest.labels)
    assert t.source == "padchest" and t.ids == (raw.ImageDir + "/" + raw.ImageID).tolist()
    assert t.groups == raw.PatientID.tolist()
    assert "Pleural Effusion" in t.names and "aortic elongation" in t.names and "pleural effusion" not in t.names
    for k, rel in enumerate(t.ids):
        marked = {TO_STANDARD.get(w, w) for w in padchest.truth[rel]}
        assert {n for j, n in enumerate(t.names) if t.y[k, j] == 1} == marked - ({"No Finding"} - set(t.names))
    items, missing = collect_inputs([str(padchest.root)], padchest.labels)
    assert not missing and [it.id for it in items] == t.ids


def test_padchest_projection_filter_and_blank_labels(padchest, tmp_path):
    raw = _csv(padchest.labels)
    t = read_labels(LabelSource(padchest.labels, DatasetOptions(views=("PA", "AP"))))
    assert len(t) == raw.Projection.isin(["PA", "AP"]).sum()
    raw.loc[0, "Labels"] = ""
    raw.loc[1, "Labels"] = "[]"
    p = tmp_path / padchest.labels.name
    _rewrite(p, raw)
    t = read_labels(p, blank=float("nan"))
    assert not t.mask[:2].any() and t.mask[2:].all()


def test_padchest_through_the_cli(padchest, tiny_vit, cli, tmp_path):
    r = cli(f"embed-images {padchest.root} --labels {padchest.labels} --views PA,AP {TINY.format(w=tiny_vit)} -o {tmp_path/'e.st'}")
    assert r.exit_code == 0, r.stderr
    r = cli(f"train-lrf {tmp_path/'e.st'} --labels {padchest.labels} --views PA,AP --rank 4 --keep 2 --epochs 1 "
            f"--val-split 0 -o {tmp_path/'lrf.st'}")
    assert r.exit_code == 0, r.stderr


# --------------------------------------------------------------------------- VinDr-CXR


@pytest.fixture(scope="module")
def vindr(tmp_path_factory):
    return write_vindr(tmp_path_factory.mktemp("vindr"), train=4, test=2)


@pytest.mark.parametrize("vote", ["any", "majority"])
def test_vindr_readers_are_combined_by_vote(vindr, vote):
    t = read_labels(LabelSource(vindr.labels, DatasetOptions(vote=vote)))
    raw = pd.read_csv(vindr.labels, dtype={"image_id": str})
    findings = [c for c in raw.columns if c not in ("image_id", "rad_id")]
    marks = raw.groupby("image_id", sort=False)[findings].agg(["sum", "count"])
    assert t.source == "vindr" and t.ids == [f"train/{i}.dicom" for i in marks.index]
    for k, image in enumerate(marks.index):
        for j, f in enumerate(t.names):
            s, n = marks.loc[image, (f, "sum")], marks.loc[image, (f, "count")]
            assert t.y[k, j] == float(s > 0 if vote == "any" else 2 * s > n)
    assert read_labels(vindr.labels).y.tolist() == read_labels(LabelSource(vindr.labels, DatasetOptions(vote="any"))).y.tolist()


def test_vindr_votes_differ_where_one_reader_disagrees(vindr):
    any_ = read_labels(LabelSource(vindr.labels, DatasetOptions(vote="any")))
    maj = read_labels(LabelSource(vindr.labels, DatasetOptions(vote="majority")))
    j = any_.names.index("Calcification")
    assert any_.y[0, j] == 1 and maj.y[0, j] == 0  # only R9 marked it


def test_vindr_test_file_and_listing(vindr):
    t = read_labels(vindr.files["test"])
    assert len(t) == 2 and all(i.startswith("test/") and i.endswith(".dicom") for i in t.ids)
    for split in ("labels", "test"):
        src = vindr.labels if split == "labels" else vindr.files["test"]
        items, missing = collect_inputs([str(vindr.root)], src)
        assert not missing and all(it.path.is_file() for it in items)
    with pytest.raises(MavlError, match="--views: .*has no view column"):
        read_labels(LabelSource(vindr.labels, DatasetOptions(views=("PA",))))
    with pytest.raises(MavlError, match="--vote: .*one reader per image"):
        read_labels(LabelSource(_plain(vindr.root), DatasetOptions(vote="majority")))
    with pytest.raises(MavlError, match="--vote must be one of any, majority"):
        DatasetOptions(vote="all")


def _plain(root: Path) -> Path:
    p = root / "plain.csv"
    p.write_text("path,Edema\na.png,1\n")
    return p


def test_vindr_through_the_cli(vindr, tiny_vit, cli, tmp_path):
    r = cli(f"embed-images {vindr.root} --labels {vindr.labels} {TINY.format(w=tiny_vit)} -o {tmp_path/'e.st'}")
    assert r.exit_code == 0, r.stderr
    r = cli(f"train-lrf {tmp_path/'e.st'} --labels {vindr.labels} --vote majority --rank 4 --keep 2 --epochs 1 "
            f"--val-split 0 -o {tmp_path/'lrf.st'}")
    assert r.exit_code == 0, r.stderr


# --------------------------------------------------------------------------- names across data sets


def test_known_renames_only_exact_correspondences():
    from mavl_cli.datasets.labelmap import known_renames

    nih = ["Atelectasis", "Effusion", "Pleural_Thickening", "Mass", "Infiltration"]
    assert known_renames(["Pleural Effusion", "Atelectasis", "Lung Lesion"], nih) == {"Effusion": "Pleural Effusion"}
    assert known_renames(["Effusion", "Pleural_Thickening"], ["Pleural Effusion", "Pleural thickening"]) == {
        "Pleural Effusion": "Effusion", "Pleural thickening": "Pleural_Thickening"}
    # both spellings present: the wanted one is used as it is, nothing renamed
    assert known_renames(["Effusion"], ["Effusion", "Pleural Effusion"]) == {}


def test_model_with_chexpert_names_evaluates_on_nih_style_labels(chain, cli, tmp_path):
    d, test_csv = chain["dir"], chain["phantoms"].splits["test"]
    df = pd.read_csv(test_csv, dtype=str, keep_default_na=False)
    nih = tmp_path / "nih_names.csv"
    df.rename(columns={"Pleural Effusion": "Effusion"}).to_csv(nih, index=False)
    a = cli(f"evaluate {d/'tuned.st'} {d/'test.st'} --labels {test_csv} --json")
    b = cli(f"evaluate {d/'tuned.st'} {d/'test.st'} --labels {nih} --json")
    assert a.exit_code == 0 and b.exit_code == 0, b.stderr
    import json

    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    assert ra["labels"] == rb["labels"]
    assert any("'Effusion' -> 'Pleural Effusion'" in w for w in rb["warnings"])
    val = tmp_path / "val_nih.csv"
    pd.read_csv(chain["phantoms"].splits["val"], dtype=str, keep_default_na=False).rename(
        columns={"Pleural Effusion": "Effusion"}).to_csv(val, index=False)
    r = cli(f"tune-threshold {d/'model.st'} {d/'val.st'} --labels {val} -o {tmp_path/'t.st'}")
    assert r.exit_code == 0 and "'Effusion' -> 'Pleural Effusion'" in r.stderr


def test_model_with_nih_names_reads_chexpert_labels(tmp_path):
    from mavl_cli.datasets.join import load_labelled
    from mavl_cli.io.mavlfile import MavlFile

    p = tmp_path / "valid.csv"
    p.write_text("Path,Pleural Effusion,Atelectasis\na.png,1.0,0.0\nb.png,0.0,1.0\n")
    emb = MavlFile("image-embeddings", {"features": np.eye(2, dtype=np.float32)}, {"ids": ["b.png", "a.png"]}, "x")
    data = load_labelled(emb, p, names=["Effusion", "Atelectasis"])
    assert data.names == ["Effusion", "Atelectasis"] and data.y.tolist() == [[0, 1], [1, 0]]
    assert data.notes and "'Pleural Effusion' -> 'Effusion'" in data.notes[0]
    with pytest.raises(MavlError, match="'Mass' are not columns of this label file"):
        load_labelled(emb, p, names=["Effusion", "Mass"])


# --------------------------------------------------------------------------- DICOM without an extension


def _preambleless(path: Path, arr: np.ndarray) -> Path:
    """A DICOM data set written without preamble and meta header (implicit VR little endian)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4", "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = arr.tobytes()
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM" and path.read_bytes()[:2] == b"\x08\x00"
    return path


def test_dicom_without_extension_found_by_content(tmp_path, cli):
    from mavl_cli.datasets.inputs import list_images
    from mavl_cli.io.imageio import is_dicom, load_array
    from mavl_cli.synthetic.layouts import write_dicom

    arr = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) % 251).astype(np.uint8)
    d = tmp_path / "archive" / "series1"
    d.mkdir(parents=True)
    magic = write_dicom(d / "IM0001", arr, "a")
    uid = write_dicom(d / "1.2.840.113619.2.55.3.604688119", arr, "b")
    bare = _preambleless(d / "IM0002", arr)
    (d / "README").write_text("not an image\n")
    (d / "notes.3").write_bytes(b"\x08\x00" + b"garbage" * 30)  # starts like DICOM, does not parse
    fifo = d / "IM0003"
    os.mkfifo(fifo)  # would block forever if opened
    assert [is_dicom(p) for p in (magic, uid, bare, d / "README", d / "notes.3", fifo)] == [True] * 3 + [False] * 3
    assert list_images([str(tmp_path / "archive")]) == sorted([magic, uid, bare])
    assert list_images([str(d / "IM*")]) == [magic, bare]
    np.testing.assert_allclose(load_array(bare), arr / 255.0, atol=1e-6)
    np.testing.assert_allclose(load_array(bare), load_array(magic), atol=1e-6)
    items, _ = collect_inputs([str(tmp_path / "archive")])
    assert sorted(it.id for it in items) == [f"series1/{n}" for n in ("1.2.840.113619.2.55.3.604688119", "IM0001", "IM0002")]


def test_dataset_options_share_an_option_the_command_declares_itself(tmp_path):
    """evaluate's subgroup --metadata (issue 13) and MIMIC's --metadata are one option, seen by both."""
    import typer
    from typer.testing import CliRunner

    from mavl_cli.cli.dataset_options import with_dataset_options

    app = typer.Typer()
    seen = {}

    @app.command()
    @with_dataset_options
    def cmd(labels: str = typer.Option(..., "--labels"),
            metadata: Optional[str] = typer.Option(None, "--metadata")) -> None:
        seen.update(labels=labels, metadata=metadata)

    r = CliRunner().invoke(app, ["--labels", "l.csv.gz", "--metadata", "m.csv.gz", "--views", "PA"])
    assert r.exit_code == 0, r.output
    assert seen["metadata"] == "m.csv.gz" and isinstance(seen["labels"], LabelSource)
    assert seen["labels"].options == DatasetOptions(metadata="m.csv.gz", views=("PA",))
    r = CliRunner().invoke(app, ["--labels", "l.csv"])
    assert r.exit_code == 0 and seen["labels"] == "l.csv" and type(seen["labels"]) is str


def test_mimic_blank_study_id_names_its_row(tmp_path):
    layout = write_mimic(tmp_path, patients=2, studies=2)
    lab = _csv(layout.labels)
    lab.loc[2, "study_id"] = ""
    _rewrite(layout.labels, lab)
    with pytest.raises(MavlError, match="column 'study_id' is blank or not an id in row 3"):
        read_labels(layout.labels)
