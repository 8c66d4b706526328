"""A scoring head followed by `mavl calibrate`'s per-label map, in torch (logits in, calibrated logits out).

The same map as :meth:`mavl_cli.evaluation.calibration.Calibration.apply`, so every path
that turns head logits into probabilities with a sigmoid (``LoadedModel.score``,
:class:`~mavl_cli.models.mavlmodel.MavlModel`, the Python API) gives calibrated
probabilities. Columns beyond the calibrated labels (labels added from text
by ``predict --descriptions``) pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

_EPS = 1e-7


class CalibratedHead(nn.Module):
    def __init__(self, head: nn.Module, cal: Any) -> None:
        super().__init__()
        self.inner = head
        self.method = cal.method
        f = lambda a: torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
        self.register_buffer("a", f(cal.a))
        self.register_buffer("b", f(cal.b))
        self.register_buffer("shift", f(cal.shift))
        if cal.method == "isotonic":
            self.register_buffer("iso_x", f(cal.iso_x))
            self.register_buffer("iso_y", f(cal.iso_y))
            self.register_buffer("iso_n", torch.from_numpy(np.asarray(cal.iso_n, np.int64)))

    def aspect_cosines(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.aspect_cosines(x)

    def _isotonic(self, p: torch.Tensor) -> torch.Tensor:
        """np.interp per label on [N, L] probabilities with the padded knots."""
        x, y, n = self.iso_x, self.iso_y, self.iso_n
        k = x.shape[1]
        pt = p.t().contiguous()  # [L, N]
        idx = torch.searchsorted(x, pt, right=True).clamp(1, k - 1)
        x0, x1 = x.gather(1, idx - 1), x.gather(1, idx)
        y0, y1 = y.gather(1, idx - 1), y.gather(1, idx)
        w = torch.where(x1 > x0, (pt - x0) / (x1 - x0).clamp_min(1e-30), torch.zeros_like(pt))
        q = y0 + w.clamp(0, 1) * (y1 - y0)
        first_x, first_y = x[:, :1], y[:, :1]
        last = (n - 1).unsqueeze(1)
        last_x, last_y = x.gather(1, last), y.gather(1, last)
        q = torch.where(pt <= first_x, first_y.expand_as(q), q)
        q = torch.where(pt >= last_x, last_y.expand_as(q), q)
        return q.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x)
        L = self.a.shape[0]
        zc = z[:, :L].float()
        if self.method == "isotonic":
            q = self._isotonic(torch.sigmoid(zc)).clamp(_EPS, 1 - _EPS)
            zc = torch.log(q) - torch.log1p(-q) + self.shift
        else:
            zc = self.a * zc + self.b + self.shift
        return torch.cat([zc.to(z.dtype), z[:, L:]], dim=1) if z.shape[1] > L else zc.to(z.dtype)
