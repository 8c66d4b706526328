"""Token pooling for text encoders, as named, tested units.

Padding tokens carry no meaning; averaging them in (as the notebook version
did) makes a label's embedding depend on the longest description in the batch.
"""

from __future__ import annotations

from typing import Any, Callable

from mavl_cli.core.errors import MavlError


def mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """Mean of ``hidden [B, T, D]`` over real tokens only (``attention_mask`` 1)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


def cls_pool(hidden: Any, attention_mask: Any) -> Any:
    """The first token's vector ([CLS] for BERT-style encoders)."""
    return hidden[:, 0]


POOLING: dict[str, Callable[[Any, Any], Any]] = {"mean": mean_pool, "cls": cls_pool}


def get_pooling(name: str) -> Callable[[Any, Any], Any]:
    try:
        return POOLING[name]
    except KeyError:
        raise MavlError(f"unknown pooling {name!r}; use one of {', '.join(POOLING)}") from None
