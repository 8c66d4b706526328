"""Per-finding explanation maps: where on the film the model sees each finding.

Two methods, one spatial adapter per image-encoder family:

- ``similarity`` (gradient-free): every location of the encoder's last
  spatial feature map (a CNN's final map, a ViT's final patch tokens) goes
  through the model's own LRF head and fusion image projector, and its cosine
  with each aspect's projected text embedding is aggregated over aspects the
  way the fusion aggregates (``FusionModel.similarity``): one map per finding.
- ``gradcam``: Grad-CAM on the finding's logit. The activation is the CNN's
  last feature map, or a ViT's patch tokens entering its last block (the last
  block's output patch tokens do not reach a class-token pooled feature, so
  their gradient would be zero), reshaped to the patch grid. Only the part of
  the network after that activation is re-run with gradients, so a map costs
  one forward pass plus a backward pass through the head.
- ``hirescam``: HiResCAM (Draelos & Carin 2020): the element-wise product of
  the finding's logit gradient and the activation, summed over channels, at a
  finer layer: a timm CNN's last stride-16 stage (a 14x14 grid at 224 px
  instead of the final 7x7; the gradient flows back through the stride-32
  stages, so it varies over the cells, unlike the final map's gradient under
  average pooling, where HiResCAM and Grad-CAM coincide); a ViT's tokens
  entering its last block, as for Grad-CAM. One ordinary forward pass in which
  a hook swaps that stage's output for a leaf (nothing before it keeps a
  graph), then one backward pass through the later stages per finding. Where
  the activation reaches the logit only through a LayerNorm (a class-token
  ViT's tokens entering its last block) the product cancels at every token
  (a scale-invariant function's gradient is orthogonal to its input): that
  gives one clear line instead of a blank map.
- ``similarity-hirescam``: both maps scaled to [0, 1] per finding and
  multiplied on the finer grid (the similarity map bilinearly upsampled):
  where a region both resembles the finding's text and raises its logit.
  Chosen on validation phantoms (``benchmarks/map_variants.py``).

Grad-CAM is written here rather than taken from the ``grad-cam`` package:
that package hooks one module and needs a per-architecture reshape transform
and a model whose forward returns the logits; mavl's logits come from a
backbone, an LRF head, and a fusion that also takes text, and the ViT case
needs the token split above. Computing the map on the activation tensor the
adapter hands out serves every family in one function; the tests check it
against the package on a timm CNN, where the package does apply cleanly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config

from mavl_cli.core.errors import MavlError
from mavl_cli.core.runtime import resolve_device
from mavl_cli.encoders.base import grid_from_tokens
from mavl_cli.encoders.preprocess import (
    decode_size,
    normalize_batch,
    prepare_image,
    stack_batch,
)
from mavl_cli.explain.maps import (
    MAPS_SUFFIX,
    crop_geometry,
    label_slug,
    maps_meta,
    mask_name,
    overlay,
    peak,
    to_original,
    write_maps,
)
from mavl_cli.io.files import (
    atomic_write_bytes,
    check_folder,
    check_output_path,
    is_stdout,
)
from mavl_cli.io.imageio import load_radiograph
from mavl_cli.io.mavlfile import MAP_METHODS
from mavl_cli.models.heads import ZeroShotHead
from mavl_cli.models.lrf import head_from_tensors
from mavl_cli.models.mavlmodel import image_encoder

LABEL_CHOICES = ("positive", "all")
#: gradient x activation summed over channels below this fraction of its terms' magnitudes at every location:
#: the activation is scale-invariant for the logit (LayerNorm), Euler's theorem makes the sum vanish
HIRESCAM_CANCEL = 1e-3


@dataclass
class HeatmapOptions:
    """What `mavl predict --heatmap` asked for."""

    folder: Path
    labels: str = "positive"  # positive | all | comma-separated label names
    method: str = "similarity"

    def check(self, names: list[str] | None) -> list[str] | None:
        """Validate before any work; the explicit label list (None for positive/all; ``names`` None:
        the label list is not known yet, check the rest)."""
        if self.method not in MAP_METHODS:
            raise MavlError(f"--heatmap-method must be one of {', '.join(MAP_METHODS)}, got {self.method!r}")

        if is_stdout(self.folder):
            raise MavlError("--heatmap needs a folder for the overlays and maps files, not standard output")

        check_folder(self.folder, create=True, what="heatmap folder")
        if self.labels in LABEL_CHOICES or names is None:
            return None
        wanted = [s.strip() for s in self.labels.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in names]
        if not wanted or unknown:
            raise MavlError(f"--heatmap-labels: unknown label(s) {', '.join(unknown) or repr(self.labels)}; "
                            f"use positive, all, or some of: {', '.join(names)}")
        return wanted

    def check_outputs(self, paths: list[Any], names: list[str], inputs: list[Any] = ()) -> None:
        """Before any work: no overlay or maps file may replace an input (an image in the heatmap
        folder named like an overlay, the model, its weights) or another output of this run."""

        slugs: dict[str, str] = {}
        for n in names:
            if slugs.setdefault(label_slug(n), n) != n:
                raise MavlError(f"--heatmap: labels {slugs[label_slug(n)]!r} and {n!r} would share the overlay name "
                                f"<stem>.{label_slug(n)}.png; rename one")
        folder = Path(self.folder)
        if not folder.is_dir():
            return  # a folder this run creates holds no inputs
        everything = [*paths, *inputs]
        for p in paths:
            stem = Path(p).stem
            for out in [folder / f"{stem}{MAPS_SUFFIX}", *(folder / mask_name(stem, n) for n in names)]:
                if out.exists():
                    check_output_path(out, everything)


# ------------------------------------------------------------------ adapters


@dataclass
class SpatialPass:
    """One image's forward pass, kept for both methods."""

    local: Any  # [h, w, D] features in the pooled feature space, per location (for similarity)
    act: Any = None  # Grad-CAM activation leaf, shape depends on the adapter
    pooled: Any = None  # [1, D] pooled features computed from ``act`` (with a graph)
    cam_grid: Callable[[Any], Any] | None = None  # activation-shaped tensor -> [h, w, C]


class SpatialAdapter:
    """Where a timm encoder's spatial map comes from."""

    def __init__(self, model: Any, name: str = "?", input_size: tuple[int, ...] | None = None) -> None:
        self.model, self.name = model, name
        self.input_size = tuple(input_size) if input_size else None
        self.kind = self._detect()

    def _detect(self) -> str:

        m = self.model
        if all(hasattr(m, a) for a in ("blocks", "patch_embed", "num_prefix_tokens", "norm")) and len(m.blocks) > 0:
            return "vit"
        if not hasattr(m, "forward_features") or not hasattr(m, "forward_head"):
            raise MavlError(f"backbone {self.name!r} has no spatial feature map mavl can read; heatmaps need a CNN or a ViT")

        size = self.input_size or tuple(resolve_model_data_config(m)["input_size"])
        try:
            with torch.no_grad():
                out = m.forward_features(torch.zeros(1, *size))
        except Exception as exc:  # noqa: BLE001 - any failure means no usable map
            raise MavlError(f"backbone {self.name!r}: cannot read a spatial feature map ({str(exc).splitlines()[0][:120]})") from None
        if out.ndim == 4 and out.shape[1] == m.num_features:
            return "nchw"
        if out.ndim == 4 and out.shape[-1] == m.num_features:
            return "nhwc"
        raise MavlError(f"backbone {self.name!r} gives {tuple(out.shape)} features, not a spatial map; "
                        "heatmaps need a CNN (feature map) or a ViT (patch tokens)")

    def _grid(self, n: int) -> tuple[int, int]:
        gs = tuple(getattr(self.model.patch_embed, "grid_size", ()) or ())
        if len(gs) == 2 and gs[0] * gs[1] == n:
            return int(gs[0]), int(gs[1])
        side = int(round(n ** 0.5))
        if side * side != n:
            raise MavlError(f"backbone {self.name!r}: {n} patch tokens do not form a square grid")
        return side, side

    def cam_stage(self) -> Any:
        """The module whose output HiResCAM reads on a CNN: the last stage at stride <= 16 that is not
        the final one (timm's ``feature_info``); None for a ViT or a CNN without stage information."""
        if self.kind == "vit":
            return None
        info = getattr(self.model, "feature_info", None)
        entries = [e for e in (list(info) if info is not None else []) if isinstance(e, dict) and e.get("module")]
        final = max((int(e.get("reduction", 0)) for e in entries), default=0)
        fine = [e for e in entries if 0 < int(e.get("reduction", 0)) <= 16 and int(e.get("reduction", 0)) < final]
        if not fine:
            return None
        try:
            return self.model.get_submodule(str(fine[-1]["module"]))
        except AttributeError:
            return None

    def run_stage(self, x: Any) -> SpatialPass:
        """One forward pass with the :meth:`cam_stage` output swapped for a leaf that requires grad:
        ``act`` is that leaf, ``pooled`` keeps a graph from it, ``local`` the final map for similarity.
        Falls back to :meth:`run` (the Grad-CAM activation) where there is no finer stage."""

        stage = self.cam_stage()
        if stage is None:
            return self.run(x, grad=True)
        m, held = self.model, {}

        def swap(_mod: Any, _args: Any, out: Any) -> Any:
            held["a"] = out.detach().requires_grad_(True)
            return held["a"]

        hook = stage.register_forward_hook(swap)
        try:
            with torch.enable_grad():
                fmap = m.forward_features(x)
                pooled = m.forward_head(fmap, pre_logits=True)
        finally:
            hook.remove()
        act = held["a"]
        local = fmap.detach()[0]
        local = local.permute(1, 2, 0) if self.kind == "nchw" else local
        grid = (lambda t: t[0]) if self.kind == "nhwc" else (lambda t: t[0].permute(1, 2, 0))
        return SpatialPass(local, act, pooled, grid)

    def run(self, x: Any, grad: bool) -> SpatialPass:

        m = self.model
        if self.kind == "vit":
            captured: dict[str, Any] = {}
            hook = m.blocks[-1].register_forward_pre_hook(lambda _mod, args: captured.__setitem__("x", args[0]))
            try:
                with torch.no_grad():
                    tokens = m.forward_features(x)
            finally:
                hook.remove()
            npt = int(m.num_prefix_tokens)
            patches = tokens[:, npt:]
            fc_norm = getattr(m, "fc_norm", None)
            if fc_norm is not None and getattr(m, "global_pool", "token") != "token":
                with torch.no_grad():
                    patches = fc_norm(patches)
            gh, gw = self._grid(patches.shape[1])
            local = patches[0].reshape(gh, gw, -1)
            if not grad:
                return SpatialPass(local)
            act = captured["x"].detach().requires_grad_(True)
            pooled = m.forward_head(m.norm(m.blocks[-1](act)), pre_logits=True)
            return SpatialPass(local, act, pooled, lambda t: t[0, npt:].reshape(gh, gw, -1))
        with torch.no_grad():
            fmap = m.forward_features(x)
        local = fmap[0].permute(1, 2, 0) if self.kind == "nchw" else fmap[0]
        if not grad:
            return SpatialPass(local)
        act = fmap.detach().requires_grad_(True)
        pooled = m.forward_head(act, pre_logits=True)
        grid = (lambda t: t[0].permute(1, 2, 0)) if self.kind == "nchw" else (lambda t: t[0])
        return SpatialPass(local, act, pooled, grid)


class EncoderAdapter:
    """Any registry encoder (:mod:`mavl_cli.encoders`) through its own ``spatial`` map ``[B, C, h, w]``.

    Similarity: each location through the encoder's ``local_features`` (into the pooled feature
    space: open_clip's projection, ConvNeXt's final norm, or the map itself). Grad-CAM: the map
    itself when the pooled features follow from it (``spatial_pools``: ``pool_spatial`` re-runs
    them with a graph); for class-token pooling the tokens entering the encoder's ``cam_block``
    (its last block), swapped for a leaf by a pre-hook during one ordinary forward pass, so only
    that block and the pooling keep a graph.
    """

    def __init__(self, encoder: Any) -> None:
        self.encoder, self.name, self.kind = encoder, getattr(encoder, "name", "?"), "encoder"

    def _map(self, x: Any) -> Any:

        try:
            with torch.no_grad():
                return self.encoder.spatial(x)
        except MavlError:
            raise
        except Exception as exc:  # noqa: BLE001 - a family without a map
            raise MavlError(f"{self.name}: this encoder gives no spatial feature map ({str(exc).splitlines()[0][:100]})") from None

    def run(self, x: Any, grad: bool) -> SpatialPass:

        enc = self.encoder
        if not grad:
            with torch.no_grad():
                local = enc.local_features(self._map(x))
            if local.shape[1] != enc.dim:
                raise MavlError(f"{self.name}: its spatial map gives {local.shape[1]}-d features per location but its "
                                f"pooled features are {enc.dim}-d; heatmaps need the map in the pooled feature space")
            return SpatialPass(local[0].permute(1, 2, 0))
        if enc.spatial_pools:
            act = self._map(x).detach().requires_grad_(True)
            return SpatialPass(None, act, enc.pool_spatial(act), lambda t: t[0].permute(1, 2, 0))
        block = enc.cam_block()
        if block is None:
            self._map(x)  # a family without a map says so first
            raise MavlError(f"{self.name}: its pooled features do not follow from its spatial map (pooling "
                            f"{getattr(enc, 'pooling', '?')!r}), so Grad-CAM cannot re-run the logit from it; "
                            "use --heatmap-method similarity")
        return self._block_pass(x, block)

    def _block_pass(self, x: Any, block: Any) -> SpatialPass:


        enc, held = self.encoder, {}

        def swap(_mod: Any, args: tuple, kwargs: dict) -> Any:
            if args and torch.is_tensor(args[0]):
                held["x"] = args[0].detach().requires_grad_(True)
                return (held["x"], *args[1:]), kwargs
            key = next((k for k, v in kwargs.items() if torch.is_tensor(v)), None)
            if key is None:
                return None
            held["x"] = kwargs[key].detach().requires_grad_(True)
            return args, {**kwargs, key: held["x"]}

        hook = block.register_forward_pre_hook(swap, with_kwargs=True)
        try:
            with torch.enable_grad():  # nothing before the block requires grad: only the block onwards keeps a graph
                pooled = enc(x)
        finally:
            hook.remove()
        act = held.get("x")
        if act is None or act.ndim != 3:
            raise MavlError(f"{self.name}: cannot read the tokens entering its last block for Grad-CAM")
        seq_first = act.shape[1] == x.shape[0] and act.shape[0] != x.shape[0]
        tokens = act.transpose(0, 1) if seq_first else act
        prefix, gh, gw = grid_from_tokens(tokens, x.shape[2], x.shape[3], getattr(enc, "patch", None))

        def grid(t: Any) -> Any:
            t = t.transpose(0, 1) if seq_first else t
            return t[0, prefix:].reshape(gh, gw, -1)

        return SpatialPass(None, act, pooled, grid)


def spatial_adapter(encoder: Any) -> Any:
    """timm networks with their own pooling get :class:`SpatialAdapter` (ViT Grad-CAM at the last block);
    every other registry encoder its own ``spatial`` map."""
    net = getattr(encoder, "net", None)
    if getattr(encoder, "family", None) == "timm" and getattr(encoder, "pooling", "default") == "default" and net is not None:
        return SpatialAdapter(net, getattr(encoder, "name", "?"), tuple(encoder.preprocessing["input_size"]))
    if hasattr(encoder, "spatial"):
        return EncoderAdapter(encoder)
    return SpatialAdapter(encoder, "?")


# ------------------------------------------------------------------ the maps


@dataclass
class MapModel:
    """Backbone + LRF head + fusion + label text: everything a map needs."""

    adapter: SpatialAdapter
    head: Any  # LRFHead or None (fusion on raw backbone features)
    fusion: Any
    text: Any  # [L, A, T]
    mask: Any  # [L, A] bool
    data_config: dict[str, Any]
    device: Any = "cpu"

    def embed(self, feats: Any) -> Any:
        return feats if self.head is None else self.head.embed(feats)

    def logits(self, pooled: Any) -> Any:
        return self.fusion(self.embed(pooled), self.text, self.mask)

    def similarity_maps(self, sp: SpatialPass) -> Any:
        """``[L, h, w]`` aggregated cosine of each location with each label's aspects."""

        h, w, d = sp.local.shape
        with torch.no_grad():
            sim = self.fusion.similarity(self.embed(sp.local.reshape(h * w, d)), self.text, self.mask)
        return sim.T.reshape(-1, h, w)

    def gradcam_maps(self, sp: SpatialPass, labels: list[int]) -> tuple[Any, Any]:
        """``[len(labels), h, w]`` Grad-CAM maps and the logits ``[L]``."""

        logits = self.logits(sp.pooled)[0]
        act = sp.cam_grid(sp.act)
        out = []
        for k, j in enumerate(labels):
            (g,) = torch.autograd.grad(logits[j], sp.act, retain_graph=k < len(labels) - 1)
            gg = sp.cam_grid(g)
            weights = gg.mean(dim=(0, 1))
            out.append(torch.relu((act * weights).sum(-1)).detach())
        return (torch.stack(out) if out else act.new_zeros((0, *act.shape[:2]))), logits.detach()

    def hirescam_maps(self, sp: SpatialPass, labels: list[int]) -> Any:
        """``[len(labels), h, w]`` HiResCAM maps: ReLU of the channel sum of gradient x activation."""

        logits = self.logits(sp.pooled)[0]
        act = sp.cam_grid(sp.act)
        out, net, gross = [], 0.0, 0.0
        for k, j in enumerate(labels):
            (g,) = torch.autograd.grad(logits[j], sp.act, retain_graph=k < len(labels) - 1)
            terms = (sp.cam_grid(g) * act).detach()
            net, gross = net + float(terms.sum(-1).abs().sum()), gross + float(terms.abs().sum())
            out.append(torch.relu(terms.sum(-1)))
        if gross > 0 and net <= HIRESCAM_CANCEL * gross:
            raise MavlError(f"{getattr(self.adapter, 'name', '?')}: HiResCAM is zero at every location of this encoder's "
                            "map: its tokens reach the logit only through a LayerNorm, which ignores their scale, so "
                            "gradient x activation cancels; use --heatmap-method gradcam or similarity")
        return torch.stack(out) if out else act.new_zeros((0, *act.shape[:2]))

    def maps(self, x: Any, method: str, labels: list[int]) -> np.ndarray:
        """``[len(labels), h, w]`` maps on the input crop's grid for one normalised input ``[1, 3, H, W]``."""
        if method == "similarity":
            return self.similarity_maps(self.adapter.run(x, grad=False))[labels].float().cpu().numpy()
        if method == "gradcam":
            cams, _ = self.gradcam_maps(self.adapter.run(x, grad=True), labels)
            return cams.float().cpu().numpy()
        run_stage = getattr(self.adapter, "run_stage", None)
        sp = run_stage(x) if run_stage is not None else self.adapter.run(x, grad=True)
        cams = self.hirescam_maps(sp, labels)
        if method == "hirescam":
            return cams.float().cpu().numpy()
        if sp.local is None:  # an adapter whose Grad-CAM pass does not carry the final map
            sp.local = self.adapter.run(x, grad=False).local
        sim = self.similarity_maps(sp)[labels]
        return (unit_range(upsample(sim, cams.shape[1:])) * unit_range(cams)).float().cpu().numpy()


def needs_grad(method: str) -> bool:
    return method != "similarity"


def unit_range(t: Any) -> Any:
    """Each ``[h, w]`` map of ``[L, h, w]`` scaled to [0, 1] (a constant map becomes 0)."""
    flat = t.reshape(t.shape[0], -1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return (t - lo) / (hi - lo).clamp_min(1e-12)


def upsample(t: Any, size: tuple[int, int]) -> Any:
    """``[L, h, w]`` -> ``[L, *size]`` bilinearly, cell centres kept (the convention of maps.to_original)."""

    if tuple(t.shape[1:]) == tuple(size):
        return t
    return F.interpolate(t[None], size=tuple(int(v) for v in size), mode="bilinear", align_corners=False)[0]


@dataclass
class ZeroShotMapModel(MapModel):
    """A zero-shot model's maps (`mavl zero-shot`: an aligned tower, no LRF head, no fusion).

    ``fusion`` holds the model's :class:`~mavl_cli.models.heads.ZeroShotHead`. Similarity: each
    location through the tower's own projection (the adapter's ``local_features``), its cosine with
    the label's positive prompt slots (averaged as the head averages them) minus its cosine with
    the negative prompt: the zero-shot logit per location, without the temperature. Grad-CAM: on
    the zero-shot logit itself.
    """

    def embed(self, feats: Any) -> Any:
        return feats

    def logits(self, pooled: Any) -> Any:
        return self.fusion(pooled)

    def similarity_maps(self, sp: SpatialPass) -> Any:

        h, w, d = sp.local.shape
        with torch.no_grad():
            pos, neg = self.fusion.pair_cosines(sp.local.reshape(h * w, d))
        return (pos - neg).T.reshape(-1, h, w)


def _zero_shot_map_model(model: Any, encoder: Any, data_config: dict[str, Any], text: np.ndarray | None,
                         mask: np.ndarray | None, negative: np.ndarray | None, device: Any) -> ZeroShotMapModel:


    tensors = model.file.tensors
    t = torch.from_numpy(np.array(tensors["text.embeddings"] if text is None else text, np.float32))
    m = torch.from_numpy(np.array(tensors["text.mask"] if mask is None else mask).astype(bool))
    neg = torch.from_numpy(np.array(tensors["zeroshot.negative"] if negative is None else negative, np.float32))
    head = ZeroShotHead(t, m, neg, float(np.asarray(tensors["zeroshot.logit_scale"]).reshape(-1)[0])).to(device).eval()
    encoder = encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return ZeroShotMapModel(spatial_adapter(encoder), None, head, head.positive, head.positive_mask, data_config, device)


def build_map_model(model: Any, encoder: Any, data_config: dict[str, Any], text: np.ndarray | None = None,
                    mask: np.ndarray | None = None, device: Any = "cpu", bias: np.ndarray | None = None,
                    negative: np.ndarray | None = None) -> MapModel:
    """A :class:`MapModel` from a loaded model file and its image encoder (a registry encoder or a timm model);
    a :class:`ZeroShotMapModel` for zero-shot files (``negative``: their negative prompts, when replaced)."""

    if model.meta.get("scorer") == "zeroshot" and hasattr(encoder, "preprocessing"):
        return _zero_shot_map_model(model, encoder, data_config, text, mask, negative, device)
    if (model.meta.get("scorer") or "fusion") != "fusion":
        raise MavlError(f"{model.file.path}: a {model.meta.get('scorer')} model has no fusion image projector; "
                        "heatmaps need a fused model (`mavl fuse`)")
    lrf = model._lrf_tensors()
    head = head_from_tensors(lrf).to(device) if lrf else None
    fusion = model.fusion().to(device)
    t = torch.from_numpy(np.array(model.file.tensors["text.embeddings"] if text is None else text, np.float32))
    m = torch.from_numpy(np.array(model.file.tensors["text.mask"] if mask is None else mask).astype(bool))
    extra = t.shape[0] - fusion.aspect_logits.shape[0]
    with torch.no_grad():
        if bias is not None:
            fusion.bias = torch.nn.Parameter(torch.from_numpy(np.asarray(bias, np.float32)))
        if extra > 0:  # labels added from text (predict --descriptions): uniform aspect weights, as scoring does
            pad = torch.zeros(extra, fusion.aspect_logits.shape[1])
            fusion.aspect_logits = torch.nn.Parameter(torch.cat([fusion.aspect_logits, pad]))
    encoder = encoder.to(device).eval()
    for p in [*encoder.parameters(), *fusion.parameters(), *(head.parameters() if head is not None else [])]:
        p.requires_grad_(False)
    adapter = spatial_adapter(encoder) if hasattr(encoder, "preprocessing") else SpatialAdapter(
        encoder, "?", tuple(data_config["input_size"]))
    return MapModel(adapter, head, fusion, t.to(device), m.to(device), data_config, device)


# ----------------------------------------------------------------- one image


@dataclass
class ImageMaps:
    id: str
    labels: list[str]
    maps: np.ndarray  # [L, H, W] original pixels
    peaks: list[tuple[int, int]]
    film: Any = None  # PIL image as displayed
    size: tuple[int, int] = (0, 0)
    extra: dict[str, Any] = field(default_factory=dict)


def image_input(path: str | Path, data_config: dict[str, Any]) -> tuple[Any, np.ndarray, Any]:
    """(film as displayed at full resolution, the model's uint8 input crop, its CropGeometry)."""

    film = load_radiograph(path)
    small = load_radiograph(path, target_size=decode_size(data_config))  # exactly what embed-images and predict decode
    geom = crop_geometry(film.size, small.size, data_config)
    return film, prepare_image(small, data_config), geom


def maps_for_image(mm: MapModel, path: str | Path, method: str, labels: list[int]) -> tuple[np.ndarray, Any, Any]:
    """Maps in original pixels ``[len(labels), H, W]``, the film, and the crop geometry."""

    film, crop, geom = image_input(path, mm.data_config)
    x = normalize_batch(stack_batch([crop]), mm.data_config, mm.device).contiguous()
    grid = mm.maps(x, method, labels)
    return to_original(grid, geom), film, geom


def write_image_maps(folder: Path, stem: str, names: list[str], maps: np.ndarray, film: Any, method: str,
                     image: str, extra: dict[str, Any]) -> list[tuple[int, int]]:
    """Overlays ``<stem>.<label>.png`` and ``<stem>.maps.safetensors``; returns the peaks."""

    peaks = [peak(m) for m in maps]
    for name, m in zip(names, maps):
        buf = io.BytesIO()
        overlay(film, m).save(buf, format="PNG")
        atomic_write_bytes(folder / mask_name(stem, name), buf.getvalue())
    write_maps(folder / f"{stem}{MAPS_SUFFIX}", maps, maps_meta(names, method, image, film.size, peaks, extra))
    return peaks


# ------------------------------------------------------------ predict --heatmap


def predict_heatmaps(model: Any, paths: list[Path], ids: list[str], scores: np.ndarray, thresholds: np.ndarray,
                     names: list[str], text: np.ndarray, mask: np.ndarray, opts: HeatmapOptions,
                     weights: str | None = None, device: str = "auto", advance: Callable[..., None] | None = None,
                     label_text: Any = None) -> dict[str, dict[str, tuple[int, int]]]:
    """Write overlays and a maps file per image; ``{image id: {label: (x, y) peak}}``."""

    wanted = opts.check(names)
    stems = [Path(p).stem for p in paths]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise MavlError(f"--heatmap: several inputs are named {dup[0]!r}; their overlays would overwrite each other "
                        "(run them separately, or rename)")
    dev = resolve_device(device)
    encoder, prep = image_encoder(model.meta, weights, model.file.tensors)
    mm = build_map_model(model, encoder, prep, text, mask, dev, getattr(label_text, "bias", None),
                         getattr(label_text, "negative", None))
    folder = Path(opts.folder)  # made when the first map is written: a run that fails before leaves no empty folder
    aggregate = (model.meta.get("fusion") or {}).get("aggregate") or \
        (f"zero-shot {(model.meta.get('zeroshot') or {}).get('prompts', 'pair')}" if model.meta.get("scorer") == "zeroshot" else None)
    extra = {"model": str(model.file.path), "backbone": model.meta.get("backbone"), "aggregate": aggregate, "grid": None}
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for i, (path, image_id, stem) in enumerate(zip(paths, ids, stems)):
        if wanted is not None:
            chosen = [names.index(w) for w in wanted]
        elif opts.labels == "all":
            chosen = list(range(len(names)))
        else:
            chosen = [j for j in range(len(names)) if scores[i, j] >= thresholds[j]]
        if chosen:
            with torch.enable_grad() if needs_grad(opts.method) else torch.no_grad():
                maps, film, geom = maps_for_image(mm, path, opts.method, chosen)
            labs = [names[j] for j in chosen]
            meta = {**extra, "id": image_id, "scores": [round(float(scores[i, j]), 6) for j in chosen],
                    "geometry": geom.to_meta()}
            meta.pop("grid")
            folder.mkdir(parents=True, exist_ok=True)
            peaks = write_image_maps(folder, stem, labs, maps, film, opts.method, str(path), meta)
            out[image_id] = dict(zip(labs, peaks))
        else:
            out[image_id] = {}
        if advance:
            advance(1)
    folder.mkdir(parents=True, exist_ok=True)  # asked for, even when no finding was positive
    return out
