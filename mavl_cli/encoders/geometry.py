"""Crop geometry: where a preprocessed input sits in the original film (resize, centre crop, padding),
so maps and boxes can be placed back on the film exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CropGeometry:
    """How an original film became the model's input: rescale the whole frame, then cut a box from it.

    Every family's eval preprocessing is this shape (see :func:`crop_geometry`):
    the frame is rescaled to ``resized_w x resized_h`` (shortest-edge, longest-edge
    or squash rules all rescale the whole frame) and the box ``crop_w x crop_h``
    whose top-left corner is ``(left, top)`` in the rescaled frame is the input;
    a negative offset means the frame was padded. Crop-then-resize recipes
    (torchxrayvision's centre square, then resize) are the same map with
    fractional sizes and offsets. ``rule`` says in words which recipe it was.
    """

    orig_w: int
    orig_h: int
    resized_w: float
    resized_h: float
    left: float
    top: float
    crop_w: int
    crop_h: int
    rule: str = ""

    def to_crop(self, x: float, y: float) -> tuple[float, float]:
        """An original pixel centre -> continuous input-crop pixel coordinates (pixel centres at .5)."""
        return ((x + 0.5) * self.resized_w / self.orig_w - self.left,
                (y + 0.5) * self.resized_h / self.orig_h - self.top)

    def to_meta(self) -> dict[str, Any]:
        """The geometry as JSON (recorded in maps files)."""
        return {"rule": self.rule, "resized": [round(float(self.resized_w), 4), round(float(self.resized_h), 4)],
                "box": [round(float(self.left), 4), round(float(self.top), 4), int(self.crop_w), int(self.crop_h)]}


def centre_offset(size: int, crop: int, rounding: str = "round", pad: str = "floor") -> int:
    """Offset of a centred ``crop`` in ``size`` pixels (negative: the frame is padded).

    ``rounding`` for a crop inside the frame: ``round`` (torchvision's CenterCrop),
    ``floor`` (transformers' image processors); ``pad`` for a crop larger than the
    frame: how the padding before the frame is rounded (``floor`` torchvision,
    ``ceil`` transformers' PIL backend).
    """
    if crop > size:
        before = (crop - size) // 2 if pad == "floor" else -((size - crop) // 2)
        return -int(before)
    return int(round((size - crop) / 2.0)) if rounding == "round" else (size - crop) // 2
