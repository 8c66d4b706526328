"""Upper bounds on options and on what input files may make mavl allocate, with the reasons.

Each bound is far above any real use and far below what would exhaust a
workstation, so a typo or a hostile file fails at once with one clear line
instead of minutes of swapping.
"""

from __future__ import annotations

import os

#: fusion embedding size: CLIP-style models use 256-1024; 4096 already means ~50 MB per projector
MAX_DIM = 4096
#: bootstrap resamples: 1,000-10,000 give stable 95% CIs; 100,000 is minutes, not hours
MAX_BOOTSTRAP = 100_000
#: seeds are 64-bit in torch; one range for every command
MAX_SEED = 2**63 - 1
#: phantom side in pixels (a 2048 px film is ~100 MB of float work while it is drawn)
MAX_PHANTOM_SIZE = 2048
MAX_PHANTOMS = 1_000_000
#: images or rows per step; more never helps on one machine
MAX_BATCH = 65_536
MAX_EPOCHS = 100_000
MAX_WORKERS = 64
#: longest/shortest image side: radiographs are ~1:1 to 1:3; the short side is resized to the model's
#: size (e.g. 256), so a 1x70000 px strip would become 256x17.9M px (gigabytes) while 100:1 stays at
#: 6.5M px. Pixel counts are bounded by PIL's own decompression-bomb limit.
MAX_ASPECT = 100.0
#: a model's input side (--model-args img_size): radiograph models use 224-1024; a ViT at 2048 px already
#: holds 16,384 tokens (a 1 GB attention matrix per head), and a 100,000 px pos-embed alone is 30 GB
MAX_INPUT_SIDE = 2048
#: parameters of a model built from --model-args (checked on the meta device first): ViT-g is 1.8e9
MAX_PARAMETERS = 3_000_000_000


def max_threads() -> int:
    """CPU threads for the forward pass: more than the cores only thrash (and libgomp may fail)."""
    return max(1, os.cpu_count() or 1)
