"""Kept for older imports: the timm code now lives in :mod:`mavl_cli.encoders.timm`."""

from mavl_cli.encoders.base import BackboneInfo
from mavl_cli.encoders.common import load_state_dict, quantize_int8
from mavl_cli.encoders.spec import DEFAULT_IMAGE_ENCODER as DEFAULT_BACKBONE
from mavl_cli.encoders.timm import WEIGHT_FILES, create_backbone, save_local_backbone

__all__ = ["BackboneInfo", "DEFAULT_BACKBONE", "WEIGHT_FILES", "create_backbone", "load_state_dict", "quantize_int8",
           "save_local_backbone"]
