"""The image-encoder object every family returns (imports torch: load it lazily).

:class:`ImageEncoder` is an ``nn.Module``. Its input is the batch tensor that
:func:`mavl_cli.encoders.preprocess.normalize_batch` makes from the family's own
preprocessing (``encoder.preprocessing``, a JSON dict recorded in every file),
so ``encoder(normalize_batch(stack_batch([prepare_image(img, enc.preprocessing)]), enc.preprocessing))``
is the whole path from a decoded PIL image to a feature vector.

- ``forward(x) -> [B, dim]``: pooled features (what ``embed-images`` writes);
  the pooling is ``encoder.pooling``, one of ``encoder.poolings``.
- ``spatial(x) -> [B, C, h, w]``: the last spatial feature map, for heatmaps.
  CNNs: the last convolutional stage (after its final norm/activation, the
  map the family's own global pooling reads). ViT/DINOv2: the patch tokens
  after the final norm, prefix tokens (CLS, registers) dropped, reshaped to
  the patch grid. ``C`` equals ``dim`` for every family whose pooled feature
  is a pooling of that map (timm, hf, xrv); for open_clip ``C`` is the
  tower's width before the projection (``spatial_dim``). ``spatial`` keeps
  autograd, so Grad-CAM style methods can differentiate through it; call
  :meth:`pool_spatial` on its output to get ``forward``'s features when the
  pooling reads only that map (``spatial_pools`` is then True: a mean, a
  mean then a norm, an attention pool). :meth:`local_features` takes each
  location into the pooled feature space (heatmaps' similarity);
  :meth:`cam_block` names the block whose input tokens Grad-CAM uses when
  the pooling is a class token.
- ``geometry(w, h)``: how an image of that size maps into the input
  (resize, crop box), declared from ``preprocessing`` by the family.
- ``has_text``: whether an aligned text tower comes with it (open_clip);
  ``text_encoder()`` then returns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mavl_cli.core.errors import MavlError
from mavl_cli.encoders.preprocess import input_geometry
from mavl_cli.encoders.spec import EncoderSpec


@dataclass
class BackboneInfo:
    """What downstream stages need to reproduce the image side (kept for older callers)."""

    name: str
    weights: str  # "hub", "random" or the local path as given
    dim: int
    data_config: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    spec: EncoderSpec | None = None
    pooling: str | None = None

    def to_meta(self) -> dict[str, Any]:
        meta = {
            "backbone": self.name,
            "backbone_weights": self.weights,
            "backbone_args": self.model_args,
            "preprocessing": self.data_config,
            "feature_dim": self.dim,
        }
        if self.spec is not None:
            meta["encoder"] = {**self.spec.to_meta(), "pooling": self.pooling}
            meta["encoder_family"] = self.spec.family
        return meta


class ImageEncoder(torch.nn.Module):
    """A pretrained image network with its family's preprocessing, pooling and spatial map."""

    family = "?"
    poolings: tuple[str, ...] = ("default",)
    has_text = False
    spatial_pools = True

    def __init__(self, spec: EncoderSpec, net: torch.nn.Module, dim: int, preprocessing: dict[str, Any],
                 pooling: str | None = None, name: str | None = None, weights_source: str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.net = net
        self.dim = int(dim)
        self.preprocessing = preprocessing
        pooling = pooling or self.poolings[0]
        if pooling not in self.poolings:
            raise MavlError(f"{spec.name}: unknown --pooling {pooling!r}; this encoder offers {', '.join(self.poolings)}")
        self.pooling = pooling
        self.name = name or spec.name
        if weights_source is None:
            weights_source = spec.weights if spec.weights else ("hub" if spec.pretrained else "random")
        self.weights_source = weights_source
        self.eval()

    # -- what families implement
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def spatial(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pool_spatial(self, fmap: torch.Tensor) -> torch.Tensor:
        """``forward``'s features recomputed from the ``spatial`` map (exact when ``spatial_pools``).

        The default is the mean over the map of :meth:`local_features`."""
        return self.local_features(fmap).mean(dim=(2, 3))

    def local_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """The ``spatial`` map taken per location into the pooled feature space, ``[B, dim, h, w]``
        (what the pooled path applies after pooling, applied to each location: a projection, a norm).
        The default is the map itself (its channels are the pooled features')."""
        return fmap

    def cam_block(self) -> torch.nn.Module | None:
        """For token models whose pooled feature does not read the final patch tokens (class-token
        pooling): the last block, whose input tokens are the Grad-CAM activation. None otherwise."""
        return None

    def text_encoder(self) -> Any:
        raise MavlError(f"{self.spec.name}: this encoder has no aligned text tower")

    # -- shared
    def geometry(self, width: int, height: int) -> Any:
        """How a ``width x height`` image maps into this encoder's input (a
        :class:`mavl_cli.explain.maps.CropGeometry`), declared by the family from the same
        preprocessing recipe it runs (``self.preprocessing``)."""

        return input_geometry(self.preprocessing, (width, height))

    @property
    def input_size(self) -> tuple[int, int, int]:
        c, h, w = self.preprocessing["input_size"]
        return int(c), int(h), int(w)

    @property
    def info(self) -> BackboneInfo:
        return BackboneInfo(self.name, self.weights_source, self.dim, self.preprocessing, dict(self.spec.options),
                            self.spec, self.pooling)

    def to_meta(self) -> dict[str, Any]:
        return self.info.to_meta()


def grid_from_tokens(tokens: torch.Tensor, height: int, width: int, patch: int | None = None) -> tuple[int, int, int]:
    """(prefix tokens, grid h, grid w) for ``[B, T, D]`` tokens of a ``height x width`` input.

    With ``patch`` the grid is ``height // patch x width // patch``; otherwise the
    grid with the input's aspect ratio and at most 16 prefix tokens is searched.
    """
    t = int(tokens.shape[1])
    if patch:
        gh, gw = height // patch, width // patch
        if 0 <= t - gh * gw <= 16:
            return t - gh * gw, gh, gw
    for prefix in range(0, 17):
        n = t - prefix
        if n <= 0:
            break
        for gh in range(1, n + 1):
            if n % gh == 0 and gh * width == (n // gh) * height:
                return prefix, gh, n // gh
    raise MavlError(f"cannot lay {t} tokens out on a grid for a {height}x{width} input")


def tokens_to_map(tokens: torch.Tensor, prefix: int, gh: int, gw: int) -> torch.Tensor:
    """``[B, prefix + gh*gw, D]`` -> ``[B, D, gh, gw]``."""
    b, _, d = tokens.shape
    return tokens[:, prefix:].reshape(b, gh, gw, d).permute(0, 3, 1, 2)
