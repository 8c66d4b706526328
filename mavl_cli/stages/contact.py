"""A contact sheet: a few radiographs with their labels and the model's top findings.

People judge a classifier faster by looking at cases than at tables.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mavl_cli.datasets.reader import read_labels
from mavl_cli.io.files import atomic_write_bytes
from mavl_cli.stages.predict import predict_stage


def contact_sheet(model_path: str | Path, labels_csv: str | Path, root: str | Path, out: str | Path, n: int = 8, tile: int = 256) -> Path:
    """Predict ``n`` images listed in ``labels_csv`` and draw them in a grid with truth vs prediction."""

    table = read_labels(labels_csv, uncertain="ones")
    k = min(n, len(table.ids))
    paths = [str(Path(root) / p) for p in table.paths[:k]]
    pred, _ = predict_stage(paths, str(model_path))
    cols = 4
    rows = (k + cols - 1) // cols
    text_h = 96
    sheet = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:
        font = ImageFont.load_default()
    for i in range(k):
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        img = Image.open(paths[i]).convert("L").resize((tile, tile))
        sheet.paste(img.convert("RGB"), (x, y))
        truth = [table.names[j] for j in range(len(table.names)) if table.y[i, j] > 0 and table.mask[i, j]]
        order = pred.scores[i].argsort()[::-1]
        top = [(pred.names[j], float(pred.scores[i, j]), bool(pred.scores[i, j] >= pred.thresholds[j])) for j in order[:3]]
        lines = [("truth: " + (", ".join(truth) or "none"), (0, 0, 0))]
        for name, p, pos in top:
            hit = name in truth
            colour = (0, 130, 0) if pos == hit else (200, 0, 0)
            lines.append((f"{'+' if pos else '-'} {name} {p:.2f}", colour))
        for li, (txt, colour) in enumerate(lines):
            draw.text((x + 4, y + tile + 4 + li * 17), txt[:42], fill=colour, font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return Path(out)
