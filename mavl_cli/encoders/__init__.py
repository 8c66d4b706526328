"""Encoder registry: one ``FAMILY:ID`` spec for every image and text encoder.

Families (one small module each, imported only when used, so this package
stays torch-free at import time):

- ``timm`` (default when there is no prefix): :mod:`mavl_cli.encoders.timm`
- ``hf`` (transformers vision and BERT-style text): :mod:`mavl_cli.encoders.hf`
- ``open_clip`` (aligned image + text towers): :mod:`mavl_cli.encoders.open_clip`
- ``xrv`` (torchxrayvision CXR CNNs): :mod:`mavl_cli.encoders.xrv`

Each family module declares ``FAMILY``, ``HAS_TEXT``, ``load_image(spec) ->
ImageEncoder`` (see :mod:`mavl_cli.encoders.base` for the object: pooled
``forward``, ``spatial`` map ``[B, C, h, w]``, ``preprocessing``, ``dim``,
``poolings``) and, for text, ``load_text(spec)``. Its preprocessing comes from
the family's own configuration and is recorded as a JSON dict (``kind`` names
the family) so a file rebuilds it exactly.
"""

from __future__ import annotations

import importlib
from typing import Any

from mavl_cli.core.errors import MavlError
from mavl_cli.encoders.spec import FAMILIES, EncoderSpec, extra_missing

__all__ = ["as_spec", "build_image_encoder", "encoder_from_meta", "family_module"]

_MODULES = {"timm": "timm", "hf": "hf", "open_clip": "open_clip", "xrv": "xrv"}
_LIBRARIES = {"timm": "timm", "hf": "transformers", "open_clip": "open_clip", "xrv": "torchxrayvision"}


def family_module(family: str) -> Any:
    """The module implementing ``family`` (a clear error when its library is missing)."""
    if family not in _MODULES:
        raise MavlError(f"unknown encoder family {family!r}; use one of {', '.join(FAMILIES)}")
    try:
        importlib.import_module(_LIBRARIES[family])
    except ImportError:
        raise extra_missing(family) from None
    try:
        return importlib.import_module(f"mavl_cli.encoders.{_MODULES[family]}")
    except ModuleNotFoundError as exc:
        if exc.name == f"mavl_cli.encoders.{_MODULES[family]}":
            raise MavlError(f"the {family} encoder family is not available in this version of mavl") from None
        raise


def as_spec(spec: EncoderSpec | str, **kw: Any) -> EncoderSpec:
    return spec if isinstance(spec, EncoderSpec) else EncoderSpec.parse(spec, **kw)


def build_image_encoder(spec: EncoderSpec | str, **kw: Any) -> Any:
    """An :class:`mavl_cli.encoders.base.ImageEncoder` (eval mode, CPU) for ``spec``."""
    spec = as_spec(spec, **kw)
    return family_module(spec.family).load_image(spec)


def encoder_from_meta(meta: dict[str, Any], weights: str | None = None) -> Any:
    """Rebuild the image encoder recorded in a file's metadata (``weights`` overrides its path).

    The recorded preprocessing is kept: the encoder runs exactly as when the
    file was made, even if a library's defaults changed since.
    """
    spec = EncoderSpec.from_meta(meta, weights)
    enc = build_image_encoder(spec)
    rec = meta.get("preprocessing")
    if isinstance(rec, dict) and rec.get("input_size"):
        enc.preprocessing = {"kind": "timm", **rec} if "kind" not in rec else rec
    return enc
