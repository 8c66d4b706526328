"""Fuzzing the readers of untrusted input: only MavlError may escape, and nothing hangs.

``contract.loads`` gets random bytes and valid mavl files with flipped bytes,
truncations and edited headers; ``labels.read_labels`` and
``descriptions.parse_descriptions`` get random text. Any other exception type
(or a run past the alarm) is a bug: the CLI would report it as an internal error.
"""

from __future__ import annotations

import json
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mavl_cli.core.errors import MavlError
from mavl_cli.io.mavlfile import KINDS, loads, to_bytes

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECONDS = 10  # per example; far beyond any honest parse of these small inputs


@contextmanager
def no_hang(seconds: int = SECONDS):
    def boom(*_):
        raise AssertionError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _fusion(f32, img: int, txt: int, dim: int) -> dict[str, np.ndarray]:
    """The fusion projectors' tensors (``fusion.img_proj.*``, ``fusion.txt_proj.*``, ``fusion.log_scale``)."""
    out = {"fusion.log_scale": f32(1)}
    for name, d in (("img_proj", img), ("txt_proj", txt)):
        out.update({f"fusion.{name}.0.weight": f32(dim, d), f"fusion.{name}.0.bias": f32(dim),
                    f"fusion.{name}.2.weight": f32(dim, dim), f"fusion.{name}.2.bias": f32(dim)})
    return out


def valid_files() -> dict[str, bytes]:
    """One small valid file of every kind (built in memory, no models needed)."""
    rng = np.random.default_rng(0)
    labels = ["Edema", "Cardiomegaly", "Pneumothorax"]
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "image-embeddings": to_bytes("image-embeddings", {"features": f32(4, 6)},
                                              {"ids": ["a.png", "b.png", "c.png", "d.png"], "backbone": "vit"}),
        "text-embeddings": to_bytes("text-embeddings", {"embeddings": f32(3, 2, 5), "mask": np.ones((3, 2), np.uint8)},
                                             {"labels": labels, "aspects": ["name", "definition"]}),
        "lrf-head": to_bytes("lrf-head", {"norm.weight": f32(6), "norm.bias": f32(6), "proj.weight": f32(4, 6),
                                                   "classifier.weight": f32(3, 4), "classifier.bias": f32(3)}, {"labels": labels}),
        "model": to_bytes("model", {"text.embeddings": f32(3, 1, 5), "text.mask": np.ones((3, 1), np.uint8),
                                             "thresholds": np.full(3, 0.5, np.float32), **_fusion(f32, img=6, txt=5, dim=4),
                                             "fusion.bias": f32(3), "fusion.aspect_logits": f32(3, 1)},
                                   {"labels": labels, "fusion": {"img_dim": 6, "txt_dim": 5, "dim": 4, "n_aspects": 1,
                                                                 "aggregate": "mean"}}),
        "scores": to_bytes("scores", {"scores": rng.random((2, 3)).astype(np.float32)},
                                    {"ids": ["a", "b"], "labels": labels}),
    }


VALID = valid_files()
KIND_NAMES = sorted(VALID)


def must_only_raise_mavl_error(data: bytes) -> None:
    with no_hang():
        try:
            f = loads(data, name="fuzz.st")
        except MavlError as exc:
            assert str(exc).startswith("fuzz.st"), str(exc)
            assert "\n" not in str(exc), "a user error must be one line"
            return
    # Accepted: it must really be a consistent mavl file.
    assert f.kind in KINDS
    for name, rank in KINDS[f.kind][2].items():
        assert f.tensors[name].ndim == rank


def test_valid_files_load() -> None:
    for kind, data in VALID.items():
        assert loads(data).kind == kind


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    must_only_raise_mavl_error(data)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_after_a_plausible_length(body: bytes) -> None:
    # A header length that fits, so the parser gets past the first check.
    must_only_raise_mavl_error(struct.pack("<Q", len(body)) + body)


@FUZZ
@given(st.sampled_from(KIND_NAMES), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=8))
def test_flipped_bytes(kind: str, flips: list[tuple[int, int]]) -> None:
    data = bytearray(VALID[kind])
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    must_only_raise_mavl_error(bytes(data))


@FUZZ
@given(st.sampled_from(KIND_NAMES), st.data())
def test_truncated(kind: str, draw) -> None:
    data = VALID[kind]
    cut = draw.draw(st.integers(0, len(data) - 1))
    must_only_raise_mavl_error(data[:cut])


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "X99", ""])


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@FUZZ
@given(st.sampled_from(KIND_NAMES), st.data())
def test_header_edits(kind: str, draw) -> None:
    """Plausible-looking headers that lie: shapes, dtypes, offsets and metadata values."""
    header, body = _split(VALID[kind])
    tensors = [k for k in header if k != "__metadata__"]
    meta = header["__metadata__"]
    for _ in range(draw.draw(st.integers(1, 4))):
        what = draw.draw(st.sampled_from(["shape", "dtype", "offsets", "meta", "drop", "kind", "format", "body"]))
        t = header.get(draw.draw(st.sampled_from(tensors)))
        if what == "shape" and isinstance(t, dict):
            t["shape"] = draw.draw(st.lists(st.integers(-2, 10**12), max_size=4) | JSONISH)
        elif what == "dtype" and isinstance(t, dict):
            t["dtype"] = draw.draw(DTYPES | JSONISH)
        elif what == "offsets" and isinstance(t, dict):
            t["data_offsets"] = draw.draw(st.lists(st.integers(-5, 10**9), max_size=3) | JSONISH)
        elif what == "meta":
            key = draw.draw(st.sampled_from(sorted(meta) + ["labels", "ids", "space", "fusion"]))
            meta[key] = draw.draw(st.text(max_size=30) | JSONISH.map(lambda v: json.dumps(v, allow_nan=True)))
        elif what == "drop" and header:
            header.pop(draw.draw(st.sampled_from(sorted(header))), None)
        elif what == "kind":
            meta["mavl_kind"] = draw.draw(st.sampled_from(KIND_NAMES + ["", "weights"]))
        elif what == "format":
            meta["mavl_format"] = draw.draw(st.sampled_from(["0", "1", "2", "-1", "1.5", "", "x", "99999999999999999999"]))
        elif what == "body":
            body = body[: draw.draw(st.integers(0, len(body)))]
    must_only_raise_mavl_error(_join(header, body))


@FUZZ
@given(st.sampled_from(KIND_NAMES), JSONISH)
def test_header_replaced(kind: str, value) -> None:
    header, body = _split(VALID[kind])
    must_only_raise_mavl_error(_join(value if not isinstance(value, dict) else {**header, **value}, body))
    must_only_raise_mavl_error(_join({"__metadata__": value}, body))


# ------------------------------------------------------------------ label CSVs and descriptions

CSV_CELLS = st.sampled_from(["Path", "path", "Image Index", "Finding Labels", "Patient", "Edema", "Cardiomegaly",
                             "No Finding", "1", "0", "-1", "1.0", "", " ", "nan", "yes", "a.png", "b/c.jpg", "x|y",
                             '"', '""', "\t", ";", "é", "\x00"]) | st.text(max_size=8)
CSV_TEXT = st.lists(st.lists(CSV_CELLS, max_size=6), max_size=8).map(
    lambda rows: "\n".join(",".join(r) for r in rows)
) | st.text(max_size=300)


@FUZZ
@given(CSV_TEXT, st.sampled_from(["zeros", "ones", "ignore"]), st.booleans())
def test_read_labels_random_csv(text: str, uncertain: str, as_bytes: bool) -> None:
    from mavl_cli.datasets.reader import read_labels

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "labels.csv"
        if as_bytes:
            p.write_bytes(text.encode("utf-8", "surrogatepass") if text else b"")
        else:
            p.write_text(text, encoding="utf-8", errors="surrogatepass")
        with no_hang():
            try:
                table = read_labels(p, uncertain=uncertain)
            except MavlError as exc:
                assert "\n" not in str(exc), str(exc)
                return
        assert table.y.shape == (len(table.ids), len(table.names))


@FUZZ
@given(st.binary(max_size=400))
def test_read_labels_random_bytes(data: bytes) -> None:
    from mavl_cli.datasets.reader import read_labels

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "labels.csv"
        p.write_bytes(data)
        with no_hang():
            try:
                read_labels(p)
            except MavlError:
                pass


@FUZZ
@given(st.text(max_size=200) | JSONISH.map(lambda v: json.dumps(v, allow_nan=True)))
def test_parse_descriptions_random(text: str) -> None:
    from mavl_cli.io.descriptions import parse_descriptions

    with no_hang():
        try:
            d = parse_descriptions(text, "d.json")
        except MavlError:
            return
    assert d.labels and len(d.texts) == len(d.labels)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_every_single_truncation_of_a_small_file(kind: str) -> None:
    """Exhaustive, not sampled: a file cut at any byte is refused."""
    data = VALID[kind]
    for cut in range(0, len(data), max(1, len(data) // 300)):
        with pytest.raises(MavlError):
            loads(data[:cut], name="cut.st")
