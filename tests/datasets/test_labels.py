"""Tests for mavl_cli.datasets.labelmap on small CSVs written here (plus the real files when present)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mavl_cli.core.errors import MavlError
from mavl_cli.datasets.chexpert import LABELS as CHEXPERT_LABELS
from mavl_cli.datasets.ids import normalize_id, normalize_many
from mavl_cli.datasets.labelmap import (
    NIH_TO_CHEXPERT,
    match_label_names,
    read_label_map,
)
from mavl_cli.datasets.nih import LABELS as NIH_LABELS
from mavl_cli.datasets.reader import read_labels
from mavl_cli.datasets.table import UNCERTAIN_POLICIES, LabelTable

CHEX = """Path,Sex,Age,Frontal/Lateral,AP/PA,Edema,Cardiomegaly,Pleural Effusion
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,0.0
CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Male,87,Frontal,AP,-1.0,-1.0,1.0
CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Male,83,Lateral,,,0.0,-1.0
"""
NAN = np.nan


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(p, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture
def chex(tmp_path: Path) -> Path:
    return write(tmp_path, "train.csv", CHEX)


# ------------------------------------------------------------------ policies and blanks


@pytest.mark.parametrize(
    "policy, y, mask",
    [
        ("ones", [[1, 0, 0], [1, 1, 1], [0, 0, 1]], np.ones((3, 3), bool)),
        ("zeros", [[1, 0, 0], [0, 0, 1], [0, 0, 0]], np.ones((3, 3), bool)),
        (
            "ignore",
            [[1, 0, 0], [0, 0, 1], [0, 0, 0]],
            [[True, True, True], [False, False, True], [True, True, False]],
        ),
    ],
)
def test_uncertain_policies(chex: Path, policy, y, mask) -> None:
    t = read_labels(chex, uncertain=policy)
    assert t.names == ["Edema", "Cardiomegaly", "Pleural Effusion"]
    assert t.y.dtype == np.float32 and t.mask.dtype == bool
    np.testing.assert_array_equal(t.y, np.array(y, np.float32))
    np.testing.assert_array_equal(t.mask, np.array(mask, bool))
    assert t.source == "chexpert"
    assert set(UNCERTAIN_POLICIES) == {"ones", "zeros", "ignore"}


def test_blank_value_and_blank_nan_masks(chex: Path) -> None:
    t = read_labels(chex, uncertain="zeros", blank=0.5)
    np.testing.assert_array_equal(
        t.y, np.array([[1, 0.5, 0], [0, 0, 1], [0.5, 0, 0]], np.float32)
    )
    assert t.mask.all()
    t = read_labels(chex, uncertain="ones", blank=float("nan"))
    np.testing.assert_array_equal(t.y, np.array([[1, 0, 0], [1, 1, 1], [0, 0, 1]], np.float32))
    np.testing.assert_array_equal(
        t.mask, np.array([[1, 0, 1], [1, 1, 1], [0, 1, 1]], bool)
    )


def test_ids_paths_groups_chexpert(chex: Path) -> None:
    t = read_labels(chex)
    assert t.ids[0] == "train/patient00001/study1/view1_frontal.jpg"
    assert t.paths[0] == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert t.groups == ["patient00001", "patient00002", "patient00002"]
    assert len(t) == 3


def test_string_values_gz_and_metadata_columns(tmp_path: Path) -> None:
    text = (
        "filename,patient_id,split,Age,A,B\n"
        './x/1.png,p1,train,40,"1","-1"\n'
        "x/2.png,p2,test,50,0,1.0\n"
        "x\\3.png,,train,60,-1.0,\n"
    )
    t = read_labels(write(tmp_path, "g.csv.gz", text), uncertain="ignore")
    assert t.names == ["A", "B"] and t.source == "generic"
    assert t.ids == ["x/1.png", "x/2.png", "x/3.png"]
    np.testing.assert_array_equal(t.y, np.array([[1, 0], [0, 1], [0, 0]], np.float32))
    np.testing.assert_array_equal(t.mask, np.array([[1, 0], [1, 1], [0, 1]], bool))
    # blank patient cell falls back to the image's own id
    assert t.groups == ["p1", "p2", "x/3.png"]


def test_tab_separated_and_path_column(tmp_path: Path) -> None:
    text = "img_file\tImage\tEdema\na.png\tother/a.png\t1\nb.png\tother/b.png\t0\n"
    t = read_labels(write(tmp_path, "t.tsv", text), path_column="img_file")
    assert t.ids == ["a.png", "b.png"] and t.names == ["Edema"]
    assert t.groups is None


# ------------------------------------------------------------------ NIH format


NIH = """Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position
00000001_000.png,Cardiomegaly,0,1,57,M,PA
00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA
00000002_000.png,No Finding,0,2,80,M,PA
00000003_000.png,Effusion| Strange Thing |Hernia,0,3,81,F,AP
"""


def test_nih_format(tmp_path: Path) -> None:
    t = read_labels(write(tmp_path, "Data_Entry_2017.csv", NIH))
    assert t.source == "nih"
    assert t.names == list(NIH_LABELS) + ["Strange Thing"]
    assert "No Finding" not in t.names
    assert t.groups == ["1", "1", "2", "3"]
    col = {n: i for i, n in enumerate(t.names)}
    expected = np.zeros((4, 15), np.float32)
    expected[0, col["Cardiomegaly"]] = 1
    expected[1, [col["Cardiomegaly"], col["Emphysema"]]] = 1
    expected[3, [col["Effusion"], col["Hernia"], col["Strange Thing"]]] = 1
    np.testing.assert_array_equal(t.y, expected)
    assert t.mask.all()


def test_nih_groups_from_file_names_without_patient_column(tmp_path: Path) -> None:
    text = "path,Cardiomegaly\n00000001_000.png,1\n00000012_003.png,0\n"
    t = read_labels(write(tmp_path, "l.csv", text))
    assert t.groups == ["1", "12"]


def test_label_map_inline_file_and_builtin(tmp_path: Path) -> None:
    nih = write(tmp_path, "nih.csv", NIH)
    t = read_labels(nih, label_map=NIH_TO_CHEXPERT)
    assert "Pleural Effusion" in t.names and "Effusion" not in t.names
    inline = read_label_map("Effusion=Pleural Effusion, Mass = Lung Lesion")
    assert inline == {"Effusion": "Pleural Effusion", "Mass": "Lung Lesion"}
    csv_map = write(tmp_path, "map.csv", "from,to\n# comment\nEffusion,Pleural Effusion\n\n")
    assert read_label_map(csv_map) == {"Effusion": "Pleural Effusion"}
    json_map = write(tmp_path, "map.json", json.dumps({"Effusion": "Pleural Effusion"}))
    assert read_label_map(str(json_map)) == {"Effusion": "Pleural Effusion"}
    t2 = read_labels(nih, label_map=read_label_map(csv_map), labels=["Pleural Effusion", "Hernia"])
    np.testing.assert_array_equal(t2.y, np.array([[0, 0], [0, 0], [0, 0], [1, 1]], np.float32))


def test_label_map_errors(tmp_path: Path) -> None:
    with pytest.raises(MavlError, match="neither an existing file"):
        read_label_map("no_such_map.csv")
    bad = write(tmp_path, "bad.csv", "a,b,c\n")
    with pytest.raises(MavlError, match="bad.csv"):
        read_label_map(bad)
    bad_json = write(tmp_path, "bad.json", "[1, 2]")
    with pytest.raises(MavlError, match="bad.json"):
        read_label_map(bad_json)
    nih = write(tmp_path, "nih.csv", NIH)
    with pytest.raises(MavlError, match="'Mass' and 'Nodule'.*nih.csv"):
        read_labels(nih, label_map={"Mass": "Lesion", "Nodule": "Lesion"})


# ------------------------------------------------------------------ select and align


def test_select_by_name_after_column_shuffle(tmp_path: Path) -> None:
    a = write(tmp_path, "a.csv", "path,A,B,C\n1.png,1,0,-1\n2.png,0,-1,1\n")
    b = write(tmp_path, "b.csv", "C,path,B,A\n-1,1.png,0,1\n1,2.png,-1,0\n")
    ta, tb = read_labels(a, uncertain="ignore"), read_labels(b, uncertain="ignore")
    assert ta.names != tb.names
    sa, sb = ta.select(["A", "B", "C"]), tb.select(["A", "B", "C"])
    np.testing.assert_array_equal(sa.y, sb.y)
    np.testing.assert_array_equal(sa.mask, sb.mask)
    assert sa.names == ["A", "B", "C"]
    np.testing.assert_array_equal(ta.select(["C", "A"]).y, np.array([[0, 1], [1, 0]], np.float32))
    with pytest.raises(MavlError, match=r"'Z'.*b\.csv"):
        tb.select(["A", "Z"])
    # read_labels(labels=...) is the same selection
    np.testing.assert_array_equal(read_labels(b, labels=["A", "B", "C"]).y,
                                  read_labels(a, labels=["A", "B", "C"]).y)


def test_align_reorders_and_matches_suffixes(chex: Path) -> None:
    t = read_labels(chex, uncertain="ones")
    order = [2, 0, 1]
    emb = [t.ids[i] for i in order]
    a = t.align(emb)
    assert a.ids == emb
    np.testing.assert_array_equal(a.y, t.y[order])
    assert a.groups == [t.groups[i] for i in order]
    assert a.paths == [t.paths[i] for i in order]
    # embedding ids relative to another root: a longer prefix, or a shorter suffix
    other = ["/data/chex/train/patient00002/study1/view2_lateral.jpg",
             "./patient00001/study1/view1_frontal.jpg",
             "patient00002\\study2\\view1_frontal.jpg"]
    b = t.align(other)
    np.testing.assert_array_equal(b.y, t.y[[2, 0, 1]])
    assert b.ids == other


def test_align_file_name_alone_and_ambiguous(tmp_path: Path) -> None:
    p = write(tmp_path, "l.csv", "path,A\nx/a.png,1\ny/a.png,0\nx/b.png,1\n")
    t = read_labels(p)
    np.testing.assert_array_equal(t.align(["b.png", "y/a.png"]).y[:, 0], [1, 0])
    with pytest.raises(MavlError, match=r"l\.csv.*'a\.png'"):
        t.align(["a.png"])  # two rows end in a.png: not guessed


def test_align_missing_ids_are_named(chex: Path) -> None:
    t = read_labels(chex)
    with pytest.raises(MavlError) as err:
        t.align([t.ids[0], "nope1.jpg", "patient99/nope2.jpg"])
    msg = str(err.value)
    assert "train.csv" in msg and "nope1.jpg" in msg and "nope2.jpg" in msg and "2 of 3" in msg
    many = [f"missing_{i}.png" for i in range(9)]
    with pytest.raises(MavlError, match="and 4 more"):
        t.align(many)


def test_match_label_names() -> None:
    match_label_names(["A", "B"], ["B", "A"], "l.csv", "emb.safetensors")
    with pytest.raises(MavlError) as err:
        match_label_names(["A", "B"], ["B", "C"], "l.csv", "emb.safetensors")
    msg = str(err.value)
    assert "'A' in l.csv but not in emb.safetensors" in msg
    assert "'C' in emb.safetensors but not in l.csv" in msg


# ------------------------------------------------------------------ ids


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("./a/b.png", "a/b.png"),
        ("a\\b\\c.png", "a/b/c.png"),
        (" a//b/./c.png ", "a/b/c.png"),
        ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
         "train/patient00001/study1/view1_frontal.jpg"),
        ("/data/CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg",
         "valid/patient64541/study1/view1_frontal.jpg"),
        ("../up/x.png", "../up/x.png"),
        ("00000001_000.png", "00000001_000.png"),
    ],
)
def test_normalize_id(raw: str, expected: str) -> None:
    assert normalize_id(raw) == expected


def test_normalize_many_agrees_with_normalize_id() -> None:
    cases = [
        ["CheXpert-v1.0-small/train/a.jpg", "CheXpert-v1.0-small/valid/b.jpg"],
        ["x/CheXpert-v1.0/CheXpert-v1.0/a", "x/CheXpert-v1.0/b"],
        ["CHEXPERT-V1.0-small/a", "z/chexpert-v1.0/b"],
        ["./a", "b"], [" a", "b "], ["a", "b\t"], ["a b", "c"], ["a\\b", "c//d"],
        ["a/./b", "../c"], ["plain/a.png", "plain/b.png"],
    ]
    for c in cases:
        assert normalize_many(c) == [normalize_id(p) for p in c], c


# ------------------------------------------------------------------ errors


def test_bad_value_names_column_value_and_row(tmp_path: Path) -> None:
    p = write(tmp_path, "labels.csv", "path,Edema,Cardiomegaly\na,1,0\nb,0,1\nc,maybe,0\n")
    with pytest.raises(MavlError) as err:
        read_labels(p)
    msg = str(err.value)
    assert "labels.csv" in msg and "'Edema'" in msg and "'maybe'" in msg and "row 3" in msg
    p2 = write(tmp_path, "num.csv", "path,Edema\na,1\nb,2\n")
    with pytest.raises(MavlError, match=r"num\.csv.*'Edema'.*'2'.*row 2"):
        read_labels(p2)


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("empty.csv", "", "empty"),
        ("header_only.csv", "path,A\n", "no rows"),
        ("blob.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a CSV"),
        ("nopath.csv", "name,A\nx,1\n", "no image path column.*'name', 'A'"),
        ("nolabels.csv", "path,Age,Sex\nx,3,F\n", "no label columns"),
        ("dupes.csv", "path,A\n./x.png,1\ny.png,0\nx.png,1\n", "more than once"),
        ("ragged.csv", 'path,A\nx,1\n"y,0\n', "not a readable CSV|no rows|value"),
    ],
)
def test_file_errors_name_the_file(tmp_path: Path, name: str, content, pattern: str) -> None:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    with pytest.raises(MavlError, match=pattern) as err:
        read_labels(p)
    assert name in str(err.value)


def test_missing_file_directory_and_policy(tmp_path: Path, chex: Path) -> None:
    with pytest.raises(MavlError, match=r"does not exist") as err:
        read_labels(tmp_path / "absent.csv")
    assert "absent.csv" in str(err.value)
    with pytest.raises(MavlError, match="directory"):
        read_labels(tmp_path)
    with pytest.raises(MavlError, match=r"'maybe'.*train\.csv.*ones, zeros, ignore"):
        read_labels(chex, uncertain="maybe")
    with pytest.raises(MavlError, match=r"train\.csv.*'nope'"):
        read_labels(chex, path_column="nope")
    with pytest.raises(MavlError, match=r"'Fracture'.*train\.csv"):
        read_labels(chex, labels=["Edema", "Fracture"])


def test_label_table_is_plain_dataclass() -> None:
    t = LabelTable(ids=["a"], names=["A"], y=np.ones((1, 1), np.float32),
                   mask=np.ones((1, 1), bool), paths=["a"], groups=None, source="generic")
    assert t.select(["A"]).names == ["A"]
    assert len(CHEXPERT_LABELS) == 14 and len(NIH_LABELS) == 14


# ------------------------------------------------------------------ real files (optional)


def _shared_labels() -> Path | None:
    root = os.environ.get("MAVL_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    d = base / "labels"
    return d if d.is_dir() else None


@pytest.mark.skipif(_shared_labels() is None, reason="shared label files not available")
def test_real_label_files() -> None:
    d = _shared_labels()
    chex_file = d / "chexpert_train.csv.gz"
    nih_file = d / "nih_data_entry_2017_v2020.csv.gz"
    if not chex_file.exists() or not nih_file.exists():
        pytest.skip("real label files not present")

    c = read_labels(chex_file, uncertain="ignore")
    assert len(c.ids) == 223_414 and c.names == list(CHEXPERT_LABELS) and c.source == "chexpert"
    assert c.ids[0] == "train/patient00001/study1/view1_frontal.jpg"
    assert c.groups[0] == "patient00001" and c.groups[1] == "patient00002"
    row0 = dict(zip(c.names, c.y[0]))
    assert row0["No Finding"] == 1 and row0["Support Devices"] == 1 and row0["Pneumothorax"] == 0
    k = c.names.index("Cardiomegaly")
    assert not c.mask[1, k]  # row 2 of the file has Cardiomegaly -1.0 (uncertain)
    assert read_labels(chex_file, uncertain="ones").y[1, k] == 1

    n = read_labels(nih_file)
    assert len(n.ids) == 112_120 and n.names == list(NIH_LABELS) and n.source == "nih"
    assert n.ids[1] == "00000001_001.png" and n.groups[1] == "1"
    assert n.y[1, n.names.index("Emphysema")] == 1 and n.y[1].sum() == 2
    # published NIH ChestX-ray14 totals
    assert int(n.y[:, n.names.index("Hernia")].sum()) == 227
    assert int(n.y[:, n.names.index("Effusion")].sum()) == 13_317
