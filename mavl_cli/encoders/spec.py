"""Encoder specs: ``FAMILY:ID`` parsed once, torch-free (the CLI imports this module).

``FAMILY`` is one of :data:`FAMILIES` (``timm`` when there is no prefix, so
``vit_base_patch16_224`` and ``hf-hub:timm/...`` keep meaning what they always
meant); ``ID`` is a hub id or a local path (folder or file). The defaults
live in :mod:`mavl_cli.core.defaults`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mavl_cli.core.errors import MavlError

FAMILIES = ("timm", "hf", "open_clip", "xrv")
ALIASES = {
    "timm": "timm",
    "hf": "hf", "huggingface": "hf", "transformers": "hf",
    "open_clip": "open_clip", "openclip": "open_clip", "open-clip": "open_clip",
    "xrv": "xrv", "torchxrayvision": "xrv",
}
# prefixes that belong to an ID, not a family (timm's and open_clip's own hub schemes)
ID_SCHEMES = ("hf-hub", "local-dir", "file")
EXTRAS = {"open_clip": ("open_clip", "openclip"), "xrv": ("torchxrayvision", "xrv")}



def split_spec(text: str) -> tuple[str, str]:
    """``"hf:microsoft/rad-dino"`` -> ``("hf", "microsoft/rad-dino")``; no known prefix -> timm."""
    text = (text or "").strip()
    if not text:
        raise MavlError("empty encoder name; give FAMILY:ID, e.g. timm:vit_base_patch16_224 or hf:microsoft/rad-dino")
    head, sep, rest = text.partition(":")
    if not sep:
        return "timm", text
    key = head.lower()
    if key in ALIASES:
        if not rest.strip():
            raise MavlError(f"{text!r}: nothing after {head}:; give {ALIASES[key]}:ID (a hub id or a local path)")
        return ALIASES[key], rest.strip()
    if key in ID_SCHEMES or (len(head) == 1 and head.isalpha()) or Path(text).exists():  # hf-hub:..., C:\...
        return "timm", text
    raise MavlError(f"unknown encoder family {head!r} in {text!r}; use one of {', '.join(FAMILIES)} (e.g. hf:{rest or 'ID'})")


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder exactly (recorded in every file it makes).

    ``weights``: None = the family's own pretrained weights (hub or cache); a
    local file or folder otherwise. ``pretrained=False`` = random init (tests,
    ablations). ``pooling``: None = the family's default. ``options``: extra
    constructor arguments (timm ``--model-args``).
    """

    family: str
    id: str
    weights: str | None = None
    pretrained: bool = True
    pooling: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False

    @classmethod
    def parse(cls, text: str, weights: str | Path | None = None, *, pretrained: bool = True,
              pooling: str | None = None, options: dict[str, Any] | None = None,
              trust_remote_code: bool = False) -> "EncoderSpec":
        family, ident = split_spec(text)
        return cls(family, ident, str(weights) if weights is not None else None, pretrained, pooling or None,
                   dict(options or {}), trust_remote_code)

    @property
    def name(self) -> str:
        """Canonical ``FAMILY:ID`` (timm ids stay bare, as in files written before families existed)."""
        return self.id if self.family == "timm" else f"{self.family}:{self.id}"

    def with_(self, **changes: Any) -> "EncoderSpec":
        return replace(self, **changes)

    def to_meta(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.name
        return d

    @classmethod
    def from_meta(cls, meta: dict[str, Any], weights: str | None = None) -> "EncoderSpec":
        """Rebuild the spec a file was made with (old files: a bare timm ``backbone``)."""
        enc = meta.get("encoder")
        if isinstance(enc, dict) and enc.get("family"):
            w = weights if weights is not None else enc.get("weights")
            return cls(enc["family"], enc["id"], w, bool(enc.get("pretrained", True)), enc.get("pooling"),
                       dict(enc.get("options") or {}), bool(enc.get("trust_remote_code", False)))
        name = meta.get("backbone")
        if not name:
            raise MavlError("the file records no image encoder (no 'encoder' or 'backbone' in its metadata)")
        w = weights if weights is not None else meta.get("backbone_weights")
        pretrained = True
        if w in ("hub", None):
            w = None
        elif w == "random":
            w, pretrained = None, False
        return cls.parse(name, w, pretrained=pretrained, options=meta.get("backbone_args") or {})


def extra_missing(family: str) -> MavlError:
    """The one line for a family whose library is not installed."""
    module, extra = EXTRAS.get(family, (family, family))
    return MavlError(f"the {family} encoder family needs {module}, which is not installed; run: pip install \"mavl[{extra}]\"")
