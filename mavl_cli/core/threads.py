"""CPU thread tuning for the forward pass on small, shared machines."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


class ThreadTuner:
    """Pick the faster of two CPU thread counts for the forward pass, and keep checking.

    On a shared machine the default (one thread per core) can be several
    times slower than fewer threads: every op ends in a barrier that waits for
    the thread the OS has descheduled (measured here under load: ViT-S 7.5
    img/s with 1 thread vs 4.4 with 2; a tiny ViT 100x). On an idle machine
    all cores win. So each batch is timed (after a one-image warm-up forward,
    so first-call costs do not bias the first probe), the faster setting is
    used, and now and then the other setting gets one batch to refresh its
    figure: after 16 batches, then with the interval doubling up to 128 while
    the choice holds (a probe of a setting twice as slow costs <1% then). Results can differ in
    the last bits between thread counts, so ``embed-images`` does not switch per batch: it calls
    :meth:`calibrate` once on a warm-up batch and records the choice, which ``--resume`` reuses
    (:meth:`fix`). A fixed ``threads`` disables tuning.
    """

    def __init__(self, threads: int | None, probe_every: int = 16, max_probe_every: int = 128) -> None:

        self._torch = torch
        self.original = torch.get_num_threads()
        top = threads or self.original
        self.candidates = [top] if threads or top <= 1 else [top, max(1, top // 2)]
        self.rate: dict[int, float] = {}
        self.min_every, self.max_every = probe_every, max_probe_every
        self.every = probe_every
        self.count = 0
        self.next_probe = len(self.candidates) + probe_every
        self.current = self.candidates[0]
        self.probing = False
        self._t = 0.0
        if threads:
            torch.set_num_threads(threads)

    def start(self) -> None:
        self.count += 1
        if len(self.candidates) > 1:
            untried = [c for c in self.candidates if c not in self.rate]
            self.probing = not untried and self.count >= self.next_probe
            if untried:
                pick = untried[0]
            elif self.probing:
                pick = next(c for c in self.candidates if c != self.best())
            else:
                pick = self.best()
            if pick != self._torch.get_num_threads():
                self._torch.set_num_threads(pick)
            self.current = pick
        self._t = time.perf_counter()

    def stop(self, n_images: int) -> None:
        dt = time.perf_counter() - self._t
        if n_images <= 0 or dt <= 0 or len(self.candidates) == 1:
            return
        r = n_images / dt
        old = self.rate.get(self.current)
        if self.probing or old is None:  # a probe replaces its setting's stale figure
            self.rate[self.current] = r
        else:  # the setting in use: smooth over batches
            self.rate[self.current] = 0.5 * old + 0.5 * r
        if self.probing:  # back off while the choice clearly holds; probe soon again after a switch or a close call
            clear = r < 0.8 * max(v for c, v in self.rate.items() if c != self.current)
            self.every = min(2 * self.every, self.max_every) if clear else self.min_every
            self.next_probe = self.count + self.every

    def calibrate(self, forward: Callable[[], Any], reps: int = 2) -> int:
        """Choose the thread count once, before any real batch, and keep it for the whole run.

        Float sums are split differently over different thread counts, so features can differ in the
        last bits (up to ~5e-6 measured on ViT-B) between settings: a run that switched settings per
        batch could not be resumed identically. ``forward`` runs one small warm-up batch; each
        candidate is timed ``reps`` times after one untimed call, and the faster one is fixed.
        """
        if len(self.candidates) > 1:
            for c in self.candidates:
                self._torch.set_num_threads(c)
                forward()
                t = time.perf_counter()
                for _ in range(reps):
                    forward()
                self.rate[c] = reps / max(time.perf_counter() - t, 1e-9)
        return self.fix(self.best() if self.rate else self.candidates[0])

    def fix(self, threads: int) -> int:
        """Use exactly ``threads`` from now on (a resumed run reuses the interrupted run's setting)."""
        self.candidates = [int(threads)]
        self.current = int(threads)
        self._torch.set_num_threads(int(threads))
        return self.current

    def best(self) -> int:
        return max(self.rate, key=self.rate.__getitem__) if self.rate else self.current

    def restore(self) -> None:
        self._torch.set_num_threads(self.original)
