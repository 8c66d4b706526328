"""mavl: multi-label chest X-ray diagnosis with low-rank features and vision-language fusion."""

__version__ = "0.1.0"
