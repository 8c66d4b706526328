"""mavl's defaults, each in exactly one place (torch-free: the CLI's option defaults read them)."""

DEFAULT_IMAGE_ENCODER = "vit_base_patch16_224"  # a timm name: the default family needs no prefix
DEFAULT_TEXT_ENCODER = "emilyalsentzer/Bio_ClinicalBERT"
DEFAULT_THRESHOLD = 0.5  # decision threshold of a model file before `mavl tune-threshold`
