"""The safetensors file contract: round trips, kinds, versions, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from mavl_cli.core.errors import MavlError
from mavl_cli.io.mavlfile import (
    FORMAT_VERSION,
    encode_metadata,
    loads,
    read_file,
    to_bytes,
    write_file,
)


def _emb(n=3, d=4):
    return {"features": np.arange(n * d, dtype=np.float32).reshape(n, d)}, {"ids": [f"img{i}.png" for i in range(n)]}


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    t, meta = _emb()
    meta["backbone"] = "vit_tiny"
    write_file(tmp_path / "e.st", "image-embeddings", t, dict(meta))
    f = read_file(tmp_path / "e.st", expect="image-embeddings")
    np.testing.assert_array_equal(f.tensors["features"], t["features"])
    assert f.ids() == meta["ids"] and f.meta["backbone"] == "vit_tiny"
    assert f.meta["mavl_kind"] == "image-embeddings" and f.meta["mavl_format"] == str(FORMAT_VERSION)


def test_serialisation_is_deterministic():
    t, meta = _emb()
    assert to_bytes("image-embeddings", t, dict(meta, command="x")) == to_bytes(
        "image-embeddings", t, dict(meta, command="x"))


def test_wrong_kind_is_refused_with_a_sentence(tmp_path):
    t, meta = _emb()
    write_file(tmp_path / "e.st", "image-embeddings", t, meta)
    with pytest.raises(MavlError, match="image embeddings.*text embeddings.*expected"):
        read_file(tmp_path / "e.st", expect="text-embeddings")


def test_newer_format_is_refused(tmp_path):
    from safetensors.numpy import save

    t, meta = _emb()
    raw = encode_metadata("image-embeddings", dict(meta))
    raw["mavl_format"] = "99"
    (tmp_path / "new.st").write_bytes(save(t, metadata=raw))
    with pytest.raises(MavlError, match="newer mavl"):
        read_file(tmp_path / "new.st")


def test_nan_and_id_mismatch_are_refused(tmp_path):
    t, meta = _emb()
    t["features"][1, 2] = np.nan
    write_file(tmp_path / "nan.st", "image-embeddings", t, meta)
    with pytest.raises(MavlError, match="NaN or Inf"):
        read_file(tmp_path / "nan.st")
    t, meta = _emb()
    meta["ids"] = meta["ids"][:2]
    write_file(tmp_path / "ids.st", "image-embeddings", t, meta)
    with pytest.raises(MavlError, match="ids"):
        read_file(tmp_path / "ids.st")


def test_truncated_file_is_refused(tmp_path):
    t, meta = _emb()
    data = to_bytes("image-embeddings", t, meta)
    for cut in (0, 4, 12, len(data) // 2, len(data) - 1):
        with pytest.raises(MavlError):
            loads(data[:cut], "cut.st")


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(MavlError, match="not one written by mavl"):
        read_file(tmp_path / "plain.safetensors")


def test_atomic_write_keeps_old_file_when_folder_missing(tmp_path):
    t, meta = _emb()
    with pytest.raises(MavlError, match="does not exist"):
        write_file(tmp_path / "nope" / "e.st", "image-embeddings", t, meta)
    assert not (tmp_path / "nope").exists()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    t, meta = _emb()
    write_file(tmp_path / "e.st", "image-embeddings", t, meta)
    write_file(tmp_path / "e.st", "image-embeddings", t, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["e.st"]


