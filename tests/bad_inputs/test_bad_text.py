"""Bad inputs, what commands show: names, labels and cells from files, as plain escaped text."""

from __future__ import annotations

from tests.bad_inputs.catalogue import E
from tests.bad_inputs.forge import (
    CONTROL,
    contract_meta,
    one_error,
    rewrite_header,
    set_meta,
)
from tests.conftest import run_cli


def test_i15_18_rich_markup_in_names_is_plain_text(bad, tmp_path) -> None:
    """Paths and labels with rich markup (`a[/b].st`, `Cardiomegaly[/]`, `[link=...]`) are shown as they are:
    no MarkupError, no live hyperlink even with colour forced, and the output is written."""
    import shutil

    labels = contract_meta(bad["text"])["labels"]
    forged = ["Cardiomegaly[/]", "[link=https://example.com/x]click[/link]", "[bold red]loud", *labels[3:]]
    for folder in ("a[", "o["):  # `a[/b].st` is the file `b].st` in the folder `a[`
        (tmp_path / folder).mkdir()
    f = tmp_path / "a[/b].st"
    f.write_bytes(rewrite_header(bad["text"].read_bytes(), set_meta("labels", forged)))
    r = run_cli(["info", f])
    assert r.exit_code == 0, r.stderr
    assert "a[/b].st" in r.stdout and "Cardiomegaly[/]" in r.stdout and "[link=https://example.com/x]" in r.stdout
    r = run_cli(["info", f], env={"FORCE_COLOR": "1", "TERM": "xterm-256color"})
    assert r.exit_code == 0, r.stderr
    assert "\x1b]8;" not in r.stdout and "example.com" in r.stdout  # no OSC 8 hyperlink, the text is there
    img = tmp_path / "a[/b].png"
    shutil.copy(bad["img0"], img)
    out = tmp_path / "o[/b].st"
    r = run_cli(["embed-images", img, *E, "--weights", bad["vit"], "-o", out])
    assert r.exit_code == 0, r.stderr
    assert out.exists() and "o[/b].st" in r.stdout


def test_i15_19_file_names_that_are_not_utf8(bad, tmp_path) -> None:
    """Non-UTF-8 bytes in a file name: embedded fine, and shown escaped (\\xe9) in an error line."""
    import os
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")
    shutil.copy(bad["img0"], folder / name)
    out = tmp_path / "out.st"
    r = run_cli(["embed-images", folder, *E, "--weights", bad["vit"], "-o", out])
    assert r.exit_code == 0, r.stderr
    from mavl_cli.io.mavlfile import read_file

    assert read_file(out).ids() == [name]
    (folder / name).write_bytes(b"")
    line = one_error(run_cli(["embed-images", folder / name, *E, "--weights", bad["vit"], "-o", tmp_path / "o2.st"]))
    assert "caf\\xe9.png" in line


def test_i15_22_control_characters_in_labels_are_shown_escaped(bad, tmp_path) -> None:
    """ESC]0;title / ESC[2J in label names or metadata reach the terminal escaped, in tables too."""
    labels = contract_meta(bad["text"])["labels"]
    f = tmp_path / "esc.st"
    edit = lambda h: (set_meta("labels", ["Edema\x1b]0;pwned\x07", "x\x1b[2Jy", *labels[2:]])(h),  # noqa: E731
                      h["__metadata__"].__setitem__("command", "mavl \x1b[31mred\nerror: fake"))
    f.write_bytes(rewrite_header(bad["text"].read_bytes(), edit))
    r = run_cli(["info", f])
    assert r.exit_code == 0, r.stderr
    assert not CONTROL.search(r.stdout) and "\x1b" not in r.stdout
    assert "pwned" in r.stdout and "mavl \\x1b[31mred\\nerror: fake" in r.stdout
    # a label name from a CSV header in the per-label table of `evaluate`
    import pandas as pd

    sc = contract_meta(bad["scores"])["labels"]
    names = ["Edema\x1b]0;pwned\x07", *sc[1:]]
    scores = tmp_path / "s.st"
    scores.write_bytes(rewrite_header(bad["scores"].read_bytes(), set_meta("labels", names)))
    labels_csv = tmp_path / "l.csv"
    pd.read_csv(bad["root"] / "labels.csv").rename(columns={sc[0]: names[0]}).to_csv(labels_csv, index=False)
    r = run_cli(["evaluate", "--scores", scores, "--labels", labels_csv])
    assert r.exit_code == 0, r.stderr
    assert "Edema\\x1b]0;pwned\\x07" in r.stdout and not CONTROL.search(r.stdout + r.stderr)


def test_i15_23_csv_cells_are_not_spreadsheet_formulas(bad, tmp_path) -> None:
    """Label names like =HYPERLINK(...), +cmd|' /C calc'!A0, @SUM(1+1) are written with a leading ' to CSVs."""
    import csv

    import pandas as pd

    evil = ['=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3"]
    sc = contract_meta(bad["scores"])["labels"]
    names = evil + sc[len(evil):]
    scores = tmp_path / "s.st"
    scores.write_bytes(rewrite_header(bad["scores"].read_bytes(), set_meta("labels", names)))
    df = pd.read_csv(bad["root"] / "labels.csv").rename(columns=dict(zip(sc, names)))  # all images scored
    labels = tmp_path / "l.csv"
    df.to_csv(labels, index=False)
    out = tmp_path / "r.csv"
    r = run_cli(["evaluate", "--scores", scores, "--labels", labels, "--csv", out])
    assert r.exit_code == 0, r.stderr
    cells = [c for row in csv.reader(out.open()) for c in row]
    for name in evil:
        assert "'" + name in cells and name not in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "@") or (c[:1] == "-" and not c.replace(".", "").lstrip("-").isdigit() and c != "")]


def test_i15_32_a_byte_order_mark_is_not_part_of_a_label(bad, tiny_bert, tmp_path) -> None:
    """A UTF-8 BOM at the start of labels.txt is not part of the first label's name."""
    from mavl_cli.io.mavlfile import read_file

    txt = tmp_path / "labels.txt"
    txt.write_bytes(b"\xef\xbb\xbf" + bad["labels_txt"].read_bytes())
    r = run_cli(["embed-text", txt, "--text-model", tiny_bert, "-o", tmp_path / "t.st"])
    assert r.exit_code == 0, r.stderr
    assert read_file(tmp_path / "t.st").labels() == [ln for ln in bad["labels_txt"].read_text().splitlines() if ln]


def test_s3_07_open_clip_logs_nothing_beside_the_error_line(bad, tmp_path) -> None:
    """open_clip logs "No pretrained weights loaded" on the root logger when mavl builds an architecture empty to
    load a weights file itself; in a real process (no pytest log capture) that made two stderr lines."""
    import subprocess
    import sys

    from tests.models import test_embed as te

    argv = ["zero-shot", "--encoder", f"open_clip:{bad['clip_cfg']}", "--weights", bad["foreign"],
            "--descriptions", bad["labels_txt"], "-o", tmp_path / "z.st"]
    r = subprocess.run([sys.executable, "-m", "mavl_cli", *map(str, argv)], cwd=te.REPO, capture_output=True, text=True,
                       env={**__import__("os").environ, "COLUMNS": "200"}, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and bad["foreign"].name in lines[0] and "do not fit" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []
