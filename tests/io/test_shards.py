"""`--shard K/N` and `mavl merge`: parts of a run join into the unsharded file byte for byte,
and parts that do not belong together are refused with one clear line and no output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mavl_cli.core.errors import MavlError
from mavl_cli.io.mavlfile import MavlFile, read_file
from mavl_cli.io.shards import Shard, parse_shard, shard_range, unsharded_command

VIT = "vit_tiny_patch16_224"


def _run_in(cli, folder: Path, argv: list, monkeypatch) -> None:
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    r = cli([str(a) for a in argv])
    assert r.exit_code == 0, r.stderr


def test_shard_ranges_tile_the_list_in_whole_batches():
    for total in (0, 1, 7, 16, 17, 100):
        for bs in (1, 4, 16):
            for n in (1, 2, 3, 8):
                ranges = [shard_range(total, bs, Shard(k, n)) for k in range(n)]
                assert ranges[0][0] == 0 and ranges[-1][1] == total
                assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
                assert all(lo % bs == 0 for lo, _ in ranges)
                sizes = [hi - lo for lo, hi in ranges]
                assert max(sizes) - min(sizes) <= bs  # balanced to one batch
    assert parse_shard("2/8") == Shard(2, 8) and parse_shard(None) is None
    for bad in ("8/8", "1/0", "-1/4", "a/b", "3"):
        with pytest.raises(MavlError):
            parse_shard(bad)


def test_unsharded_command_drops_the_shard_and_marks_the_output():
    c = unsharded_command(["embed-images", "x", "--shard", "1/4", "-o", "p1.st", "--batch-size", "4"])
    assert c == {"args": ["embed-images", "x", "-o", "p1.st", "--batch-size", "4"], "output_at": 3}
    c = unsharded_command(["predict", "x", "--shard=0/2", "--out=s.st"])
    assert c == {"args": ["predict", "x", "--out", "s.st"], "output_at": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vit, phantom_set):
    """One unsharded embed-images run and its three shards (run from other folders, same relative names)."""
    from tests.conftest import run_cli

    base = tmp_path_factory.mktemp("shards")
    labels = phantom_set.splits["train"]
    # one forward thread pinned for all runs: features depend on the thread count in the last bits
    args = ["embed-images", phantom_set.root, "--labels", labels, "--backbone", VIT, "--weights", tiny_vit, "--batch-size", "4",
            "--threads", "1"]
    import os

    cwd = os.getcwd()
    try:
        (base / "one").mkdir()
        os.chdir(base / "one")
        r = run_cli([str(a) for a in [*args, "-o", "all.st"]])
        assert r.exit_code == 0, r.stderr
        (base / "parts").mkdir()
        os.chdir(base / "parts")
        for k in range(3):
            r = run_cli([str(a) for a in [*args, "--shard", f"{k}/3", "-o", f"part_{k}.st"]])
            assert r.exit_code == 0, r.stderr
        r = run_cli([str(a) for a in [*args, "--shard", "0/2", "-o", "half_0.st"]])
        assert r.exit_code == 0, r.stderr
        r = run_cli([str(a) for a in [*args, "--precision", "int8", "--shard", "1/3", "-o", "int8_1.st"]])
        assert r.exit_code == 0, r.stderr
    finally:
        os.chdir(cwd)
    return base


def test_parts_cover_the_list_and_merge_byte_identically(cli, runs, monkeypatch):
    parts = [runs / "parts" / f"part_{k}.st" for k in range(3)]
    files = [read_file(p) for p in parts]
    whole = read_file(runs / "one" / "all.st")
    sizes = [len(f.ids()) for f in files]
    assert sum(sizes) == len(whole.ids()) and all(s > 0 for s in sizes)
    assert [i for f in files for i in f.ids()] == whole.ids()
    assert all(f.meta["shard"]["fingerprint"] == whole.meta["inputs_fingerprint"] for f in files)
    # parts given in any order
    _run_in(cli, runs / "merged", ["merge", parts[2], parts[0], parts[1], "-o", "all.st"], monkeypatch)
    assert (runs / "merged" / "all.st").read_bytes() == (runs / "one" / "all.st").read_bytes()


def test_merge_refuses_parts_that_do_not_belong_together(cli, runs, tmp_path):
    p = runs / "parts"
    out = tmp_path / "out.st"
    cases = {
        "missing": ([p / "part_0.st", p / "part_2.st"], "shard(s) 1/3 missing"),
        "duplicated": ([p / "part_0.st", p / "part_1.st", p / "part_1.st", p / "part_2.st"], "are both shard 1/3"),
        "other split": ([p / "part_0.st", p / "half_0.st"], "parts of different runs"),
        "precision": ([p / "part_0.st", p / "int8_1.st", p / "part_2.st"], "precision differs"),
        "not a shard": ([runs / "one" / "all.st", p / "part_0.st"], "not a shard"),
    }
    for name, (args, message) in cases.items():
        r = cli(["merge", *map(str, args), "-o", str(out)])
        assert r.exit_code == 2, name
        assert message in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert not out.exists(), name


def test_merge_refuses_an_id_twice_and_a_damaged_part(runs):
    from mavl_cli.io.shards import merge_parts

    files = [read_file(runs / "parts" / f"part_{k}.st") for k in range(3)]
    dup = MavlFile(files[1].kind, dict(files[1].tensors), dict(files[1].meta), "dup.st")
    dup.meta["ids"] = [files[0].ids()[0], *files[1].ids()[1:]]
    with pytest.raises(MavlError, match="is in both"):
        merge_parts([files[0], dup, files[2]])
    cut = MavlFile(files[1].kind, {"features": files[1].tensors["features"][1:]},
                            {**files[1].meta, "ids": files[1].ids()[1:]}, "cut.st")
    with pytest.raises(MavlError, match="damaged"):
        merge_parts([files[0], cut, files[2]])


def test_more_shards_than_batches_give_empty_parts_that_still_merge(cli, tiny_vit, phantom_set, tmp_path, monkeypatch):
    args = ["embed-images", phantom_set.root, "--labels", phantom_set.splits["val"], "--backbone", VIT, "--weights", tiny_vit,
            "--batch-size", "64", "--threads", "1"]
    _run_in(cli, tmp_path / "a", [*args, "-o", "all.st"], monkeypatch)
    for k in range(2):
        _run_in(cli, tmp_path / "b", [*args, "--shard", f"{k}/2", "-o", f"p{k}.st"], monkeypatch)
    assert read_file(tmp_path / "b" / "p0.st").tensors["features"].shape[0] == 0
    _run_in(cli, tmp_path / "c", ["merge", tmp_path / "b" / "p0.st", tmp_path / "b" / "p1.st", "-o", "all.st"], monkeypatch)
    assert (tmp_path / "c" / "all.st").read_bytes() == (tmp_path / "a" / "all.st").read_bytes()


def test_predict_score_files_merge_byte_identically(cli, chain, tmp_path, monkeypatch):
    d, ps = chain["dir"], chain["phantoms"]
    images = sorted((ps.root / "images").glob("*.png"))[:40]
    args = ["predict", *images, "--model", d / "tuned.st", "--json"]
    _run_in(cli, tmp_path / "a", [*args, "--out", "scores.st"], monkeypatch)
    for k in range(2):
        _run_in(cli, tmp_path / "b", [*args, "--shard", f"{k}/2", "--out", f"s{k}.st"], monkeypatch)
    _run_in(cli, tmp_path / "c", ["merge", tmp_path / "b" / "s1.st", tmp_path / "b" / "s0.st", "-o", "scores.st"], monkeypatch)
    assert (tmp_path / "c" / "scores.st").read_bytes() == (tmp_path / "a" / "scores.st").read_bytes()
    merged = read_file(tmp_path / "c" / "scores.st")
    assert len(merged.ids()) == 40 and np.isfinite(merged.tensors["scores"]).all()
